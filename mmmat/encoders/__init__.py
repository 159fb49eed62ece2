"""Modality encoders (crystal, spectrum, image, text) behind one registry."""

from mmmat.encoders import crystal_xrd  # noqa: F401  (registers "crystal/schnet_xrd")
from mmmat.encoders.registry import (
    EncoderConfig,
    create_encoder,
    encoder_config,
    encoder_spec,
    list_encoder_configs,
    list_encoders,
    register_encoder,
)

__all__ = ["EncoderConfig", "create_encoder", "encoder_config", "encoder_spec", "list_encoder_configs",
           "list_encoders", "register_encoder"]
