"""The learning-rate schedule shared by the training tasks."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch


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
