"""The learning-rate schedule and the AdamW parameter groups shared by the training tasks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch


def adamw_param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    lr: float,
    weight_decay: float,
    lr_scale: Callable[[str], float] | None = None,
    part: Callable[[str], str] | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on matrices only, a learning rate per group.

    Parameters that do not require gradients are left out. Biases, scalars and normalisation weights (``ndim <
    2`` or ``norm`` in the name) get no weight decay. ``lr_scale(name)`` multiplies ``lr`` for a parameter;
    ``part(name)`` names its group (kept in the group as ``"part"``, e.g. for a head-only warm-up). Groups come
    in a fixed order: by part, then by falling learning rate, decayed before not decayed.
    """
    groups: dict[tuple[str, float, bool], list[torch.nn.Parameter]] = {}
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        key = (part(name) if part else "", -float(lr_scale(name)) if lr_scale else -1.0,
               p.ndim < 2 or "norm" in name.lower())
        groups.setdefault(key, []).append(p)
    out = []
    for (tag, neg_scale, no_decay), params in sorted(groups.items()):
        group: dict[str, Any] = {"params": params, "lr": lr * -neg_scale,
                                 "weight_decay": 0.0 if no_decay else weight_decay}
        if part:
            group["part"] = tag
        out.append(group)
    return out


def warmup_cosine(module: pl.LightningModule, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Linear warm-up then cosine decay to ``min_lr_ratio`` × lr, stepped every optimiser step.

    Reads ``warmup_steps``, ``max_steps`` and ``min_lr_ratio`` from ``module.hparams``. The total is kept in
    ``module.total_steps`` and read on every step, so the TimeBudget callback can fit it to a time budget.
    Returns what ``configure_optimizers`` returns.
    """
    h = module.hparams
    module.total_steps = h.max_steps or max(1, int(module.trainer.estimated_stepping_batches))

    def schedule(step: int) -> float:
        if step < h.warmup_steps:
            return (step + 1) / h.warmup_steps
        t = min(1.0, (step - h.warmup_steps) / max(1, module.total_steps - h.warmup_steps))
        return h.min_lr_ratio + (1 - h.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def start_epoch(module: pl.LightningModule) -> None:
    """Tell the data module which epoch starts (streaming shard order) and reseed from (seed, epoch, rank).

    Called from ``on_train_epoch_start`` of every training task, so a run resumed from a checkpoint draws the
    same random numbers as an uninterrupted one.
    """
    dm = getattr(module.trainer, "datamodule", None)
    if dm is not None and hasattr(dm, "set_epoch"):
        dm.set_epoch(module.current_epoch)
    pl.seed_everything((module.hparams.seed * 1_000_003 + module.current_epoch) * 1009 + module.global_rank,
                       verbose=False)
