"""Modality encoders (crystal, spectrum, image, text) behind one registry."""

from mmmat.encoders import crystal_xrd  # noqa: F401  (registers "crystal/schnet_xrd")
from mmmat.encoders.registry import create_encoder, list_encoders, register_encoder

__all__ = ["create_encoder", "list_encoders", "register_encoder"]
