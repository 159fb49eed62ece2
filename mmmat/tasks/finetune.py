"""Property fine-tuning: a :class:`~mmmat.heads.property.PropertyModel` trained with Lightning.

    python train.py fit --config configs/finetune/tiny.yaml
    python train.py fit --config configs/finetune/mp20p_formation.yaml --model.init_args.pretrained=DIR
    python train.py test --config configs/finetune/mp20p_formation.yaml --ckpt_path runs/.../last.ckpt

The target columns are named once, in ``model.targets``; the data module carries every property column of
the shard manifest by default (``data.properties`` unset), and :meth:`PropertyFinetuning.setup` checks the
targets against the manifest. Metrics per target: MAE, RMSE, R² (regression; plus the Gaussian NLL and the
share of test labels within one predicted standard deviation), accuracy (classification). At test time,
and for the last validation at the end of fit, a parity plot per target, a metrics JSON and the
predictions (CSV) are written into the logger's folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch

from mmmat.data.batch import MultimodalBatch
from mmmat.encoders.registry import EncoderConfig, encoder_spec
from mmmat.heads.property import PropertyModel, parse_targets, select_labelled
from mmmat.tasks.pretrain import _id_hash, _unique_first
from mmmat.tasks.schedule import adamw_param_groups, start_epoch, warmup_cosine


class PropertyFinetuning(pl.LightningModule):
    """LightningModule for property prediction from crystals, from scratch or from a pretrained encoder.

    Args:
        targets: Property columns (regression) or ``{name, kind, num_classes, weight}`` dicts.
        pretrained: Folder of a saved :class:`~mmmat.latent.model.MultimodalModel`; its crystal encoder is
            fine-tuned. None trains from scratch with ``encoder``.
        encoder: Typed encoder config (YAML ``class_path: mmmat.encoders.crystal.CrystalEncoderConfig`` with
            ``init_args``), used only without ``pretrained``; kept in the hyperparameters in the plain form.
        mode: ``linear_probe`` (encoder frozen, heads trained), ``partial`` (the last ``unfreeze_last``
            interaction blocks and the readout train) or ``full`` (everything trains).
        unfreeze_last: Interaction blocks unfrozen in ``partial`` mode.
        encoder_lr_ratio: Encoder learning rate as a fraction of ``lr`` (``partial`` and ``full``).
        lr: Peak learning rate of the heads (AdamW).
        weight_decay: AdamW weight decay (not on norms and biases).
        warmup_steps: Linear warm-up steps.
        max_steps: Steps of the cosine decay (default: the trainer's estimate).
        min_lr_ratio: Final learning rate as a fraction of the peak.
        head_hidden: Width of the heads' hidden layers.
        head_layers: Linear layers per head (1 = linear).
        dropout: Dropout in the heads.
        regression_loss: ``beta_nll`` or ``l1`` (see :class:`PropertyModel`).
        beta: β of β-NLL (0 = Gaussian NLL).
        train_fraction: Train on this fraction of the labelled training materials.
        max_train_labels: Train on at most this many labelled training materials: the first N of a
            permutation of the labelled ones by ``subset_seed``
            (:func:`~mmmat.heads.property.select_labelled`).
        subset_seed: Seed of that permutation.
        layer_decay: Layer-wise learning-rate decay of the encoder: the readout learns at ``encoder_lr_ratio``
            × ``lr``, each interaction block below it at ``layer_decay`` times the one above, the atom
            embedding and radial basis at the bottom (see :func:`encoder_layer_id`). None: one rate.
        head_warmup_steps: For the first steps only the heads learn (the encoder's learning rate is 0), so
            that randomly initialised heads do not send large gradients into a pretrained encoder.
        l2_sp: Weight of a penalty on the squared distance of the encoder's trainable weights from their
            pretrained values, ``l2_sp · Σ (θ - θ₀)²`` (L2-SP: fine-tuning stays near what pretraining found).
            When positive it replaces the encoder's weight decay, which pulls toward zero instead. Needs
            ``pretrained``; 0 (default): off.
        shrink_perturb: ``[shrink, perturb]``: start every weight matrix of the pretrained encoder (linear,
            embedding; not biases or norms) at ``shrink · θ_pretrained + perturb · θ_fresh``, with ``θ_fresh`` the
            same layer of a fresh initialisation drawn from ``seed`` (shrink and perturb: Ash & Adams 2020, for
            warm starts that generalise worse than cold ones). Needs ``pretrained``; None (default): off.
        aux_objectives: The pretraining objectives (:mod:`mmmat.latent.objectives`) kept as auxiliary losses,
            ``{"denoise": {"weight": 0.1}}``; their heads start from the pretrained folder's
            ``objectives.safetensors`` when it has them.
        save_dir: Where the model is saved at the end of fit (default: the logger's folder + ``/model``).
        seed: Random state is reseeded from (seed, epoch, rank) at every epoch start.

    """

    def __init__(
        self,
        targets: list[str | dict[str, Any]],
        pretrained: str | None = None,
        encoder: EncoderConfig | None = None,
        mode: Literal["linear_probe", "partial", "full"] = "full",
        unfreeze_last: int = 1,
        encoder_lr_ratio: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.01,
        head_hidden: int = 256,
        head_layers: int = 2,
        dropout: float = 0.0,
        regression_loss: Literal["beta_nll", "l1"] = "beta_nll",
        beta: float = 0.5,
        train_fraction: float = 1.0,
        max_train_labels: int | None = None,
        subset_seed: int = 0,
        layer_decay: float | None = None,
        head_warmup_steps: int = 0,
        l2_sp: float = 0.0,
        shrink_perturb: list[float] | None = None,
        aux_objectives: dict[str, dict[str, Any]] | None = None,
        save_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        encoder = encoder_spec(encoder) if encoder is not None else None  # plain hyperparameters
        # not merged into the logger's hparams by Lightning: ``mode`` would clash with the data module's
        # ``mode`` (on_fit_start logs them under ``finetune``)
        self.save_hyperparameters(logger=False)
        self.targets = parse_targets(targets)
        head = dict(head_hidden=head_hidden, head_layers=head_layers, dropout=dropout,
                    regression_loss=regression_loss, beta=beta)
        if pretrained is not None:
            self.model = PropertyModel.from_multimodal(pretrained, self.targets, **head)
        elif encoder is not None:
            self.model = PropertyModel(encoder, self.targets, **head)
        else:
            raise ValueError("give model.pretrained (a folder written by save_pretrained) or model.encoder")
        self.model.set_trainable(mode, unfreeze_last)
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must lie in (0, 1], got {layer_decay}")
        if head_warmup_steps < 0:
            raise ValueError(f"head_warmup_steps must be >= 0, got {head_warmup_steps}")
        if l2_sp < 0 or (l2_sp > 0 and pretrained is None):
            raise ValueError(f"l2_sp must be >= 0, and positive only with model.pretrained (got {l2_sp})")
        if shrink_perturb is not None:
            self._shrink_perturb(shrink_perturb, pretrained, seed)
        # the pretrained values of the encoder's trainable weights, for l2_sp (not saved with the model)
        self._sp_ref: list[tuple[str, str]] = []
        if l2_sp > 0:
            for i, (name, p) in enumerate(self.model.encoder.named_parameters()):
                if p.requires_grad:
                    self.register_buffer(f"_sp_ref_{i}", p.detach().clone(), persistent=False)
                    self._sp_ref.append((name, f"_sp_ref_{i}"))
        self.aux = torch.nn.ModuleDict()
        if aux_objectives:
            from mmmat.latent.objectives import create_objective

            gnn = getattr(self.model.encoder, "gnn", self.model.encoder)
            for name, cfg in aux_objectives.items():
                self.aux[name] = create_objective(name, hidden=gnn.hidden, cutoff=gnn.cutoff, **(cfg or {}))
            self._load_aux_heads(pretrained)
        self.num_train_labels: int | None = None
        self._eval: list[dict[str, Any]] = []
        self.last_val: dict[str, Any] | None = None

    def _shrink_perturb(self, values: list[float], pretrained: str | None, seed: int) -> None:
        """Shrink the pretrained encoder's weight matrices toward 0 and add a fresh initialisation's (see init)."""
        if pretrained is None:
            raise ValueError("shrink_perturb needs model.pretrained (it rescales pretrained weights)")
        if len(values) != 2 or not all(math.isfinite(float(v)) and float(v) >= 0 for v in values):
            raise ValueError(f"shrink_perturb must be [shrink, perturb], two numbers >= 0, got {values}")
        from mmmat.encoders import create_encoder

        shrink, perturb = (float(v) for v in values)
        cfg = dict(self.model.config["encoder"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = dict(create_encoder(cfg.pop("name"), **cfg).named_parameters())
        with torch.no_grad():
            for name, p in self.model.encoder.named_parameters():
                if p.dim() >= 2:
                    p.mul_(shrink).add_(fresh[name].to(p.dtype), alpha=perturb)

    def _load_aux_heads(self, pretrained: str | None) -> None:
        """Start the auxiliary heads from the pretraining's, when the pretrained folder holds them."""
        path = Path(pretrained) / "objectives.safetensors" if pretrained else None
        if path is None or not path.exists():
            return
        from safetensors.torch import load_file

        state = load_file(str(path))
        for name, obj in self.aux.items():
            own = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
            if own:
                obj.load_state_dict(own)

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        """Check the targets against the data; on fit, pick the training subset and fit the normalisation."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "manifest"):
            return
        self._check_columns(dm.manifest.get("property_columns", []), list(dm.properties), dm.hparams.shards)
        cutoff = getattr(self.model.encoder, "cutoff", None)
        if dm.hparams.build_graph and cutoff is not None and dm.hparams.cutoff < cutoff:
            raise ValueError(
                f"data.cutoff {dm.hparams.cutoff} Å is shorter than the encoder's cutoff {cutoff} Å: "
                f"set data.cutoff >= {cutoff}"
            )
        if stage != "fit":
            return
        split = dm.hparams.train_split
        records = dm.records(split)
        names = self.model.target_names
        labels = np.array([[r.properties.get(n, math.nan) for n in names] for r in records], dtype=np.float64)
        h = self.hparams
        idx = select_labelled(labels, h.max_train_labels, h.train_fraction, h.subset_seed)
        if len(idx) == 0:
            raise ValueError(f"no material of split {split!r} has a label for {names}")
        subset = h.max_train_labels is not None or h.train_fraction < 1.0
        if dm.hparams.mode == "stream":
            if subset:
                raise ValueError("train_fraction / max_train_labels need data.mode memory or resident")
        elif len(idx) < len(records):
            # the data module serves the selected (labelled) records from now on
            dm._records[split] = [records[i] for i in idx]
            dm._resident.pop(split, None)
        self.num_train_labels = int(len(idx))
        self.model.fit_normalization(labels[idx])

    def _check_columns(self, available: list[str], carried: list[str], shards: str) -> None:
        for t in self.targets:
            if t.name not in available:
                raise ValueError(
                    f"target column {t.name!r} is not in {shards}/manifest.json; "
                    f"available columns: {available}"
                )
            if t.name not in carried:
                raise ValueError(
                    f"target column {t.name!r} is not among data.properties {carried}: add it, or leave "
                    "data.properties unset to carry every column"
                )

    def on_fit_start(self) -> None:
        """Log the hyperparameters under ``finetune`` (with the number of training labels)."""
        if self.logger is not None:
            hp = {**dict(self.hparams), "num_train_labels": self.num_train_labels}
            self.logger.log_hyperparams({"finetune": hp})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the number of training labels with the checkpoint."""
        checkpoint["num_train_labels"] = self.num_train_labels

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the number of training labels."""
        self.num_train_labels = checkpoint.get("num_train_labels", self.num_train_labels)

    def on_train_epoch_start(self) -> None:
        """Let streaming loaders know the epoch; reseed from (seed, epoch, rank)."""
        start_epoch(self)

    # ------------------------------------------------------------------ steps
    def _labels(self, batch: MultimodalBatch) -> torch.Tensor:
        """(B, K) labels in target order from the batch's property columns."""
        names = list(batch.property_names)
        missing = [t.name for t in self.targets if t.name not in names]
        if missing:
            raise ValueError(f"target columns {missing} are not in the batch (columns: {names})")
        cols = torch.tensor([names.index(t.name) for t in self.targets], device=batch.properties.device)
        return batch.properties.index_select(1, cols).float()

    def training_step(self, batch: MultimodalBatch, batch_idx: int) -> torch.Tensor:
        """One step: the masked loss over every target."""
        labels = self._labels(batch)
        loss, parts = self.model.loss(self.model(batch), labels)
        bs = len(batch)
        if len(self.aux):
            gnn = getattr(self.model.encoder, "gnn", self.model.encoder)
            for name, obj in self.aux.items():
                crystal, target = obj.corrupt(batch.crystal)
                value = obj.loss(crystal, gnn.node_features(crystal), target)
                self.log(f"train/aux_{name}", value, batch_size=bs)
                loss = loss + obj.weight * value
        if self._sp_ref:
            params = dict(self.model.encoder.named_parameters())
            sp = torch.stack([(params[n] - getattr(self, ref)).pow(2).sum() for n, ref in self._sp_ref]).sum()
            self.log("train/l2_sp", sp, batch_size=bs)
            loss = loss + self.hparams.l2_sp * sp
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if len(parts) > 1:
            for name, v in parts.items():
                self.log(f"train/{name}_loss", v, batch_size=bs)
        return loss

    def _eval_step(self, batch: MultimodalBatch, stage: str) -> None:
        labels = self._labels(batch)
        out = self.model(batch)
        loss, _ = self.model.loss(out, labels)
        self.log(f"{stage}/loss", loss, batch_size=len(batch), sync_dist=True)
        pred = self.model.postprocess(out)
        self._eval.append(
            {"hash": torch.tensor([_id_hash(m) for m in batch.material_ids], device=self.device),
             "ids": list(batch.material_ids), "labels": labels.detach(),
             "pred": {k: v.detach() for k, v in pred.items()}}
        )

    def validation_step(self, batch: MultimodalBatch, batch_idx: int) -> None:
        """Predict and keep the batch for the epoch-end metrics."""
        self._eval_step(batch, "val")

    def test_step(self, batch: MultimodalBatch, batch_idx: int) -> None:
        """Predict and keep the batch for the epoch-end metrics and files."""
        self._eval_step(batch, "test")

    def _collect(self) -> dict[str, Any] | None:
        """Every evaluated row, gathered across ranks, sampler duplicates removed; numpy arrays."""
        if not self._eval:
            return None
        hashes = torch.cat([v["hash"] for v in self._eval])
        labels = torch.cat([v["labels"] for v in self._eval])
        keys = list(self._eval[0]["pred"])
        pred = {k: torch.cat([v["pred"][k] for v in self._eval]) for k in keys}
        ids = [m for v in self._eval for m in v["ids"]]
        self._eval.clear()
        if self.trainer.world_size > 1:
            hashes = self.all_gather(hashes).reshape(-1)
            labels = self.all_gather(labels).reshape(-1, labels.shape[-1])
            pred = {k: self.all_gather(v).reshape(-1) for k, v in pred.items()}
            gathered: list[list[str]] = [[] for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather_object(gathered, ids)
            ids = [m for part in gathered for m in part]
        _, first = _unique_first(hashes)
        first = first.sort().values
        keep = first.cpu().numpy()
        return {
            "ids": [ids[i] for i in keep] if len(ids) == len(hashes) else [],
            "labels": labels[first].double().cpu().numpy(),
            "pred": {k: v[first].double().cpu().numpy() for k, v in pred.items()},
        }

    def _metrics(self, data: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        score: list[float] = []
        norm = self.model.normalization
        for k, t in enumerate(self.targets):
            y = data["labels"][:, k]
            ok = np.isfinite(y)
            if not ok.any():
                continue
            p = data["pred"][t.name][ok]
            y = y[ok]
            out[f"{t.name}_n"] = float(ok.sum())
            if t.kind == "regression":
                m = regression_metrics(y, p, data["pred"][f"{t.name}_std"][ok])
                out.update({f"{t.name}_{key}": v for key, v in m.items()})
                score.append(m["mae"] / norm[t.name]["std"])
            else:
                acc = float((p == y.round()).mean())
                out[f"{t.name}_acc"] = acc
                score.append(1.0 - acc)
        if score:
            out["score"] = float(np.mean(score))
        return out

    def _epoch_end(self, stage: str) -> None:
        data = self._collect()
        if data is None:
            return
        metrics = self._metrics(data)
        for k, v in metrics.items():
            if math.isfinite(v) and not k.endswith("_n"):
                self.log(f"{stage}/{k}", v, rank_zero_only=True, sync_dist=False)
        result = {"metrics": metrics, "data": data}
        if stage == "val":
            self.last_val = result
        elif self.trainer.is_global_zero:
            self.write_report(result, "test")

    def on_validation_epoch_end(self) -> None:
        """MAE, RMSE, R², NLL and 1σ coverage (regression), accuracy (classification) over the split."""
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        """Metrics over the test split; parity plots, metrics JSON and predictions CSV in the log folder."""
        self._epoch_end("test")

    # ------------------------------------------------------------------ outputs
    def _out_dir(self) -> Path:
        return Path(self.trainer.log_dir or self.trainer.default_root_dir or ".")

    def write_report(self, result: dict[str, Any], stage: str, out_dir: str | Path | None = None) -> Path:
        """Write ``<stage>_metrics.json``, ``<stage>_predictions.csv`` and ``parity_<stage>_<target>.png``."""
        out = Path(out_dir) if out_dir is not None else self._out_dir()
        out.mkdir(parents=True, exist_ok=True)
        data, metrics = result["data"], result["metrics"]
        doc = {
            "stage": stage,
            "targets": [t.to_dict() for t in self.targets],
            "metrics": metrics,
            "normalization": self.model.normalization,
            "mode": self.hparams.mode,
            "pretrained": self.hparams.pretrained,
            "source_fingerprint": (self.model.config.get("source") or {}).get("fingerprint"),
            "num_train_labels": self.num_train_labels,
            "global_step": int(self.global_step),
        }
        (out / f"{stage}_metrics.json").write_text(json.dumps(doc, indent=1))
        self._write_predictions(data, out / f"{stage}_predictions.csv")
        for k, t in enumerate(self.targets):
            if t.kind == "regression":
                parity_plot(
                    data["labels"][:, k], data["pred"][t.name], data["pred"][f"{t.name}_std"],
                    out / f"parity_{stage}_{t.name}.png", t.name, metrics,
                )
            else:
                confusion_plot(data["labels"][:, k], data["pred"][t.name],
                               out / f"parity_{stage}_{t.name}.png", t.name, t.num_classes, metrics)
        return out

    def _write_predictions(self, data: dict[str, Any], path: Path) -> None:
        import pandas as pd

        cols: dict[str, Any] = {}
        if data["ids"]:
            cols["material_id"] = data["ids"]
        for k, t in enumerate(self.targets):
            cols[f"{t.name}_true"] = data["labels"][:, k]
            cols[t.name] = data["pred"][t.name]
            extra = f"{t.name}_std" if t.kind == "regression" else f"{t.name}_prob"
            cols[extra] = data["pred"][extra]
        pd.DataFrame(cols).to_csv(path, index=False)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        """AdamW with linear warm-up and cosine decay; the encoder at ``encoder_lr_ratio`` × ``lr``."""
        h = self.hparams
        n_blocks = len(getattr(getattr(self.model.encoder, "gnn", self.model.encoder), "blocks", []))
        named = [*self.model.named_parameters(), *(("aux." + n, p) for n, p in self.aux.named_parameters())]

        def part(name: str) -> str:
            return "encoder" if name.startswith("encoder.") else "head"

        def scale(name: str) -> float:
            if part(name) != "encoder":
                return 1.0
            s = h.encoder_lr_ratio
            if h.layer_decay is not None:
                s *= h.layer_decay ** (n_blocks + 1 - encoder_layer_id(name.removeprefix("encoder."), n_blocks))
            return s

        params = adamw_param_groups(named, h.lr, h.weight_decay, lr_scale=scale, part=part)
        if h.l2_sp > 0:  # the encoder is held near its pretrained weights, not pulled toward zero
            for g in params:
                if g["part"] == "encoder":
                    g["weight_decay"] = 0.0
        opt = torch.optim.AdamW(params, lr=h.lr, betas=(0.9, 0.999))
        return warmup_cosine(self, opt)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Head-only warm-up: the encoder's learning rate is 0 for the first ``head_warmup_steps`` steps."""
        if self.global_step < self.hparams.head_warmup_steps:
            for opt in self.trainer.optimizers:
                for g in opt.param_groups:
                    if g.get("part") == "encoder":
                        g["lr"] = 0.0

    def on_fit_end(self) -> None:
        """Save the model (``config.json`` + ``model.safetensors``) and the last validation's report."""
        if not self.trainer.is_global_zero:
            return
        out = self.hparams.save_dir or str(self._out_dir() / "model")
        h = self.hparams
        meta = {"mode": h.mode, "unfreeze_last": h.unfreeze_last, "num_train_labels": self.num_train_labels,
                "train_fraction": h.train_fraction, "max_train_labels": h.max_train_labels,
                "subset_seed": h.subset_seed, "global_step": int(self.global_step)}
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "hparams"):
            meta["shards"] = str(dm.hparams.shards)
        if self.last_val is not None:
            meta["val_metrics"] = self.last_val["metrics"]
            self.write_report(self.last_val, "val")
        self.model.save_pretrained(out, metadata=meta)


def encoder_layer_id(name: str, num_blocks: int) -> int:
    """Depth of an encoder parameter for layer-wise decay: 0 at the input, ``num_blocks + 1`` at the readout.

    The atom embedding and radial basis are layer 0, interaction block i is layer i + 1, and everything after
    the blocks (final norm, global features, readout, fusion) is the top layer. A diffraction branch beside the
    graph branch (``crystal/schnet_xrd``) counts as one layer just below the top.
    """
    parts = name.split(".")
    if parts[0] == "gnn":
        parts = parts[1:]
    elif parts[0] == "xrd":
        return num_blocks
    if parts[0] in ("embedding", "rbf", "radial"):
        return 0
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1]) + 1
    return num_blocks + 1


def regression_metrics(y: np.ndarray, pred: np.ndarray, std: np.ndarray | None = None) -> dict[str, float]:
    """MAE, RMSE and R² of ``pred`` against ``y``; with ``std``: mean Gaussian NLL and the share within 1σ."""
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    err = pred - y
    ss_tot = float(((y - y.mean()) ** 2).sum())
    out = {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "r2": 1.0 - float((err**2).sum()) / ss_tot if ss_tot > 0 else math.nan,
    }
    if std is not None:
        s = np.maximum(np.asarray(std, dtype=np.float64), 1e-12)
        out["nll"] = float(np.mean(0.5 * np.log(2 * math.pi * s**2) + 0.5 * (err / s) ** 2))
        out["within_1std"] = float((np.abs(err) <= s).mean())
    return out


def parity_plot(
    y: np.ndarray, pred: np.ndarray, std: np.ndarray | None, path: str | Path, name: str,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Predicted against true values (points coloured by the predicted std), with the y = x line; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    ok = np.isfinite(y) & np.isfinite(pred)
    fig, ax = plt.subplots(figsize=(4.5, 4.2), dpi=120)
    c = None if std is None else np.asarray(std, dtype=np.float64)[ok]
    sc = ax.scatter(y[ok], pred[ok], s=4, c=c, cmap="viridis", alpha=0.6, linewidths=0)
    if c is not None and ok.any():
        fig.colorbar(sc, ax=ax, label="predicted std")
    if ok.any():
        lo, hi = float(min(y[ok].min(), pred[ok].min())), float(max(y[ok].max(), pred[ok].max()))
        pad = 0.03 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
    m = metrics or {}
    title = name
    if f"{name}_mae" in m:
        mae, rmse, r2 = m[f"{name}_mae"], m[f"{name}_rmse"], m[f"{name}_r2"]
        title += f"\nMAE {mae:.4g}  RMSE {rmse:.4g}  R² {r2:.3f}  n={int(ok.sum())}"
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(f"true {name}")
    ax.set_ylabel(f"predicted {name}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def confusion_plot(
    y: np.ndarray, pred: np.ndarray, path: str | Path, name: str, num_classes: int,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Confusion matrix (true rows, predicted columns, log counts) of a classification target; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = np.isfinite(y)
    cm = np.zeros((num_classes, num_classes))
    np.add.at(cm, (y[ok].round().astype(int), np.asarray(pred)[ok].astype(int)), 1)
    fig, ax = plt.subplots(figsize=(4.5, 4.2), dpi=120)
    ax.imshow(np.log1p(cm), cmap="viridis", origin="lower")
    acc = (metrics or {}).get(f"{name}_acc")
    ax.set_title(name + (f"\naccuracy {acc:.3f}" if acc is not None else ""), fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
