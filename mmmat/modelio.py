"""Model folders on disk: ``config.json`` + ``model.safetensors``, read and written without pickle."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def write_model_dir(path: str | Path, config: dict[str, Any], module: nn.Module) -> Path:
    """Write ``config`` as ``config.json`` and ``module``'s state as ``model.safetensors`` under ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=1, sort_keys=True))
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    return path


def read_model_config(path: str | Path, fmt: str) -> dict[str, Any]:
    """The ``config.json`` of a model folder, checked to describe a model of format ``fmt``."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: is {path} a folder written by save_pretrained?")
    config = json.loads(cfg_file.read_text())
    if config.get("format") != fmt:
        raise ValueError(f"{cfg_file} does not describe an {fmt} (format {config.get('format')!r})")
    return config


def load_weights(module: nn.Module, path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load ``model.safetensors`` into ``module``; every tensor must fit (clear error naming the folder)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(path) / WEIGHTS_NAME), device=str(device))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return module


def model_fingerprint(path: str | Path) -> str:
    """``sha256:<hex>`` of a model folder's ``config.json`` followed by its ``model.safetensors``."""
    d = Path(path)
    h = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        f = d / name
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: is {d} a model folder written by save_pretrained?")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()
