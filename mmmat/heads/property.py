"""Property prediction from crystals: a crystal encoder plus one head per target, with uncertainty.

A :class:`PropertyModel` takes its crystal encoder either from a pretrained
:class:`~mmmat.latent.model.MultimodalModel` (:meth:`PropertyModel.from_multimodal`) or builds it from an
encoder config (training from scratch), and puts one small head (LayerNorm + MLP) per target on the
crystal embedding (the encoder's output before the contrastive projection).

Targets.
    Each target is ``{"name": <property column>, "kind": "regression" | "classification",
    "num_classes": <int, classification only>, "weight": <loss weight, default 1>}``; a bare string is a
    regression target. Classification labels are the class index stored as a number (e.g. a space-group
    number with ``num_classes: 231``).

Normalisation.
    Regression labels are standardised with a mean and standard deviation fitted on the training labels
    (:meth:`PropertyModel.fit_normalization`); both live in the heads as buffers (so Lightning checkpoints
    and ``model.safetensors`` carry them) and in ``config.json``. Predictions are returned in the units of
    the property column.

Missing labels.
    NaN labels are masked out of the loss: each target's loss is the mean over its labelled rows only, and
    a batch without any label for a target contributes exactly zero (with zero, finite gradients).

Uncertainty: a mean-variance head.
    Every regression head predicts a mean and a variance (softplus, floored at 1e-6 in standardised units).
    The default loss is β-NLL (Seitzer et al., ICLR 2022): the Gaussian negative log-likelihood of each
    row weighted by its (gradient-stopped) predicted variance to the power β. β = 0 is the plain Gaussian
    NLL, which is known to let the mean fit poorly where the variance is large; β = 0.5 (default) keeps the
    accuracy of the mean close to that of a squared-error fit while the variance stays calibrated.
    ``regression_loss: "l1"`` instead fits the mean with the absolute error (the metric reported for
    formation energy and band gap) and the variance with the Gaussian NLL of the gradient-stopped mean's
    residuals, so the mean is exactly an L1 fit and an uncertainty still comes out. A single mean-variance
    head captures the noise in the labels (aleatoric uncertainty), not the model's ignorance far from the
    training data; a deep ensemble would add that at N times the cost and is not provided here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmmat.encoders.registry import EncoderConfig, create_encoder, encoder_spec
from mmmat.modelio import CONFIG_NAME, WEIGHTS_NAME  # noqa: F401  (re-exported)

FORMAT = "mmmat.PropertyModel"

#: Floor of the predicted variance in standardised units.
MIN_VARIANCE = 1e-6
#: softplus(x) = 1 at this x: the initial variance bias, so a fresh head starts at unit variance.
_SOFTPLUS_ONE = math.log(math.e - 1.0)

KINDS = ("regression", "classification")
MODES = ("linear_probe", "partial", "full")
REGRESSION_LOSSES = ("beta_nll", "l1")


@dataclass(frozen=True)
class Target:
    """One prediction target.

    Attributes:
        name: Property column name (as in the shard manifest).
        kind: ``regression`` or ``classification``.
        num_classes: Number of classes (classification only; labels are 0 .. num_classes - 1).
        weight: Weight of this target's loss in the sum over targets.
        unit: Unit of the labels and predictions (regression), recorded in the model's ``config.json``; None
            takes the project's unit for a known property name (:data:`mmmat.plots.PROPERTY_UNITS`, e.g.
            ``band_gap`` in eV), else ``""`` (unknown or dimensionless; always ``""`` for classification).

    """

    name: str
    kind: str = "regression"
    num_classes: int | None = None
    weight: float = 1.0
    unit: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a target needs a non-empty column name, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"target {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "classification" and (self.num_classes is None or int(self.num_classes) < 2):
            raise ValueError(f"classification target {self.name!r} needs num_classes >= 2")
        if self.kind == "regression" and self.num_classes is not None:
            raise ValueError(f"regression target {self.name!r} takes no num_classes")
        if self.unit is None:
            from mmmat.plots import unit_of

            object.__setattr__(self, "unit", unit_of(self.name) if self.kind == "regression" else "")
        elif not isinstance(self.unit, str):
            raise ValueError(f"target {self.name!r}: unit must be a string, got {self.unit!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


def parse_targets(targets: Sequence[str | dict[str, Any] | Target]) -> list[Target]:
    """Targets from column names (regression) or ``{name, kind, num_classes, weight, unit}`` dicts."""
    if isinstance(targets, str | dict | Target):
        targets = [targets]
    out: list[Target] = []
    for t in targets:
        if isinstance(t, Target):
            out.append(t)
        elif isinstance(t, str):
            out.append(Target(t))
        elif isinstance(t, dict):
            unknown = sorted(set(t) - {"name", "kind", "num_classes", "weight", "unit"})
            if unknown:
                raise ValueError(f"target {t!r}: unknown keys {unknown} (name, kind, num_classes, weight, unit)")
            if "name" not in t:
                raise ValueError(f"target {t!r} has no name")
            nc = t.get("num_classes")
            out.append(
                Target(str(t["name"]), str(t.get("kind", "regression")), None if nc is None else int(nc),
                       float(t.get("weight", 1.0)), t.get("unit"))
            )
        else:
            raise TypeError(f"a target is a column name or a dict, got {type(t).__name__}")
    if not out:
        raise ValueError("at least one target is needed")
    names = [t.name for t in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"targets named more than once: {dup}")
    return out


def select_labelled(
    labels: np.ndarray, max_labels: int | None = None, fraction: float = 1.0, seed: int = 0
) -> np.ndarray:
    """Indices of the training rows to use: labelled rows, optionally the first N of a seeded permutation.

    A row is labelled when any of its K labels is finite. With ``fraction`` < 1 or ``max_labels`` set, the
    labelled rows are permuted with ``numpy.random.default_rng(seed)`` and the first
    ``min(max_labels, round(fraction * n_labelled))`` are kept; the result is sorted (file order).

    Args:
        labels: (N,) or (N, K) labels, NaN = missing.
        max_labels: Keep at most this many labelled rows (None = no limit).
        fraction: Keep this fraction of the labelled rows (0 < fraction <= 1).
        seed: Seed of the permutation.

    """
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim == 1:
        labels = labels[:, None]
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if max_labels is not None and max_labels < 1:
        raise ValueError(f"max_train_labels must be positive, got {max_labels}")
    idx = np.flatnonzero(np.isfinite(labels).any(axis=1))
    n = len(idx)
    k = n if fraction >= 1.0 else max(1, int(round(fraction * n)))
    if max_labels is not None:
        k = min(k, int(max_labels))
    if k < n:
        idx = np.sort(idx[np.random.default_rng(seed).permutation(n)[:k]])
    return idx


def model_fingerprint(path: str | Path) -> str:
    """SHA-256 of a saved model's ``config.json`` and ``model.safetensors`` (identifies the exact weights)."""
    from mmmat.modelio import model_fingerprint as fingerprint

    return fingerprint(path)


class TargetHead(nn.Module):
    """MLP head for one target; regression heads hold the target's mean and std (buffers, label units)."""

    def __init__(self, in_dim: int, target: Target, hidden: int = 256, layers: int = 2, dropout: float = 0.0):
        """Build a LayerNorm of the embedding, then ``layers`` linear layers (SiLU between).

        The output is 2 wide (standardised mean, variance pre-activation) or one logit per class. The
        LayerNorm puts embeddings of any scale (a frozen pretrained encoder's too) on a common footing.
        """
        super().__init__()
        self.target = target
        out = 2 if target.kind == "regression" else int(target.num_classes)
        mods: list[nn.Module] = [nn.LayerNorm(in_dim)]
        d = in_dim
        for _ in range(max(0, layers - 1)):
            mods += [nn.Linear(d, hidden), nn.SiLU(), nn.Dropout(dropout)]
            d = hidden
        last = nn.Linear(d, out)
        if target.kind == "regression":
            with torch.no_grad():
                last.bias.zero_()
                last.bias[1] = _SOFTPLUS_ONE
        mods.append(last)
        self.net = nn.Sequential(*mods)
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("std", torch.ones((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw outputs: (B, 2) standardised mean and variance pre-activation, or (B, C) logits."""
        return self.net(x)


class PropertyModel(nn.Module):
    """A crystal encoder and one head per target.

    Args:
        encoder: Encoder config: an :class:`~mmmat.encoders.registry.EncoderConfig` or a plain
            ``{"name": <registered crystal encoder>, **kwargs}`` dict (stored in the plain form).
        targets: Column names (regression) or ``{name, kind, num_classes, weight}`` dicts.
        head_hidden: Width of the heads' hidden layers.
        head_layers: Linear layers per head (1 = a linear map of the embedding).
        dropout: Dropout in the heads.
        regression_loss: ``beta_nll`` (mean and variance by β-NLL) or ``l1`` (mean by absolute error,
            variance by the NLL of the gradient-stopped mean).
        beta: β of β-NLL (0 = Gaussian NLL).
        cutoff: Neighbour-graph cutoff (Å) used when raw crystals are collated (default: the encoder's).
        source: Provenance of the encoder (``{"path", "fingerprint"}`` of a pretrained model) or None.

    """

    def __init__(
        self,
        encoder: EncoderConfig | Mapping[str, Any],
        targets: Sequence[str | dict[str, Any] | Target],
        head_hidden: int = 256,
        head_layers: int = 2,
        dropout: float = 0.0,
        regression_loss: str = "beta_nll",
        beta: float = 0.5,
        cutoff: float | None = None,
        source: dict[str, Any] | None = None,
    ):
        super().__init__()
        if regression_loss not in REGRESSION_LOSSES:
            raise ValueError(f"regression_loss must be one of {REGRESSION_LOSSES}, got {regression_loss!r}")
        encoder = encoder_spec(encoder)
        cfg = dict(encoder)
        self.encoder = create_encoder(cfg.pop("name"), **cfg)
        enc_cutoff = getattr(self.encoder, "cutoff", None)
        if cutoff is None:
            cutoff = enc_cutoff if enc_cutoff is not None else 5.0
        elif enc_cutoff is not None and cutoff < enc_cutoff:
            raise ValueError(f"graph cutoff {cutoff} Å is shorter than the encoder's cutoff {enc_cutoff} Å")
        self.config: dict[str, Any] = {
            "encoder": copy.deepcopy(dict(encoder)),
            "head": {"hidden": int(head_hidden), "layers": int(head_layers), "dropout": float(dropout)},
            "loss": {"regression_loss": regression_loss, "beta": float(beta)},
            "cutoff": float(cutoff),
            "source": copy.deepcopy(source),
        }
        self.heads = nn.ModuleDict()
        self._targets: list[Target] = []
        self.reset_head(targets)
        self._encoder_frozen = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_multimodal(
        cls, path: str | Path, targets: Sequence[str | dict[str, Any] | Target], **kwargs: Any
    ) -> PropertyModel:
        """Take the crystal encoder (weights and config) of a :class:`MultimodalModel` saved at ``path``.

        The config records the source directory and its :func:`model_fingerprint`.
        """
        from mmmat.latent.model import MultimodalModel

        mm = MultimodalModel.from_pretrained(path)
        if "crystal" not in mm.encoders:
            raise ValueError(f"{path}: the pretrained model has no crystal encoder (it has {mm.modalities})")
        enc_cutoff = float(getattr(mm.encoders["crystal"], "cutoff", 0.0))
        kwargs.setdefault("cutoff", max(float(mm.config["cutoff"]), enc_cutoff))
        source = {"path": str(Path(path).resolve()), "fingerprint": model_fingerprint(path),
                  "format": "mmmat.MultimodalModel"}
        model = cls(mm.config["encoders"]["crystal"], targets, source=source, **kwargs)
        model.encoder.load_state_dict(mm.encoders["crystal"].state_dict())
        return model

    @property
    def targets(self) -> list[Target]:
        """The targets, in head order."""
        return list(self._targets)

    @property
    def target_names(self) -> list[str]:
        """Target column names, in head order."""
        return [t.name for t in self._targets]

    def reset_head(self, targets: Sequence[str | dict[str, Any] | Target]) -> None:
        """Replace every head by a fresh one for ``targets`` (normalisation reset to mean 0, std 1)."""
        parsed = parse_targets(targets)
        h = self.config["head"]
        dev = next(self.encoder.parameters()).device
        self.heads = nn.ModuleDict(
            {t.name: TargetHead(self.encoder.out_dim, t, h["hidden"], h["layers"], h["dropout"])
             for t in parsed}
        ).to(dev)
        self._targets = parsed
        self.config["targets"] = [t.to_dict() for t in parsed]

    # ------------------------------------------------------------------ normalisation
    def fit_normalization(self, labels: np.ndarray | torch.Tensor) -> dict[str, dict[str, float]]:
        """Fit each regression target's mean and std on (N, K) training labels (NaN = missing, head order)."""
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        y = np.asarray(labels, dtype=np.float64)
        if y.ndim == 1:
            y = y[:, None]
        if y.shape[1] != len(self._targets):
            raise ValueError(f"labels have {y.shape[1]} columns, the model has {len(self._targets)} targets")
        for k, t in enumerate(self._targets):
            if t.kind != "regression":
                continue
            v = y[:, k][np.isfinite(y[:, k])]
            if v.size == 0:
                raise ValueError(f"no labelled training material for target {t.name!r}")
            std = float(v.std()) if v.size > 1 else 1.0
            head = self.heads[t.name]
            head.mean.fill_(float(v.mean()))
            head.std.fill_(std if std > 1e-12 else 1.0)
        return self.normalization

    @property
    def normalization(self) -> dict[str, dict[str, float]]:
        """Regression target -> ``{"mean", "std"}`` in the label's units."""
        return {
            t.name: {"mean": float(self.heads[t.name].mean), "std": float(self.heads[t.name].std)}
            for t in self._targets
            if t.kind == "regression"
        }

    def normalize(self, name: str, y: torch.Tensor) -> torch.Tensor:
        """Labels of target ``name`` in standardised units."""
        h = self.heads[name]
        return (y - h.mean.to(y.dtype)) / h.std.to(y.dtype)

    def denormalize(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """Standardised values of target ``name`` back in label units."""
        h = self.heads[name]
        return z * h.std.to(z.dtype) + h.mean.to(z.dtype)

    # ------------------------------------------------------------------ freezing
    def set_trainable(self, mode: str = "full", unfreeze_last: int = 1) -> None:
        """Choose what trains: ``full`` (everything), ``linear_probe`` (heads only), ``partial``.

        ``partial`` trains the heads, the last ``unfreeze_last`` interaction blocks of the encoder and the
        encoder's layers after them (final norm, readout MLP); the atom embedding, radial basis and earlier
        blocks stay frozen. For an encoder with a graph branch ``gnn`` beside other branches
        (``crystal/schnet_xrd``), this applies to the graph branch, the fusion layers train and the other
        branches stay frozen. Frozen parts of the encoder run in eval mode.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for p in self.heads.parameters():
            p.requires_grad_(True)
        enc = self.encoder
        if mode == "full":
            for p in enc.parameters():
                p.requires_grad_(True)
            self._encoder_frozen = False
            self.train(self.training)
            return
        for p in enc.parameters():
            p.requires_grad_(False)
        self._encoder_frozen = mode == "linear_probe"
        if mode == "linear_probe":
            self.train(self.training)
            return
        fused = not isinstance(getattr(enc, "blocks", None), nn.ModuleList) and isinstance(
            getattr(enc, "gnn", None), nn.Module
        )
        if fused:  # graph branch + other branches (crystal/schnet_xrd): partial applies to the graph branch
            for name, child in enc.named_children():
                if name.startswith("fuse"):
                    for p in child.parameters():
                        p.requires_grad_(True)
            enc = enc.gnn
        blocks = getattr(enc, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"partial mode needs an encoder with `blocks` ({type(enc).__name__} has none)")
        n = int(unfreeze_last)
        if not 0 <= n <= len(blocks):
            raise ValueError(f"unfreeze_last must be in 0..{len(blocks)} (the encoder's blocks), got {n}")
        for block in list(blocks)[len(blocks) - n :]:
            for p in block.parameters():
                p.requires_grad_(True)
        after = False
        for name, child in enc.named_children():
            if name == "blocks":
                after = True
            elif after:
                for p in child.parameters():
                    p.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> PropertyModel:
        """Set training mode; every encoder part whose parameters are all frozen stays in eval mode.

        So frozen parts (all of the encoder in ``linear_probe``, the early blocks in ``partial``, parameters
        frozen by hand in ``full``) neither update normalisation statistics nor drop units.
        """
        super().train(mode)
        if mode:
            for module in self.encoder.modules():
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()
        return self

    # ------------------------------------------------------------------ forward
    def embed(self, batch: Any) -> torch.Tensor:
        """Crystal embeddings (B, out_dim) as float32 (no autograd through a fully frozen encoder)."""
        if self._encoder_frozen:
            with torch.no_grad():
                return self.encoder(batch).float()
        return self.encoder(batch).float()

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """Raw head outputs per target (standardised mean and variance pre-activation, or logits)."""
        emb = self.embed(batch)
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return {name: head(emb) for name, head in self.heads.items()}

    def _mean_var(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return raw[:, 0], F.softplus(raw[:, 1]) + MIN_VARIANCE

    def loss(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum over targets of the per-target loss over labelled rows only.

        Args:
            outputs: :meth:`forward` output.
            labels: (B, K) labels in label units, K in head order, NaN = missing.

        Returns:
            The total loss and each target's loss (exactly 0 for a target with no label in the batch).

        """
        if labels.ndim == 1:
            labels = labels[:, None]
        labels = labels.float()
        total = labels.new_zeros(())
        parts: dict[str, torch.Tensor] = {}
        cfg = self.config["loss"]
        for k, t in enumerate(self._targets):
            raw = outputs[t.name].float()
            y = labels[:, k]
            valid = torch.isfinite(y)
            w = valid.to(raw.dtype)
            n = w.sum().clamp(min=1.0)
            if t.kind == "regression":
                z = torch.where(valid, self.normalize(t.name, y), torch.zeros_like(y))
                mu, var = self._mean_var(raw)
                if cfg["regression_loss"] == "beta_nll":
                    nll = 0.5 * (torch.log(var) + (z - mu) ** 2 / var)
                    per = nll * var.detach() ** cfg["beta"] if cfg["beta"] else nll
                else:
                    per = (z - mu).abs() + 0.5 * (torch.log(var) + (z - mu.detach()) ** 2 / var)
            else:
                yc = torch.where(valid, y, torch.zeros_like(y)).round().long()
                if bool(((yc < 0) | (yc >= t.num_classes))[valid].any()):
                    bad = y[valid & ((yc < 0) | (yc >= t.num_classes))][:5].tolist()
                    raise ValueError(f"target {t.name!r}: labels {bad} outside 0..{t.num_classes - 1}")
                per = F.cross_entropy(raw, yc, reduction="none")
            parts[t.name] = (per * w).sum() / n
            total = total + t.weight * parts[t.name]
        return total, parts

    def postprocess(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Predictions in label units from :meth:`forward` outputs.

        Regression: ``<name>`` (mean) and ``<name>_std``; classification: ``<name>`` (class index) and
        ``<name>_prob`` (its probability).
        """
        out: dict[str, torch.Tensor] = {}
        for t in self._targets:
            raw = outputs[t.name].float()
            if t.kind == "regression":
                mu, var = self._mean_var(raw)
                out[t.name] = self.denormalize(t.name, mu.double()).float()
                out[f"{t.name}_std"] = (var.double().sqrt() * self.heads[t.name].std).float()
            else:
                prob = raw.softmax(-1)
                p, c = prob.max(-1)
                out[t.name] = c
                out[f"{t.name}_prob"] = p
        return out

    @torch.no_grad()
    def predict(self, batch: Any) -> dict[str, torch.Tensor]:
        """Predictions in label units for a batch (eval mode, no gradients); see :meth:`postprocess`."""
        was = self.training
        self.eval()
        try:
            return self.postprocess(self(batch))
        finally:
            self.train(was)

    def predict_records(self, records: Sequence[Any], batch_size: int = 256) -> dict[str, np.ndarray]:
        """Predictions for :class:`~mmmat.data.schema.MaterialRecord`, pymatgen Structure or ASE Atoms inputs.

        Returns numpy arrays keyed as in :meth:`postprocess`.
        """
        from mmmat.data.batch import Collator
        from mmmat.data.schema import as_records

        recs = as_records(records)
        collate = Collator(cutoff=self.config["cutoff"])
        dev = next(self.parameters()).device
        chunks: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(recs), batch_size):
            pred = self.predict(collate(recs[start : start + batch_size]).to(dev))
            for k, v in pred.items():
                chunks.setdefault(k, []).append(v.cpu().numpy())
        if not chunks:
            return {k: np.zeros(0) for k in self.postprocess(self._empty_outputs())}
        return {k: np.concatenate(v) for k, v in chunks.items()}

    def _empty_outputs(self) -> dict[str, torch.Tensor]:
        return {
            t.name: torch.zeros(0, 2 if t.kind == "regression" else int(t.num_classes)) for t in self._targets
        }

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` (targets, normalisation, encoder config, source fingerprint) and weights."""
        from mmmat.modelio import write_model_dir

        config = dict(self.config, format=FORMAT, version=1, normalization=self.normalization,
                      metadata=metadata or {})
        return write_model_dir(path, config, self)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> PropertyModel:
        """Rebuild a model written by :meth:`save_pretrained` (no pickle is loaded)."""
        from mmmat.modelio import load_weights, read_model_config

        config = read_model_config(path, FORMAT)
        head, loss = config["head"], config["loss"]
        model = cls(
            config["encoder"], config["targets"], head_hidden=head["hidden"], head_layers=head["layers"],
            dropout=head["dropout"], regression_loss=loss["regression_loss"], beta=loss["beta"],
            cutoff=config["cutoff"], source=config.get("source"),
        )
        load_weights(model, path)
        model.metadata = config.get("metadata", {})
        return model.to(map_location).eval()
