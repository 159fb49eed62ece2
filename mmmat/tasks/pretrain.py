"""Contrastive pretraining of a :class:`~mmmat.latent.model.MultimodalModel` with Lightning.

Every step: XRD profiles are re-rendered from the stored peaks with the augmentations real patterns need
(strain, zero shift, broadening, intensity jitter, background, noise), every modality is encoded, and the
contrastive loss aligns the modalities (to the crystal by default). Validation embeds the whole validation
pool (gathered across ranks, duplicates from sampler padding removed) and logs cross-modal retrieval
(R@1, R@5, R@10, median rank) for every ordered pair of modalities present.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from mmmat.data.batch import MultimodalBatch
from mmmat.encoders.registry import EncoderConfig, encoder_spec
from mmmat.latent.losses import MultimodalContrastiveLoss, feature_spread_loss
from mmmat.latent.model import MultimodalModel
from mmmat.tasks.schedule import adamw_param_groups, start_epoch, warmup_cosine

#: Step optimisations of :class:`ContrastivePretraining` (``engine:`` in the config), each on by default except
#: ``compile``; every one leaves what the step computes unchanged (tests/test_pretrain_engine.py).
ENGINE_DEFAULTS: dict[str, bool | str] = {
    # the crystal encoder's computed powder pattern, once per crystal when the data are loaded (resident
    # data, no crystal_augment), instead of every step
    "precompute_patterns": True,
    # no host reads in the step: text rows known on the host, full attention masks, no presence tests, and the
    # logged values copied to the host in one asynchronous copy on the steps the loggers write, and written to
    # the loggers (with the step they belong to) once the copy has landed, at most a few logging intervals
    # late; whatever is still on its way is written at the epoch's end
    "sync_free": True,
    # AdamW as one fused kernel per parameter group (CUDA)
    "fused_adamw": True,
    # torch.compile of every encoder's network (fewer kernels and less Python per step)
    "compile": False,
    # the whole step (augmentation, encoders, losses) on batches padded to fixed capacities, compiled as one
    # graph and replayed as CUDA graphs (mmmat.tasks.static_step); replaces ``compile``; under DDP each rank
    # captures its own step, with the cross-rank gathers of the contrastive loss between the graphs
    "cuda_graphs": False,
    # also compile the powder-pattern CNN (under ``compile`` or ``cuda_graphs``); off: it runs eager, because
    # compiled inside the captured step under bf16 autocast its loss went NaN on an H200 (torch 2.11;
    # benchmarks/results/pretrain_cnn_nan_probe.json); ``"fp32"``: compiled, with the CNN itself computed in
    # float32 (autocast off inside it; everything compiled in float32 stayed finite)
    "compile_pattern_cnn": False,
}
#: engine options that take a string besides true / false
ENGINE_CHOICES: dict[str, tuple[str, ...]] = {"compile_pattern_cnn": ("fp32",)}


class _PendingLogs:
    """Logged values on their way from the device to the host, written to the loggers once they have landed.

    Each entry is one written step's values: ``(step, epoch, names, host, event)``, where ``host`` holds the
    values (in the order of ``names``) and ``event`` is recorded after their copy (None: already on the host).
    :meth:`write` never waits unless asked to or more than ``capacity`` entries are pending (then for the oldest
    ones, which happens only when the device runs that many logging intervals behind the host).
    """

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self.entries: deque[tuple[int, int, list[str], torch.Tensor, Any]] = deque()

    @staticmethod
    def copy_to_host(values: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying ``values`` into a pinned host buffer; the buffer and an event that marks the copy's end."""
        if values.device.type != "cuda":
            return values, None
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def push(self, step: int, epoch: int, names: list[str], host: torch.Tensor, event: Any) -> None:
        """Queue one step's values, their copy started (:meth:`copy_to_host`)."""
        self.entries.append((step, epoch, names, host, event))

    def write(self, loggers: list[Any], wait: bool = False) -> list[dict[str, float]]:
        """Write every entry whose copy has landed to ``loggers``, oldest first, each with its own step.

        ``wait``: every entry, waiting for the copies. Returns the written metrics, in order.
        """
        written = []
        while self.entries:
            event = self.entries[0][4]
            landed = event is None or event.query()
            if not landed and not wait and len(self.entries) <= self.capacity:
                break
            step, epoch, names, host, _ = self.entries.popleft()
            if not landed:
                event.synchronize()
            metrics: dict[str, float] = {"epoch": epoch, **dict(zip(names, host.tolist(), strict=True))}
            for logger in loggers:
                logger.log_metrics(metrics, step=step)
                logger.save()
            written.append(metrics)
        return written


def _id_hash(material_id: str) -> int:
    return int(hashlib.sha1(material_id.encode("utf-8")).hexdigest()[:15], 16)


class ContrastivePretraining(pl.LightningModule):
    """LightningModule for multimodal contrastive pretraining.

    Args:
        encoders: modality -> typed encoder config (YAML ``class_path: mmmat.encoders.<module>.<Encoder>Config``
            with ``init_args``; see :mod:`mmmat.encoders.registry`); kept in the hyperparameters in the plain
            form ``{"name": ..., **kwargs}`` that :class:`MultimodalModel` stores.
        embed_dim: Shared latent dimension.
        projection: ``linear`` or ``mlp`` projection heads.
        loss_mode: ``anchor`` (every modality aligned to ``anchor``) or ``all_pairs``.
        loss_kind: ``clip`` (InfoNCE) or ``siglip``.
        anchor: Anchor modality for ``anchor`` mode.
        loss_weights: Optional weight per pair (``"crystal-xrd"``) or per modality.
        lr: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay (not applied to norms, biases and the logit scale).
        warmup_steps: Linear warm-up steps.
        max_steps: Steps of the cosine decay (default: the trainer's estimate).
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        lr_scale: Optional learning-rate multiplier per modality (``{"literature_text": 0.1}``): the modality's
            encoder and projection train at ``lr`` times it; the rest at ``lr``.
        xrd_augment: Keyword arguments of :class:`mmmat.data.augment.XRDAugment`, or None for no augmentation
            (the same as ``augment: {xrd: ...}``).
        crystal_augment: Optional training-time perturbation of the crystals: ``{"displacement": σ in Å
            (Gaussian noise on every atom), "strain": largest |ε| of a random symmetric strain of the cell}``
            (:class:`mmmat.data.augment.CrystalAugment`; the same as ``augment: {crystal: ...}``).
            Small distortions should not move a crystal in the latent space; they keep the crystal encoder
            from memorising exact coordinates of the training set. None (default) leaves crystals untouched.
        augment: Training augmentation per modality: ``{modality: keyword arguments of its spec's augmenter}``
            (:meth:`mmmat.modalities.ModalitySpec.augmenter`), applied in the registry's order to the
            modalities the model encodes; ``xrd_augment`` and ``crystal_augment`` are entries of it.
        engine: Step optimisations, by name (see :data:`ENGINE_DEFAULTS`): ``{"compile": true}`` turns one on,
            ``{"fused_adamw": false}`` one off; unknown names are an error.
        objectives: Structural self-supervision beside the contrastive loss, by registered name
            (:mod:`mmmat.latent.objectives`): ``{"denoise": {"weight": 1.0, "sigma_max": 0.3},
            "masked_atoms": {"weight": 0.5}}``. Each runs the crystal encoder's graph branch on a corrupted copy
            of the batch's crystals and adds ``weight`` × its loss.
        feature_spread: Keep the crystal encoder's output features (what property heads read) from collapsing
            onto a few directions: ``{"weight": w, "gamma": 1.0, "decorrelation": 1.0}`` adds ``w`` ×
            :func:`mmmat.latent.losses.feature_spread_loss` of the batch's crystal features before projection.
            Contrastive pretraining alone halves their effective rank (benchmarks/results/feature_probe.json).
            None (default) adds nothing.
        save_heads: Also write the objectives' heads (``objectives.safetensors`` + ``objectives.json``) beside
            the saved model; the model itself never carries them.
        mixture_loss_weight: Weight of the multi-label objective on mixed XRD patterns (``xrd_augment`` with
            ``p_mixture`` > 0): every pattern is scored against every crystal of the batch,
            ``σ(s · x·c + b)`` with a learned scale s and bias b (SigLIP-style), and trained by binary
            cross-entropy to say which crystals are phases of the pattern.  0 turns it off.
        save_dir: Where ``save_pretrained`` writes the model at the end of fit (default: the logger's folder
            + ``/model``).
        seed: Random state (augmentations, dropout) is reseeded from (seed, epoch, rank) at every epoch
            start, so a run resumed from an end-of-epoch checkpoint continues exactly as if uninterrupted.
    """

    def __init__(
        self,
        encoders: dict[str, EncoderConfig],
        embed_dim: int = 256,
        projection: str = "linear",
        loss_mode: str = "anchor",
        loss_kind: str = "clip",
        anchor: str = "crystal",
        loss_weights: dict[str, float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 200,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.05,
        lr_scale: dict[str, float] | None = None,
        xrd_augment: dict[str, Any] | None = None,
        crystal_augment: dict[str, float] | None = None,
        augment: dict[str, dict[str, Any]] | None = None,
        engine: dict[str, bool | str] | None = None,
        objectives: dict[str, dict[str, Any]] | None = None,
        feature_spread: dict[str, float] | None = None,
        save_heads: bool = False,
        mixture_loss_weight: float = 0.0,
        save_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        encoders = {modality: encoder_spec(cfg) for modality, cfg in encoders.items()}  # plain hyperparameters
        self.save_hyperparameters()
        unknown_engine = sorted(set(engine or {}) - set(ENGINE_DEFAULTS))
        if unknown_engine:
            raise ValueError(f"engine: unknown options {unknown_engine} (have {sorted(ENGINE_DEFAULTS)})")
        self.engine = {**ENGINE_DEFAULTS, **(engine or {})}
        for key, value in self.engine.items():
            choices = ENGINE_CHOICES.get(key, ())
            if not isinstance(value, bool) and value not in choices:
                alternatives = "".join(f" or {c!r}" for c in choices)
                raise ValueError(f"engine.{key} must be true or false{alternatives}, got {value!r}")
        self.model = MultimodalModel(encoders, embed_dim=embed_dim, projection=projection)
        self.loss = MultimodalContrastiveLoss(anchor=anchor, mode=loss_mode, kind=loss_kind, weights=loss_weights)
        self.objectives = torch.nn.ModuleDict()
        if objectives:
            from mmmat.latent.objectives import create_objective

            if "crystal" not in self.model.encoders:
                raise ValueError("objectives need a crystal encoder")
            enc = self.model.encoders["crystal"]
            gnn = getattr(enc, "gnn", enc)
            for name, cfg in objectives.items():
                self.objectives[name] = create_objective(name, hidden=gnn.hidden, cutoff=gnn.cutoff, **(cfg or {}))
        self._crystal_features: torch.Tensor | None = None
        if feature_spread is not None:
            unknown = sorted(set(feature_spread) - {"weight", "gamma", "decorrelation"})
            if unknown:
                raise ValueError(f"feature_spread: unknown options {unknown} (have weight, gamma, decorrelation)")
            if "crystal" not in self.model.encoders:
                raise ValueError("feature_spread needs a crystal encoder")
            self.model.projections["crystal"].register_forward_hook(self._keep_crystal_features)
        unknown_scale = sorted(set(lr_scale or {}) - set(encoders))
        if unknown_scale:
            raise ValueError(f"lr_scale names modalities without an encoder: {unknown_scale} (have {list(encoders)})")
        self.augmenters = self._augmenters(augment, xrd_augment=xrd_augment, crystal_augment=crystal_augment)
        self._val: list[dict[str, Any]] = []
        self._mixture: torch.Tensor | None = None
        self._static: Any = None
        self._pending_logs = _PendingLogs()
        if mixture_loss_weight < 0:
            raise ValueError(f"mixture_loss_weight must be >= 0, got {mixture_loss_weight}")
        if mixture_loss_weight > 0:
            if self.augment is None or self.augment.p_mixture <= 0:
                raise ValueError("mixture_loss_weight needs xrd_augment with p_mixture > 0 (and an xrd encoder)")
            # scale (log) and bias of the multi-label logits, SigLIP's initial values
            self.mixture_logit = torch.nn.Parameter(torch.tensor([math.log(10.0), -10.0]))

    def _augmenters(self, augment: dict[str, dict[str, Any]] | None, **aliases: Any) -> torch.nn.ModuleDict:
        """Each configured modality's augmenter, in the registry's order, for the modalities the model encodes."""
        from mmmat.modalities import get_modality, specs

        config = dict(augment or {})
        for key, kwargs in aliases.items():  # ``xrd_augment`` is ``augment: {xrd: ...}``
            name = key.removesuffix("_augment")
            if kwargs is not None:
                if name in config:
                    raise ValueError(f"augment.{name} and {key} both given: keep one")
                config[name] = kwargs
        for name in config:
            get_modality(name)  # an unknown modality is an error that names the known ones
        out = torch.nn.ModuleDict()
        for spec in specs():
            if config.get(spec.name) is None:
                continue
            aug = spec.augmenter(**config[spec.name])
            if aug is not None and spec.name in self.model.modalities:
                out[spec.name] = aug
        return out

    @property
    def augment(self) -> Any:
        """The XRD augmenter (profiles re-rendered from peaks), or None."""
        return self.augmenters["xrd"] if "xrd" in self.augmenters else None

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        """Take the tokenizer from the data module (text encoders must agree with it)."""
        dm = getattr(self.trainer, "datamodule", None)
        dm_cutoff = getattr(getattr(dm, "hparams", None), "cutoff", None)
        build = getattr(getattr(dm, "hparams", None), "build_graph", True)
        if build and dm_cutoff is not None and dm_cutoff < self.model.config["cutoff"]:
            raise ValueError(
                f"data.cutoff {dm_cutoff} Å is shorter than the crystal encoder's {self.model.config['cutoff']} Å: "
                "the graphs would miss neighbours the encoder expects"
            )
        tok = getattr(dm, "tokenizer", None)
        if tok is not None:
            self.model.tokenizer = tok
            from mmmat.modalities import get_modality

            for m in self.model.modalities:
                if not get_modality(m).is_text:
                    continue
                enc = self.model.encoders[m]
                vocab = getattr(getattr(getattr(enc, "model", None), "config", None), "vocab_size", None)
                if vocab is not None and len(tok) > vocab:
                    raise ValueError(
                        f"the tokenizer has {len(tok)} tokens but the {m} encoder's vocabulary is {vocab}: set "
                        f"model.encoders.{m}.vocab_size >= {len(tok)}"
                    )

        if self.engine["sync_free"] or self.engine["cuda_graphs"]:
            for enc in self.model.encoders.values():
                if hasattr(enc, "full_attention_mask"):
                    enc.full_attention_mask = True
        self._precompute_patterns(dm)
        if self.engine["compile_pattern_cnn"] == "fp32" and stage == "fit":
            from mmmat.encoders.spectrum import XRDCNNEncoder

            for module in self.model.encoders.modules():
                if isinstance(module, XRDCNNEncoder):
                    module.float32 = True
        if self.engine["cuda_graphs"] and stage == "fit":
            self._static_step()
        if self.engine["compile"] and stage == "fit" and self._static is None:
            self._compile_encoders()

    def _static_step(self) -> None:
        """Set up the static-shape, captured step (``engine.cuda_graphs``).

        The plain step runs instead, with a warning that says why, off CUDA and with settings the static step
        does not support (structural objectives, crystal augmentation). Under DDP every rank runs its own
        captured step; the contrastive loss's cross-rank gathers run between the graphs (graph breaks), and
        DDP all-reduces the gradients as the compiled backward produces them.
        """
        import warnings

        from mmmat.tasks.static_step import StaticStep

        why = None
        if self.trainer.strategy.root_device.type != "cuda":
            why = f"CUDA graphs need a CUDA device, and the step runs on {self.trainer.strategy.root_device.type}"
        else:
            try:
                # a graph break costs speed, not correctness: reported after the first step rather than fatal
                self._static = StaticStep(self, compile=True, mode="reduce-overhead", fullgraph=False,
                                          eager_pattern_cnn=not self.engine["compile_pattern_cnn"])
            except ValueError as err:
                why = str(err)
        if why is not None:
            warnings.warn(f"engine.cuda_graphs: the plain step runs ({why})", UserWarning, stacklevel=2)
            return
        dm = getattr(self.trainer, "datamodule", None)
        hp = getattr(dm, "hparams", None)
        if getattr(hp, "mode", None) == "resident":  # capacities from the split's sizes: no re-compilation
            self._static.plan(dm.resident(hp.train_split), int(hp.batch_size))

    def _compile_encoders(self) -> None:
        """``torch.compile`` the tensor-level part of every encoder: its network, not the input handling.

        The powder-pattern CNN (:class:`~mmmat.encoders.spectrum.XRDCNNEncoder`) stays eager unless
        ``engine.compile_pattern_cnn``: compiled under bf16 autocast its output made the loss NaN from the first
        logged step on an H200 (torch 2.11), while the compiled crystal, image and text encoders each stayed
        finite, and so did everything compiled in fp32 (benchmarks/results/pretrain_compile_nan.json).
        """
        from mmmat.encoders.crystal import CrystalEncoder
        from mmmat.encoders.image import TimmImageEncoder
        from mmmat.encoders.spectrum import XRDCNNEncoder
        from mmmat.encoders.text import TextEncoder

        parts = {CrystalEncoder: ("message_passing", True), TimmImageEncoder: ("encode", False),
                 TextEncoder: ("encode", True)}
        if self.engine["compile_pattern_cnn"]:
            parts[XRDCNNEncoder] = ("embed_profile", False)
        for module in self.model.encoders.modules():
            for cls, (name, dynamic) in parts.items():
                if isinstance(module, cls):
                    setattr(module, name, torch.compile(getattr(module, name), dynamic=dynamic))

    def _precompute_patterns(self, dm: Any) -> None:
        """Attach each crystal's computed powder pattern to the resident splits, once (see ``engine``)."""
        enc = self.model.encoders["crystal"] if "crystal" in self.model.encoders else None
        if (
            not self.engine["precompute_patterns"]
            or "crystal" in self.augmenters
            or not hasattr(enc, "pattern")
            or getattr(getattr(dm, "hparams", None), "mode", None) != "resident"
        ):
            return
        for split in (dm.hparams.train_split, dm.hparams.val_split):
            if split not in dm.manifest["splits"]:
                continue
            data = dm.resident(split)
            if "computed_xrd" not in data.crystal_features:
                data.precompute_crystal_feature("computed_xrd", enc.pattern)

    def configure_model(self) -> None:
        """Shard the model with FSDP2 under Lightning's ``ModelParallelStrategy`` (see :mod:`mmmat.tasks.fsdp`)."""
        from mmmat.tasks.fsdp import apply_fsdp

        units = apply_fsdp(self)
        if units and self.global_rank == 0:
            print(f"FSDP: {units} units sharded over {self.device_mesh}", flush=True)

    def on_train_epoch_start(self) -> None:
        """Let streaming loaders know the epoch (their shard order depends on it)."""
        start_epoch(self)

    # ------------------------------------------------------------------ steps
    def _augmented(self, batch: MultimodalBatch) -> MultimodalBatch:
        """``batch`` with every configured augmentation applied (in place), in the registry's order."""
        for name, aug in self.augmenters.items():
            if not self.engine["sync_free"] and not bool(batch.present[name].any()):
                continue
            params = aug.augment_batch(batch, name)
            if self.hparams.mixture_loss_weight > 0 and "mixture" in params:
                self._mixture = params["mixture"]
        return batch

    def training_step(self, batch: MultimodalBatch, batch_idx: int) -> torch.Tensor:
        """One contrastive step."""
        if self._static is not None:
            loss, values = self._static(batch)
            self._log_train(values, len(batch))
            return loss
        if not self.engine["sync_free"] and batch.rows:
            batch.rows = {}
        if self._structural_only():
            return self._structural_step(batch)
        batch = self._augmented(batch)
        emb = self.model(batch, modalities=self.model.modalities)
        loss, logs = self.loss(emb, {m: batch.present[m] for m in emb})
        if len(self.objectives):
            loss = loss + self._objective_losses(batch, logs)
        spread = self.hparams.feature_spread
        if spread is not None and self._crystal_features is not None:
            value, terms = feature_spread_loss(self._crystal_features, gamma=float(spread.get("gamma", 1.0)),
                                               decorrelation=float(spread.get("decorrelation", 1.0)))
            self._crystal_features = None
            logs.update({f"loss/feature_{k}": v for k, v in terms.items()})
            loss = loss + float(spread.get("weight", 1.0)) * value
        values: dict[str, Any] = {}
        if self.hparams.mixture_loss_weight > 0 and self._mixture is not None and {"xrd", "crystal"} <= set(emb):
            mix_loss = self._mixture_loss(emb["xrd"], emb["crystal"], batch)
            values["train/loss_mixture"] = mix_loss
            loss = loss + self.hparams.mixture_loss_weight * mix_loss
        values["train/loss"] = loss
        values.update({f"train/{k}": v for k, v in logs.items() if k.startswith(("loss/", "acc/", "logit"))})
        self._log_train(values, len(batch))
        return loss

    def _structural_only(self) -> bool:
        """Whether the step is the structural objectives alone: every contrastive pair weighted 0, no other loss.

        The encoders' outputs then reach no loss, so the step runs only the crystal encoder's graph branch on
        the corrupted crystals (the same losses and gradients, several times more crystals per second). Under
        several ranks the full forward pass still runs: DDP expects every parameter in every step's graph.
        """
        return bool(
            len(self.objectives)
            and self.hparams.feature_spread is None
            and self.hparams.mixture_loss_weight == 0
            and self.loss.inactive(self.model.modalities)
            and (self._trainer is None or self.trainer.world_size == 1)
        )

    def _structural_step(self, batch: MultimodalBatch) -> torch.Tensor:
        """The step of :meth:`_structural_only`: the weighted objective losses, nothing else encoded."""
        if "crystal" in self.augmenters:
            self.augmenters["crystal"].augment_batch(batch, "crystal")
        logs: dict[str, Any] = {}
        loss = self._objective_losses(batch, logs)
        values = {"train/loss": loss, **{f"train/{k}": v for k, v in logs.items()}}
        self._log_train(values, len(batch))
        return loss

    def _log_train(self, values: dict[str, Any], batch_size: int) -> None:
        """Log a training step's values without reading anything back from the device in the step.

        ``train/loss`` goes to Lightning every step as it is, for the callbacks only (EarlyStopping watches it;
        it is read back at epoch ends, and every step only when a progress bar shows it). For the loggers, on
        the steps they write (``trainer.log_every_n_steps``) every value, ``train/loss`` included, is stacked
        and copied to the host asynchronously (:class:`_PendingLogs`); the values are written to the loggers,
        with the step they belong to, at a later step once their copy has landed (at most a few logging
        intervals late; at once on the CPU), and whatever is still on its way at the epoch's end and at the
        end of training. With ``engine.sync_free`` off each value is logged every step, as plain Lightning does.
        """
        bar = getattr(self._trainer, "progress_bar_callback", None) is not None
        connector = getattr(self._trainer, "_logger_connector", None)
        loss = values["train/loss"]
        if not self.engine["sync_free"] or connector is None:
            self.log("train/loss", loss, prog_bar=bar, batch_size=batch_size)
            for k, v in values.items():
                if k != "train/loss":
                    self.log(k, v, batch_size=batch_size)
            return
        self.log("train/loss", loss, prog_bar=bar, batch_size=batch_size, logger=False)
        if connector.should_update_logs:
            stacked = torch.stack([torch.as_tensor(v, device=loss.device).detach().float().reshape(())
                                   for v in values.values()])
            host, event = self._pending_logs.copy_to_host(stacked)
            step = self.trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning's loggers use
            self._pending_logs.push(step, self.current_epoch, list(values), host, event)
        self._write_logs()

    def _write_logs(self, wait: bool = False) -> None:
        """Write the logged values whose copy has landed (``wait``: all of them) to the loggers.

        Those beside the loss also go to ``trainer.callback_metrics``, where Lightning keeps the last value logged
        of each (the summary of train.py prints them).
        """
        for metrics in self._pending_logs.write(self.loggers, wait=wait):
            self.trainer.callback_metrics.update(
                {k: torch.tensor(v) for k, v in metrics.items() if k not in ("epoch", "train/loss")}
            )

    def on_train_epoch_end(self) -> None:
        """Write the logged values still on their way to the host."""
        self._write_logs(wait=True)

    def on_train_end(self) -> None:
        """Write the logged values still on their way to the host."""
        self._write_logs(wait=True)

    def _keep_crystal_features(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        """Forward hook on the crystal projection: keep its input (the encoder's output) for feature_spread."""
        if self.training:
            self._crystal_features = inputs[0]

    def _objective_losses(self, batch: MultimodalBatch, logs: dict[str, Any]) -> torch.Tensor:
        """Weighted sum of the structural objectives on corrupted copies of the batch's crystals."""
        enc = self.model.encoders["crystal"]
        gnn = getattr(enc, "gnn", enc)
        total = torch.zeros((), device=self.device)
        for name, obj in self.objectives.items():
            crystal, target = obj.corrupt(batch.crystal)
            atoms = gnn.node_features(crystal)
            value = obj.loss(crystal, atoms, target)
            logs[f"loss/objective_{name}"] = value.detach()
            total = total + obj.weight * value
        return total

    def _mixture_loss(self, xrd: torch.Tensor, crystal: torch.Tensor, batch: MultimodalBatch,
                      mixture: torch.Tensor | None = None) -> torch.Tensor:
        """Binary cross-entropy of "crystal j is a phase of pattern i" over the local batch.

        ``mixture``: the (B, B) phase fractions drawn by the augmentation (default: those of this step).
        """
        # absent rows and columns are weighted out rather than indexed away (no read-back of the masks)
        pair = (batch.present["xrd"][:, None] & batch.present["crystal"][None, :]).float()
        target = ((self._mixture if mixture is None else mixture) > 0).float()
        logits = self.mixture_logit[0].exp() * (xrd @ crystal.T) + self.mixture_logit[1]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
        return (bce * pair).sum() / pair.sum().clamp_min(1.0)

    def validation_step(self, batch: MultimodalBatch, batch_idx: int) -> None:
        """Embed the batch (clean inputs) and keep it for the epoch-end retrieval."""
        emb = self.model(batch, modalities=self.model.modalities)
        loss, _ = self.loss(emb, {m: batch.present[m] for m in emb})
        self.log("val/loss", loss, batch_size=len(batch), sync_dist=True)
        ids = torch.tensor([_id_hash(m) for m in batch.material_ids], device=self.device)
        self._val.append(
            {"ids": ids, "emb": {m: e.detach() for m, e in emb.items()},
             "present": {m: batch.present[m] for m in emb}}
        )

    def on_validation_epoch_end(self) -> None:
        """Cross-modal retrieval over the whole validation pool."""
        from mmmat.evaluation.retrieval import cross_modal_retrieval

        if not self._val:
            return
        ids = torch.cat([v["ids"] for v in self._val])
        mods = list(self._val[0]["emb"])
        emb = {m: torch.cat([v["emb"][m] for v in self._val]) for m in mods}
        pres = {m: torch.cat([v["present"][m] for v in self._val]) for m in mods}
        self._val.clear()
        if self.trainer.world_size > 1:
            ids = self.all_gather(ids).reshape(-1)
            emb = {m: self.all_gather(e).reshape(-1, e.shape[-1]) for m, e in emb.items()}
            pres = {m: self.all_gather(p).reshape(-1) for m, p in pres.items()}
        _, first = _unique_first(ids)
        emb = {m: e[first].float() for m, e in emb.items()}
        pres = {m: p[first] for m, p in pres.items()}
        metrics = cross_modal_retrieval(emb, pres)
        for k, v in metrics.items():
            if isinstance(v, int | float) and math.isfinite(v):
                self.log(f"val/{k}", float(v), rank_zero_only=True, sync_dist=False)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        """AdamW with linear warm-up and cosine decay (per-modality learning rates from ``lr_scale``)."""
        h = self.hparams
        scales = dict(h.get("lr_scale") or {})

        def scale(name: str) -> float:
            parts = name.split(".")
            modality = parts[2] if len(parts) > 2 and parts[1] in ("encoders", "projections") else None
            return float(scales.get(modality, 1.0))

        param_groups = adamw_param_groups(self.named_parameters(), h.lr, h.weight_decay, lr_scale=scale)
        fused = self.engine["fused_adamw"] and self.device.type == "cuda"
        opt = torch.optim.AdamW(param_groups, lr=h.lr, betas=(0.9, 0.98), eps=1e-6, fused=fused or None)
        return warmup_cosine(self, opt)

    def on_fit_end(self) -> None:
        """Write the model as ``config.json`` + ``model.safetensors`` (FSDP-sharded weights are gathered first)."""
        from mmmat.tasks.fsdp import unsharded_state_dict

        full = unsharded_state_dict(self.model)  # every rank takes part when the model is sharded
        if self.trainer.is_global_zero:
            out = self.hparams.save_dir or str(Path(self.trainer.log_dir or ".") / "model")
            model = self.model
            if full is not None:
                c = model.config
                model = MultimodalModel(c["encoders"], embed_dim=c["embed_dim"], projection=c["projection"],
                                        cutoff=c["cutoff"], max_text_tokens=c["max_text_tokens"])
                model.load_state_dict(full)
                model.tokenizer = self.model.tokenizer
            model.save_pretrained(out)
            if self.hparams.save_heads and len(self.objectives) and full is None:
                import json

                from safetensors.torch import save_file

                state = {k: v.detach().cpu().contiguous() for k, v in self.objectives.state_dict().items()}
                save_file(state, str(Path(out) / "objectives.safetensors"))
                (Path(out) / "objectives.json").write_text(json.dumps(self.hparams.objectives, indent=1))


def _unique_first(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique values and the index of each one's first occurrence."""
    uniq, inv = torch.unique(ids, return_inverse=True)
    first = torch.full((uniq.shape[0],), ids.shape[0], dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inv, torch.arange(ids.shape[0], device=ids.device), reduce="amin")
    return uniq, first
