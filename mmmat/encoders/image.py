"""Image encoders: a ``timm`` backbone over the (simulated) microscopy images, pooled and projected.

``"image/timm"`` (:class:`TimmImageEncoder`) takes ``batch.image`` (B, 1, H, W) uint8, scales it to [0, 1],
normalises it with :data:`IMAGE_MEAN` / :data:`IMAGE_STD`, runs ``timm.create_model(model_name,
in_chans=1, num_classes=0)`` (globally pooled features) and projects to ``out_dim`` with one linear layer.

Weights: random by default (offline). Online, ``pretrained=True`` loads timm's default weights of
``model_name`` (also ``"hf-hub:<repo>"`` names); ``pretrained_path`` loads a local file (``.safetensors`` or
a torch checkpoint, read with ``weights_only=True``), either an ImageNet-style checkpoint of the backbone
(3 input channels and a classifier are adapted by timm: RGB filters summed to one channel, classifier
dropped) or a state dict of this whole encoder (keys ``backbone.*`` and ``proj.*``).

Augmentation is off by default: the images are simulated and deterministic, with a frame fixed by the
lattice (see :mod:`mmmat.data.image`). ``augment=True`` turns on :meth:`TimmImageEncoder.train_transform`
in training mode: random 90° rotations and flips per image (square images; flips only otherwise) and small
Gaussian intensity noise, all on tensors on the model's device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmmat.encoders.registry import encoder_config, register_encoder

#: Mean and standard deviation of the pixel values scaled to [0, 1], measured on the 64 × 64 simulated
#: Z-contrast images of the mp20p training split (mean 0.191, std 0.222 over 5,000 images).
IMAGE_MEAN = 0.19
IMAGE_STD = 0.22


def _create_backbone(model_name: str, pretrained: bool, in_chans: int, drop_path_rate: float,
                     image_size: int | None, **kw: Any) -> nn.Module:
    """``timm.create_model`` with ``num_classes=0``; ``img_size`` is passed to models that take one (ViTs)."""
    import timm

    args: dict[str, Any] = dict(pretrained=pretrained, in_chans=in_chans, num_classes=0, **kw)
    if drop_path_rate:
        args["drop_path_rate"] = float(drop_path_rate)
    if image_size:
        try:
            return timm.create_model(model_name, img_size=int(image_size), **args)
        except TypeError as exc:  # convolutional nets take any size and no img_size argument
            if "img_size" not in str(exc):
                raise
    return timm.create_model(model_name, **args)


@register_encoder("image/timm")
class TimmImageEncoder(nn.Module):
    """A timm backbone (pooled features) and a linear projection over one-channel uint8 images.

    Args:
        model_name: timm model name (``"resnet18"``, ``"convnext_atto"``, ``"vit_tiny_patch16_224"``, or
            online ``"hf-hub:<repo>"``).
        pretrained: Load timm's pretrained weights for ``model_name`` (needs internet or a timm cache).
        out_dim: Output size.
        in_chans: Input channels of the backbone (the images have 1).
        drop_path_rate: Stochastic depth rate of the backbone (0 = off).
        image_size: Side, pixels, that images are resized to (bilinear) when they differ; also passed to
            models that need a fixed size (ViTs). None feeds images as they come.
        pretrained_path: Local weights file (see the module docstring); overrides ``pretrained``.
        mean: Normalisation mean of pixel values in [0, 1].
        std: Normalisation standard deviation of pixel values in [0, 1].
        augment: Apply :meth:`train_transform` in training mode.
        noise_std: Standard deviation of the added intensity noise, in [0, 1] pixel units.
        channels_last: Keep the backbone in channels-last memory format (faster convolutions on GPU).

    """

    def __init__(
        self,
        model_name: str = "resnet18",
        pretrained: bool = False,
        out_dim: int = 256,
        in_chans: int = 1,
        drop_path_rate: float = 0.0,
        image_size: int | None = 64,
        pretrained_path: str | None = None,
        mean: float = IMAGE_MEAN,
        std: float = IMAGE_STD,
        augment: bool = False,
        noise_std: float = 0.02,
        channels_last: bool = True,
    ):
        super().__init__()
        if std <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.model_name = model_name
        self.in_chans = int(in_chans)
        self.image_size = int(image_size) if image_size else None
        self.mean, self.std = float(mean), float(std)
        self.augment = bool(augment)
        self.noise_std = float(noise_std)
        self.channels_last = bool(channels_last)
        self.out_dim = int(out_dim)

        full_state: dict[str, torch.Tensor] | None = None
        overlay: dict[str, Any] = {}
        if pretrained_path:
            path = Path(pretrained_path)
            if not path.is_file():
                raise FileNotFoundError(f"pretrained_path {str(path)!r} is not a file")
            from timm.models import load_state_dict

            state = load_state_dict(str(path), weights_only=True)
            if any(k.startswith("backbone.") for k in state):
                full_state, pretrained = state, False
            else:
                pretrained, overlay = True, {"pretrained_cfg_overlay": {"file": str(path)}}
        self.backbone = _create_backbone(
            model_name, bool(pretrained), self.in_chans, drop_path_rate, self.image_size, **overlay
        )
        self.proj = nn.Linear(int(self.backbone.num_features), self.out_dim)
        if full_state is not None:
            self.load_state_dict(full_state, strict=True)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 1, H, W) -> normalised float (B, in_chans, image_size, image_size)."""
        x = image.float() if image.dtype != torch.uint8 else image.to(torch.float32).div_(255.0)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if self.image_size and x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        if self.training and self.augment:
            x = self.train_transform(x)
        x = (x - self.mean) / self.std
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, self.in_chans, -1, -1)
        return x

    def train_transform(self, x: torch.Tensor) -> torch.Tensor:
        """Random dihedral transform per image (90° rotations and flips) plus Gaussian intensity noise.

        Vectorised over the batch on ``x``'s device: a transpose (square images only), a vertical and a
        horizontal flip, each applied to a random half of the images, give all eight symmetries of the
        square with equal probability.

        Args:
            x: (B, C, H, W) float images in [0, 1].

        Returns:
            The transformed images (noise added, then clamped to [0, 1]).

        """
        b = x.shape[0]
        flips = torch.rand(b, 3, device=x.device) < 0.5
        if x.shape[-1] == x.shape[-2]:
            x = torch.where(flips[:, 0, None, None, None], x.transpose(-1, -2), x)
        x = torch.where(flips[:, 1, None, None, None], x.flip(-2), x)
        x = torch.where(flips[:, 2, None, None, None], x.flip(-1), x)
        if self.noise_std > 0:
            x = (x + self.noise_std * torch.randn_like(x)).clamp_(0.0, 1.0)
        return x

    def forward(self, batch: Any) -> torch.Tensor:
        """Encode ``batch.image`` to (B, out_dim)."""
        return self.encode(batch.image)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Encode (B, 1, H, W) uint8 images (or floats in [0, 1]) to (B, out_dim)."""
        x = self.preprocess(image)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.proj(self.backbone(x))

#: Typed config of ``"image/timm"`` (YAML ``class_path: mmmat.encoders.image.TimmImageEncoderConfig``).
TimmImageEncoderConfig = encoder_config("image/timm")
