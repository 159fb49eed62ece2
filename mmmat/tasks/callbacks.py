"""Training callbacks: a wall-clock budget with a schedule fitted to it, and throughput accounting."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


def _sync(module: pl.LightningModule) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


class TimeBudget(pl.Callback):
    """Train for a wall-clock budget, with the learning-rate schedule fitted to it.

    After ``calibrate_steps`` steps the step rate is measured and the run's last step is set to what fits in
    the remaining budget (rank 0 decides, every rank follows), so a cosine schedule ends at the end of the
    budget instead of being cut off. The module's schedule must read ``pl_module.total_steps``.

    Args:
        seconds: Training budget in seconds (from the first training step).
        calibrate_steps: Steps to measure the rate on (after 20 warm-up steps).
        margin: Fraction of the remaining time kept free (validation, checkpointing).
    """

    def __init__(self, seconds: float, calibrate_steps: int = 200, margin: float = 0.03):
        self.seconds, self.calibrate_steps, self.margin = seconds, calibrate_steps, margin
        self._t0: float | None = None
        self._tw: float | None = None
        self.planned_steps: int | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """Start the clocks."""
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        """Calibrate once, then stop when the budget is spent."""
        step = trainer.global_step
        if step == 20 and self._tw is None:
            _sync(pl_module)
            self._tw = time.perf_counter()
        if self.planned_steps is None and step == 20 + self.calibrate_steps and self._tw is not None:
            _sync(pl_module)
            now = time.perf_counter()
            rate = self.calibrate_steps / (now - self._tw)
            remaining = self.seconds - (now - self._t0)
            planned = step + max(1, int(remaining * (1 - self.margin) * rate))
            planned = int(trainer.strategy.broadcast(planned, src=0))
            if trainer.max_steps and trainer.max_steps > 0:
                planned = min(planned, trainer.max_steps)
            self.planned_steps = planned
            trainer.fit_loop.epoch_loop.max_steps = planned
            pl_module.total_steps = planned
        if self._t0 is not None and time.perf_counter() - self._t0 > self.seconds:
            trainer.should_stop = True


class Throughput(pl.Callback):
    """Samples per second, the share of step time spent fetching data, and peak GPU memory.

    Every ``sync_every`` steps the device is synchronised at batch end and at the next batch start, so the
    time between them (the loader producing the next batch) and the step itself are measured exactly. The
    result is logged and written to ``<log_dir>/throughput.json``.

    Args:
        warmup_steps: Steps ignored at the start (compilation, caches).
        sync_every: Measure the data share on every n-th step.
    """

    def __init__(self, warmup_steps: int = 50, sync_every: int = 25):
        self.warmup_steps, self.sync_every = warmup_steps, sync_every
        self.samples = 0
        self._t_start: float | None = None
        self._t_end_prev: float | None = None
        self._t_batch_start: float | None = None
        self._fetch = 0.0
        self._step = 0.0
        self.result: dict[str, float] = {}

    def _measuring(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step >= self.warmup_steps and trainer.global_step % self.sync_every == 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """Close the fetch interval."""
        if trainer.global_step == self.warmup_steps and self._t_start is None:
            _sync(pl_module)
            self._t_start = time.perf_counter()
            self.samples = 0
        if self._t_end_prev is not None:
            _sync(pl_module)
            self._t_batch_start = time.perf_counter()
            self._fetch += self._t_batch_start - self._t_end_prev
            self._t_end_prev = None
        else:
            self._t_batch_start = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        """Count samples; open the next fetch interval on measured steps."""
        if self._t_start is not None:
            self.samples += len(batch) * trainer.world_size
        if self._t_batch_start is not None:
            _sync(pl_module)
            self._step += time.perf_counter() - self._t_batch_start
            self._t_batch_start = None
        if self._measuring(trainer):
            _sync(pl_module)
            self._t_end_prev = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the figures."""
        if self._t_start is None:
            return
        _sync(pl_module)
        wall = time.perf_counter() - self._t_start
        self.result = {
            "samples_per_s": self.samples / wall if wall > 0 else 0.0,
            "data_wait_share": self._fetch / (self._fetch + self._step) if self._fetch + self._step > 0 else 0.0,
            "steps": trainer.global_step,
            "train_seconds": wall,
        }
        if pl_module.device.type == "cuda":
            self.result["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        if trainer.is_global_zero and trainer.log_dir:
            Path(trainer.log_dir).mkdir(parents=True, exist_ok=True)
            (Path(trainer.log_dir) / "throughput.json").write_text(json.dumps(self.result, indent=1))
