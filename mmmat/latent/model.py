"""MultimodalModel: one encoder per modality, projected into one shared, L2-normalised latent space.

The model is built from a plain config (JSON-serialisable): ``encoders`` maps a registered modality name
(:func:`mmmat.modalities.modality_names`: ``crystal``, ``xrd``, ``image``, ``processing_text``, ...) to
``{"name": <registered encoder>, **kwargs}``. On disk a model is ``config.json`` + ``model.safetensors``
(+ ``tokenizer/`` when text encoders use a trained tokenizer); :meth:`MultimodalModel.from_pretrained`
rebuilds it without unpickling anything.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmmat.data.batch import Collator, MultimodalBatch, map_tensors
from mmmat.encoders.registry import EncoderConfig, create_encoder, encoder_spec
from mmmat.modelio import CONFIG_NAME, WEIGHTS_NAME  # noqa: F401  (re-exported)

TOKENIZER_DIR = "tokenizer"


def __getattr__(name: str) -> Any:
    # ``TEXT_MODALITIES``: the registered text modalities (mmmat.modalities), looked up when asked for
    if name == "TEXT_MODALITIES":
        from mmmat.modalities import specs

        return tuple(s.name for s in specs() if s.is_text)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Projection(nn.Module):
    """Linear (or two-layer MLP) projection into the shared space."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear"):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim, bias=False)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim, bias=False))
        else:
            raise ValueError(f"unknown projection kind {kind!r} (linear, mlp)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` (B, in_dim) -> (B, out_dim)."""
        return self.net(x)


class MultimodalModel(nn.Module):
    """Encoders + projections into one shared space.

    Args:
        encoders: modality -> encoder config: an :class:`~mmmat.encoders.registry.EncoderConfig`, a plain
            ``{"name": registered encoder name, **constructor kwargs}`` or a YAML-style ``{"class_path",
            "init_args"}`` dict (see :func:`~mmmat.encoders.registry.encoder_spec`); stored in the plain form.
        embed_dim: Dimension of the shared space.
        projection: ``linear`` or ``mlp``.
        cutoff: Periodic graph cutoff (Å) used when :meth:`embed` collates raw crystals; None (default) takes
            the crystal encoder's own cutoff, so graphs built here never miss neighbours the encoder expects.
        max_text_tokens: Token budget per text when :meth:`embed` tokenises raw strings.
    """

    def __init__(
        self,
        encoders: Mapping[str, EncoderConfig | Mapping[str, Any]],
        embed_dim: int = 256,
        projection: str = "linear",
        cutoff: float | None = None,
        max_text_tokens: int = 128,
    ):
        super().__init__()
        from mmmat.modalities import get_modality, modality_names

        unknown = sorted(set(encoders) - set(modality_names()))
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; known: {list(modality_names())}")
        if not encoders:
            raise ValueError("a MultimodalModel needs at least one encoder")
        encoders = {modality: encoder_spec(cfg) for modality, cfg in encoders.items()}
        self.config = {
            "encoders": copy.deepcopy(encoders),
            "embed_dim": embed_dim,
            "projection": projection,
            "cutoff": cutoff,
            "max_text_tokens": max_text_tokens,
        }
        self.encoders = nn.ModuleDict()
        self.projections = nn.ModuleDict()
        for modality, cfg in encoders.items():
            cfg = dict(cfg)
            name = cfg.pop("name")
            if get_modality(modality).is_text:
                cfg.setdefault("modality", modality)
            enc = create_encoder(name, **cfg)
            self.encoders[modality] = enc
            self.projections[modality] = Projection(enc.out_dim, embed_dim, projection)
        enc_cutoff = getattr(self.encoders["crystal"], "cutoff", None) if "crystal" in self.encoders else None
        if cutoff is None:
            cutoff = float(enc_cutoff) if enc_cutoff is not None else 5.0
        elif enc_cutoff is not None and cutoff < float(enc_cutoff):
            raise ValueError(f"cutoff {cutoff} Å is shorter than the crystal encoder's {enc_cutoff} Å")
        self.config["cutoff"] = cutoff
        self.tokenizer: Any = None

    @property
    def modalities(self) -> list[str]:
        """Modalities this model encodes."""
        return list(self.encoders)

    def encode(self, modality: str, batch: MultimodalBatch) -> torch.Tensor:
        """L2-normalised embeddings (B, embed_dim) of one modality of ``batch`` (all rows, present or not)."""
        if modality not in self.encoders:
            raise KeyError(f"this model has no {modality!r} encoder (it has {self.modalities})")
        from mmmat.modalities import get_modality

        spec = get_modality(modality)
        if spec.present_rows_only and modality in batch.present:
            return self._encode_present_rows(modality, batch)
        h = spec.run_encoder(self.encoders[modality], batch)
        return F.normalize(self.projections[modality](h).float(), dim=-1)

    def _encode_present_rows(self, modality: str, batch: MultimodalBatch) -> torch.Tensor:
        """Run an encoder on the rows that have its modality only (most materials have no text).

        Absent rows get zeros (the loss masks them); at least one row always runs, so every parameter takes
        part in every step (DDP needs that). The rows come from ``batch.rows`` when the batch builder knew them
        on the host (no device synchronisation), else from the presence mask.
        """
        import dataclasses

        present = batch.present[modality]
        rows = batch.rows.get(modality) if batch.rows else None
        if rows is None:  # the mask is read back from the device (one synchronisation)
            rows = present.nonzero().squeeze(1)
            if rows.numel() == 0:
                rows = torch.zeros(1, dtype=torch.long, device=present.device)
        picked = map_tensors(batch.inputs[modality], lambda t: t[rows])
        sub = dataclasses.replace(batch, inputs={**batch.inputs, modality: picked})
        h = F.normalize(self.projections[modality](self.encoders[modality](sub)).float(), dim=-1)
        out = torch.zeros(len(batch), h.shape[-1], device=h.device, dtype=h.dtype)
        return out.index_copy(0, rows, h)

    def forward(self, batch: MultimodalBatch, modalities: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Embeddings of every modality (default: those with at least one present row in ``batch``)."""
        out = {}
        for m in modalities or self.modalities:
            if modalities is None and not bool(batch.present[m].any()):
                continue
            out[m] = self.encode(m, batch)
        return out

    # ------------------------------------------------------------------ embedding raw inputs
    @torch.no_grad()
    def embed(self, modality: str, inputs: Any, batch_size: int = 256) -> torch.Tensor:
        """Embed one modality from a batch or raw inputs; returns (N, embed_dim) on the model's device.

        ``inputs``: a :class:`MultimodalBatch`; or raw inputs as the modality's spec takes them
        (:meth:`mmmat.modalities.ModalitySpec.raw_batch`): ``crystal`` - pymatgen Structures, ASE Atoms or
        :class:`~mmmat.data.schema.MaterialRecord` objects; ``xrd`` - (N, 1701) profiles on
        :data:`mmmat.data.xrd.TWO_THETA` (Cu Kα) as an array or tensor; ``image`` - (N, H, W) or
        (N, 1, H, W) uint8 images; text modalities - a list of strings; others as their spec says.
        """
        was_training = self.training
        self.eval()
        try:
            dev = next(self.parameters()).device
            if isinstance(inputs, MultimodalBatch):
                return self.encode(modality, inputs.to(dev))
            outs = []
            for start in range(0, len(inputs), batch_size):
                chunk = inputs[start : start + batch_size]
                outs.append(self.encode(modality, self._raw_batch(modality, chunk).to(dev)))
            if not outs:
                return torch.zeros(0, self.config["embed_dim"], device=dev)
            return torch.cat(outs)
        finally:
            self.train(was_training)

    def _raw_batch(self, modality: str, chunk: Any) -> MultimodalBatch:
        from mmmat.modalities import get_modality

        b = get_modality(modality).raw_batch(self, chunk)
        b.present[modality] = torch.ones(len(chunk), dtype=torch.bool)
        return b

    def _collator(self, build_graph: bool = True) -> Collator:
        return Collator(
            cutoff=self.config["cutoff"],
            build_graph=build_graph,
            tokenizer=self.tokenizer,
            max_text_tokens=self.config["max_text_tokens"],
        )

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (and the tokenizer, if any) to ``path``."""
        from mmmat.modelio import write_model_dir

        path = Path(path)
        config = dict(self.config, format="mmmat.MultimodalModel", version=1)
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(path / TOKENIZER_DIR))
            config["tokenizer"] = TOKENIZER_DIR
        return write_model_dir(path, config, self)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> MultimodalModel:
        """Rebuild a model written by :meth:`save_pretrained` (no pickle is loaded)."""
        from mmmat.modelio import load_weights, read_model_config

        path = Path(path)
        config = read_model_config(path, "mmmat.MultimodalModel")
        model = cls(
            encoders=config["encoders"],
            embed_dim=config["embed_dim"],
            projection=config["projection"],
            cutoff=config["cutoff"],
            max_text_tokens=config["max_text_tokens"],
        )
        if config.get("tokenizer"):
            from mmmat.data.tokenizer import load_tokenizer

            model.tokenizer = load_tokenizer(str(path / config["tokenizer"]))
        load_weights(model, path, map_location)
        return model.to(map_location)

