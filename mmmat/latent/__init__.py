"""Shared latent space: contrastive objectives and the multimodal model."""
