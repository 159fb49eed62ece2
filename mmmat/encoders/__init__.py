"""Modality encoders (crystal, spectrum, image, text) behind one registry."""

from mmmat.encoders.registry import create_encoder, list_encoders, register_encoder

__all__ = ["create_encoder", "list_encoders", "register_encoder"]
