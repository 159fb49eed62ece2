"""Training the conditional crystal generator (:class:`~mmmat.generative.flow.CrystalFlow`) with Lightning.

    python train.py fit --config configs/generate/tiny.yaml
    python train.py fit --config configs/generate/mp20p.yaml

Conditions come from a frozen pretrained :class:`~mmmat.latent.model.MultimodalModel` (``pretrained``): at
every step each crystal gets the shared-latent embedding of one of its present modalities, picked at random
(crystal, XRD pattern re-rendered with experimental augmentations, image, texts), so that one generator can
be steered by any of them.  Property targets (``targets``: any numeric columns of the shards) are a second,
optional condition.  Each condition is dropped at random during training (``p_drop_latent``,
``p_drop_property``), which teaches the unconditional model that classifier-free guidance needs.  A share
``csp_fraction`` of the crystals is trained with given species (crystal structure prediction), the rest de
novo.  With ``template_k > 0`` (retrieval-augmented generation) every crystal is shown its ``template_k``
cheapest substituted templates from the training split (leave-one-out: never itself), as context the denoiser
cross-attends to; the context is dropped with probability ``p_drop_templates``.  At the end of fit the
generator is saved as a model folder (``config.json`` + ``model.safetensors``) with the conditioning
model inside it (``condition_model/``), so ``mmmat generate`` needs nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from mmmat.data.batch import MultimodalBatch
from mmmat.generative.flow import CrystalFlow
from mmmat.tasks.schedule import adamw_param_groups, start_epoch, warmup_cosine

CONDITION_DIR = "condition_model"


def __getattr__(name: str) -> Any:
    # ``DEFAULT_MODALITY_WEIGHTS``: each registered modality's condition weight (ModalitySpec.condition_weight)
    if name == "DEFAULT_MODALITY_WEIGHTS":
        from mmmat.modalities import specs

        return {s.name: s.condition_weight for s in specs()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class CrystalGeneration(pl.LightningModule):
    """LightningModule that trains a :class:`CrystalFlow`.

    Args:
        pretrained: Folder of a saved MultimodalModel whose embeddings condition the generator (None: no
            latent conditioning).
        condition_modalities: Modalities whose embeddings serve as conditions (default: every encoder of
            ``pretrained``).
        modality_weights: Relative odds of picking each present modality for a crystal's condition.
        targets: Property columns the generator can be conditioned on (empty: none).
        family: Denoiser family: ``flow_gnn`` (all-pairs message passing) or ``transformer`` (all-atom
            transformer, :mod:`mmmat.generative.transformer`); both train with the same flow objective.
        hidden: Denoiser width.
        layers: Denoiser message-passing rounds (transformer blocks for ``transformer``).
        fourier: Fourier frequencies of the periodic edge features (atom-token features for ``transformer``).
        heads: Attention heads (``transformer`` only).
        translate_augment: Shift every training crystal by a random fractional vector (for ``transformer``,
            whose translation invariance is learned).
        max_atoms: Largest cell size for de novo sampling.
        csp_fraction: Share of crystals trained with given species (the rest de novo).
        p_drop_latent: Probability that a crystal's latent condition is dropped.
        p_drop_property: Probability that each property condition is dropped.
        coord_weight: Loss weight of the coordinate velocities.
        lr: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay (not on norms and biases).
        warmup_steps: Linear warm-up steps.
        max_steps: Steps of the cosine decay (default: the trainer's estimate).
        min_lr_ratio: Final learning rate as a fraction of the peak.
        xrd_augment: Keyword arguments of :class:`mmmat.data.augment.XRDAugment` for XRD conditions (None:
            patterns as stored).
        template_k: Templates per crystal given as context (0: none; retrieval-augmented generation).
        p_drop_templates: Probability that a crystal's template context is dropped in training.
        save_dir: Where the generator is saved at the end of fit (default: the logger's folder + ``/model``).
        seed: Random state is reseeded from (seed, epoch, rank) at every epoch start.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        condition_modalities: list[str] | None = None,
        modality_weights: dict[str, float] | None = None,
        targets: list[str] | None = None,
        family: str = "flow_gnn",
        hidden: int = 256,
        layers: int = 6,
        fourier: int = 8,
        heads: int = 8,
        translate_augment: bool = False,
        max_atoms: int = 20,
        csp_fraction: float = 0.5,
        p_drop_latent: float = 0.2,
        p_drop_property: float = 0.5,
        coord_weight: float = 10.0,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 200,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.05,
        xrd_augment: dict[str, Any] | None = None,
        template_k: int = 0,
        p_drop_templates: float = 0.2,
        save_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.cond_model: Any = None
        latent_dim = 0
        if pretrained is not None:
            from mmmat.latent.model import MultimodalModel

            self.cond_model = MultimodalModel.from_pretrained(pretrained)
            self.cond_model.requires_grad_(False).eval()
            latent_dim = int(self.cond_model.config["embed_dim"])
            mods = condition_modalities or self.cond_model.modalities
            missing = sorted(set(mods) - set(self.cond_model.modalities))
            if missing:
                raise ValueError(f"condition_modalities {missing} are not encoded by {pretrained}")
            self.condition_modalities = list(mods)
        elif condition_modalities:
            raise ValueError("condition_modalities needs a pretrained model")
        else:
            self.condition_modalities = []
        from mmmat.modalities import specs

        weights = {s.name: s.condition_weight for s in specs()}
        weights.update(modality_weights or {})
        self.modality_weights = [float(weights.get(m, 1.0)) for m in self.condition_modalities]
        self.flow = CrystalFlow(
            hidden=hidden,
            layers=layers,
            fourier=fourier,
            latent_dim=latent_dim,
            properties=targets or [],
            max_atoms=max_atoms,
            coord_weight=coord_weight,
            family=family,
            heads=heads,
            translate_augment=translate_augment,
            template_k=template_k,
        )
        self._templates: Any = None
        self._template_cache: dict[str, list] = {}
        self.augment = None
        if xrd_augment is not None and "xrd" in self.condition_modalities:
            from mmmat.data.augment import XRDAugment

            self.augment = XRDAugment(**xrd_augment)

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        """Check the data against the conditioning model; fit the flow's statistics on the training split."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            raise ValueError("CrystalGeneration needs the MultimodalDataModule (train.py provides it)")
        missing = sorted(set(self.flow.properties) - set(dm.properties))
        if missing:
            raise ValueError(f"properties {missing} are not carried by the data (columns: {dm.properties})")
        if self.cond_model is not None:
            self._check_data(dm)
        if stage == "fit":
            self._fit_statistics(dm)
        if self.flow.template_k and self._templates is None:
            from mmmat.generative.templates import TemplateLibrary

            self._templates = TemplateLibrary.from_records(dm.records(dm.hparams.train_split))

    def _check_data(self, dm: Any) -> None:
        h = dm.hparams
        if (
            "crystal" in self.condition_modalities
            and h.build_graph
            and h.cutoff < self.cond_model.config["cutoff"]
        ):
            raise ValueError(
                f"data.cutoff {h.cutoff} Å is shorter than the conditioning crystal encoder's "
                f"{self.cond_model.config['cutoff']} Å"
            )
        texts = [m for m in self.condition_modalities if m.endswith("_text")]
        if texts and self.cond_model.tokenizer is not None:
            if dm.tokenizer is None or dm.tokenizer.get_vocab() != self.cond_model.tokenizer.get_vocab():
                raise ValueError(
                    "the data module's tokenizer differs from the conditioning model's: set data.tokenizer to "
                    f"{self.hparams.pretrained}/tokenizer"
                )

    def _fit_statistics(self, dm: Any) -> None:
        import numpy as np

        recs = dm.records(dm.hparams.train_split)
        lattice = torch.as_tensor(np.stack([r.lattice for r in recs]), dtype=torch.float32)
        counts = torch.as_tensor([len(r.numbers) for r in recs])
        z = torch.as_tensor(np.concatenate([np.asarray(r.numbers) for r in recs]))
        props = None
        if self.flow.properties:
            props = torch.tensor(
                [[float(r.properties.get(p, float("nan"))) for p in self.flow.properties] for r in recs]
            )
        self.flow.fit_statistics(lattice, counts, z, props)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen conditioning model out of checkpoints (it is rebuilt from ``pretrained``).

        Its fingerprint is kept instead, so a run resumed against another conditioning model is refused.
        """
        sd = checkpoint.get("state_dict", {})
        for k in [k for k in sd if k.startswith("cond_model.")]:
            del sd[k]
        if self.cond_model is not None:
            from mmmat.modelio import model_fingerprint

            checkpoint["condition_model_fingerprint"] = model_fingerprint(self.hparams.pretrained)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the conditioning model's weights back from ``pretrained`` after checking its fingerprint."""
        sd = checkpoint.get("state_dict")
        if sd is None or self.cond_model is None:
            return
        saved = checkpoint.get("condition_model_fingerprint")
        if saved is not None:
            from mmmat.modelio import model_fingerprint

            if model_fingerprint(self.hparams.pretrained) != saved:
                raise ValueError(
                    f"the checkpoint was trained with another conditioning model than {self.hparams.pretrained}"
                )
        for k, v in self.cond_model.state_dict().items():
            sd.setdefault(f"cond_model.{k}", v)

    def on_train_epoch_start(self) -> None:
        """Reseed from (seed, epoch, rank) so a resumed run draws the same noise."""
        start_epoch(self)

    # ------------------------------------------------------------------ conditions
    @torch.no_grad()
    def conditions(
        self, batch: MultimodalBatch, train: bool, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Condition vectors of a batch and the CSP-row mask (random draws from ``generator`` when given)."""
        h = self.hparams
        b = len(batch)
        dev = batch.crystal.z.device
        latent = latent_mask = props = props_mask = None
        if self.condition_modalities:
            avail = torch.stack([batch.present[m] for m in self.condition_modalities], dim=1).float()
            w = avail * torch.tensor(self.modality_weights, device=dev)
            has = w.sum(1) > 0
            pick = torch.multinomial(torch.where(has[:, None], w, torch.ones_like(w)), 1, generator=generator)
            pick = pick.squeeze(1)
            if self.augment is not None and train and bool(batch.present["xrd"].any()):
                self.augment.augment_batch(batch, "xrd")
            latent = torch.zeros(b, self.flow.latent_dim, device=dev)
            for k, m in enumerate(self.condition_modalities):
                rows = (pick == k) & has
                if bool(rows.any()):
                    latent[rows] = self.cond_model.encode(m, batch)[rows].float()
            latent_mask = has.float()
            if train:
                keep = torch.rand(b, device=dev, generator=generator) >= h.p_drop_latent
                latent_mask = latent_mask * keep.float()
        if self.flow.properties:
            idx = [batch.property_names.index(p) for p in self.flow.properties]
            props = batch.properties[:, idx].float()
            props_mask = torch.isfinite(props).float()
            if train:
                keep = torch.rand(props.shape, device=dev, generator=generator) >= h.p_drop_property
                props_mask = props_mask * keep.float()
        cond = self.flow.condition_vector(latent, latent_mask, props, props_mask, b, dev)
        csp = torch.rand(b, device=dev, generator=generator) < h.csp_fraction
        return cond, csp

    def template_context(
        self, batch: MultimodalBatch, train: bool, generator: torch.Generator | None = None
    ) -> list[list] | None:
        """Per crystal its cheapest substituted training templates, itself excluded (cached by material id)."""
        if not self.flow.template_k or self._templates is None:
            return None
        c = batch.crystal
        out = []
        for i, mid in enumerate(batch.material_ids):
            if mid not in self._template_cache:
                from pymatgen.core import Structure

                rows = slice(int(c.ptr[i]), int(c.ptr[i + 1]))
                s = Structure(c.lattice[i].double().cpu().numpy(), c.z[rows].cpu().tolist(),
                              c.frac_coords[rows].double().cpu().numpy())
                self._template_cache[mid] = [
                    t.structure for t in self._templates.candidates(s, self.flow.template_k, exclude=(mid,))
                ]
            out.append(self._template_cache[mid])
        if train and self.hparams.p_drop_templates > 0:
            drop = torch.rand(len(out), generator=generator) < self.hparams.p_drop_templates
            out = [[] if d else t for t, d in zip(out, drop.tolist())]
        return out

    # ------------------------------------------------------------------ steps
    def _loss(self, batch: MultimodalBatch, train: bool, generator: torch.Generator | None = None) -> dict:
        cond, csp = self.conditions(batch, train, generator)
        c = batch.crystal
        counts = c.ptr[1:] - c.ptr[:-1]
        context = self.template_context(batch, train, generator)
        return self.flow.loss(
            c.lattice.float(), c.frac_coords.float(), c.z, c.batch, counts, csp, cond, generator, context
        )

    def training_step(self, batch: MultimodalBatch, batch_idx: int) -> torch.Tensor:
        """One flow-matching step."""
        out = self._loss(batch, train=True)
        self.log_dict({f"train/{k}": v for k, v in out.items()}, batch_size=len(batch), prog_bar=False)
        return out["loss"]

    def validation_step(self, batch: MultimodalBatch, batch_idx: int) -> None:
        """Flow-matching loss on held-out crystals, the same in every validation.

        Noise, condition choice and CSP rows are all drawn from a generator seeded by the batch index; the
        global random state (CPU and CUDA) is left alone.
        """
        g = torch.Generator(device=batch.crystal.z.device).manual_seed(1000 + batch_idx)
        out = self._loss(batch, train=False, generator=g)
        self.log_dict({f"val/{k}": v for k, v in out.items()}, batch_size=len(batch), sync_dist=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        """AdamW with linear warm-up and cosine decay (the conditioning model stays frozen)."""
        h = self.hparams
        groups = adamw_param_groups(self.flow.named_parameters(), h.lr, h.weight_decay)
        opt = torch.optim.AdamW(groups, lr=h.lr, betas=(0.9, 0.99))
        return warmup_cosine(self, opt)

    def train(self, mode: bool = True) -> CrystalGeneration:
        """Keep the conditioning model in eval mode (no dropout or norm updates) whatever the mode."""
        super().train(mode)
        if self.cond_model is not None:
            self.cond_model.eval()
        return self

    def save_generator(self, out: str | Path) -> Path:
        """Write the generator (and its conditioning model under ``condition_model/``) to ``out``."""
        out = Path(out)
        extra = {"condition_modalities": self.condition_modalities, "condition_model": None}
        if self.cond_model is not None:
            from mmmat.modelio import model_fingerprint

            cdir = self.cond_model.save_pretrained(out / CONDITION_DIR)
            extra["condition_model"] = CONDITION_DIR
            extra["condition_model_fingerprint"] = model_fingerprint(cdir)
        return self.flow.save_pretrained(out, extra=extra)

    def on_fit_end(self) -> None:
        """Write the generator as a model folder."""
        if self.trainer.is_global_zero:
            self.save_generator(self.hparams.save_dir or str(Path(self.trainer.log_dir or ".") / "model"))
