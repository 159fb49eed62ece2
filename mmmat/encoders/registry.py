"""A registry of encoders keyed by name, and one factory.

Every encoder is an ``nn.Module`` with an ``out_dim`` attribute and ``forward(batch) -> (B, out_dim)``
taking a :class:`~mmmat.data.batch.MultimodalBatch` (it reads its own modality). Rows of materials that
lack the modality are computed on zeros and masked out by the caller with ``batch.present[modality]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register an encoder class or factory under ``name`` (e.g. ``"crystal/painn"``)."""

    def deco(cls: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _ENCODERS:
            raise KeyError(f"encoder {name!r} is registered twice")
        _ENCODERS[name] = cls
        return cls

    return deco


def list_encoders() -> list[str]:
    """Names of every registered encoder."""
    _import_builtin()
    return sorted(_ENCODERS)


def create_encoder(name: str, **cfg: Any) -> nn.Module:
    """Build the encoder registered under ``name`` with keyword config ``cfg``."""
    _import_builtin()
    if name not in _ENCODERS:
        raise KeyError(f"unknown encoder {name!r}; registered: {sorted(_ENCODERS)}")
    return _ENCODERS[name](**cfg)


def _import_builtin() -> None:
    import importlib

    for mod in ("crystal", "spectrum", "image", "text"):
        try:
            importlib.import_module(f"mmmat.encoders.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"mmmat.encoders.{mod}":
                raise
