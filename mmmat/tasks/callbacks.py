"""Training callbacks: a wall-clock budget with a schedule fitted to it, throughput accounting, LR scaling."""

from __future__ import annotations

import json
import os
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

    The budget spans sittings: the training time spent so far and the planned last step are saved in the
    checkpoint, so a run resumed with ``--ckpt_path`` (e.g. after :class:`StopAfter` ended a sitting) keeps
    the same schedule and stops when the budget of all sittings together is spent. A sitting that ends
    before the calibration calibrates in the next one.

    Args:
        seconds: Training budget in seconds (from the first training step, summed over sittings).
        calibrate_steps: Steps to measure the rate on (after 20 warm-up steps of a sitting).
        margin: Fraction of the remaining time kept free (validation, checkpointing).
    """

    def __init__(self, seconds: float, calibrate_steps: int = 200, margin: float = 0.03):
        self.seconds, self.calibrate_steps, self.margin = seconds, calibrate_steps, margin
        self._t0: float | None = None
        self._tw: float | None = None
        self._s0 = 0
        self.spent_before = 0.0
        self.planned_steps: int | None = None

    def elapsed(self) -> float:
        """Training seconds spent so far, earlier sittings included."""
        return self.spent_before + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        """The time spent and the planned last step (saved in checkpoints)."""
        return {"spent": self.elapsed(), "planned_steps": self.planned_steps, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a budget from a checkpoint."""
        self.spent_before = float(state.get("spent", 0.0))
        self.planned_steps = state.get("planned_steps")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the planned last step of a resumed run."""
        if self.planned_steps is not None:
            trainer.fit_loop.epoch_loop.max_steps = self.planned_steps
            pl_module.total_steps = self.planned_steps

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """Start the clocks."""
        if self._t0 is None:
            self._t0 = time.perf_counter()
            self._s0 = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        """Calibrate once, then stop when the budget is spent."""
        step = trainer.global_step
        if step == self._s0 + 20 and self._tw is None:
            _sync(pl_module)
            self._tw = time.perf_counter()
        if self.planned_steps is None and step == self._s0 + 20 + self.calibrate_steps and self._tw is not None:
            _sync(pl_module)
            now = time.perf_counter()
            rate = self.calibrate_steps / (now - self._tw)
            remaining = self.seconds - self.elapsed()
            planned = step + max(1, int(remaining * (1 - self.margin) * rate))
            planned = int(trainer.strategy.broadcast(planned, src=0))
            if trainer.max_steps and trainer.max_steps > 0:
                planned = min(planned, trainer.max_steps)
            self.planned_steps = planned
            trainer.fit_loop.epoch_loop.max_steps = planned
            pl_module.total_steps = planned
        if self._t0 is not None and self.elapsed() > self.seconds:
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


class StopAfter(pl.Callback):
    """Stop at the first epoch end after ``seconds`` of this process and write a checkpoint to resume from.

    For runs longer than one sitting (a job limit, a preemptible slot): every sitting passes the same
    ``trainer.max_steps`` and schedule, this callback ends the sitting cleanly at an epoch boundary, and the
    next one continues with ``--ckpt_path`` pointing at ``checkpoint`` (same step, optimizer state and data
    position). Unlike ``trainer.max_time``, whose clock is saved in the checkpoint and keeps running across
    sittings, the clock here is this process's.

    Args:
        seconds: Wall time of this sitting, from its first training step.
        checkpoint: Where to write the checkpoint when the sitting ends early (also written when the run ends).
    """

    def __init__(self, seconds: float, checkpoint: str):
        self.seconds, self.checkpoint = float(seconds), checkpoint
        self._t0: float | None = None
        self.stopped_early = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """Start the clock."""
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stop once the sitting's time is spent."""
        if self._t0 is not None and time.perf_counter() - self._t0 > self.seconds:
            self.stopped_early = True
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the checkpoint (every rank takes part; rank 0 writes)."""
        Path(self.checkpoint).parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(self.checkpoint)


class SigtermCheck(pl.Callback):
    """Agree on a received SIGTERM across ranks every ``every_n_steps`` steps instead of every step.

    Lightning (2.5 and later) broadcasts a SIGTERM flag from rank 0 and reads it back on the host at the start
    of every training step of a multi-process run, so that all ranks stop together. That read is a barrier
    between the ranks and a wait for the whole previous step on the GPU: the host can no longer prepare the
    next step while the GPU finishes the last one, which costs a third of the step time on a short,
    launch-bound step (the ``profile`` phase of benchmarks/gpu.py shows it). This callback keeps the
    check, on every rank at the same steps, but only every n-th step; a SIGTERM is then acted on at most
    ``every_n_steps - 1`` steps later, well inside the grace period schedulers give. A Lightning without the
    per-step check is left untouched.

    Args:
        every_n_steps: Steps between two checks (1 restores Lightning's behaviour).
    """

    def __init__(self, every_n_steps: int = 50):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.checks = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wrap the epoch loop's per-step check."""
        loop = trainer.fit_loop.epoch_loop
        check = getattr(loop, "_broadcast_sigterm_tensor", None)
        if check is None or trainer.world_size == 1 or getattr(check, "_mmmat_every_n", False):
            return
        calls = 0

        def every_n() -> None:
            nonlocal calls
            if calls % self.every_n_steps == 0:
                self.checks += 1
                check()
            calls += 1

        every_n._mmmat_every_n = True  # type: ignore[attr-defined]
        loop._broadcast_sigterm_tensor = every_n


class StepProfiler(pl.Callback):
    """Profile a window of training steps and find the host synchronisations in the step.

    Steps ``[start, start + steps)`` run under :mod:`torch.profiler` (CPU and CUDA activity); the next
    ``sync_steps`` steps run with ``torch.cuda.set_sync_debug_mode("warn")`` and every synchronising call is
    counted by its source line and the innermost caller outside torch. Each rank writes
    ``<out_dir>/profile_rank<r>.txt``: the wall time per step (synchronised, without the profiler), the GPU busy
    share, the operators by CUDA and by CPU time, and the synchronising lines per step; and
    ``<out_dir>/profile_rank<r>.json`` with the numbers: ``wall_ms`` (per step,
    without the profiler), ``device_ms`` (kernel and copy time per step), ``busy_share`` (device time / wall time
    without the profiler), ``syncs_per_step`` (every synchronisation in the window, per step),
    ``syncs_per_steady_step`` (per step that neither ends an epoch nor follows an epoch's end: epoch-end
    callbacks read values back) with ``sync_steps_at_epoch_end``, ``peak_memory_gb``, ``peak_memory_reserved_gb``
    (CUDA graph pools included), ``batch_size``, and ``last_loss`` / ``loss_finite`` (the loss of the last step,
    read once after the windows).

    Args:
        out_dir: Folder for the reports.
        start: First profiled step (after warm-up).
        steps: Steps under the profiler.
        sync_steps: Steps with the synchronisation check (0: none; CUDA only).
        stop: Stop training once the report is written.
        rows: Operators listed per table.
    """

    def __init__(
        self, out_dir: str, start: int = 100, steps: int = 20, sync_steps: int = 5, stop: bool = True, rows: int = 40
    ):
        self.out_dir, self.start, self.steps, self.sync_steps = Path(out_dir), start, steps, sync_steps
        self.stop, self.rows = stop, rows
        self._prof: Any = None
        self._t: dict[str, float] = {}
        self._syncs: dict[str, int] = {}
        self._warn: Any = None
        self._lines: list[str] = []
        self._numbers: dict[str, float] = {}
        self._epoch_ended = False

    def _phase(self, step: int) -> str:
        a = self.start
        b = a + self.steps
        if a - self.steps <= step < a:
            return "timed"
        if a <= step < b:
            return "profiled"
        if b <= step < b + self.sync_steps:
            return "sync"
        return ""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """Open the window that starts at this step."""
        step = trainer.global_step
        cuda = pl_module.device.type == "cuda"
        if step == self.start - self.steps:
            _sync(pl_module)
            self._t["timed"] = time.perf_counter()
        if step == self.start - self.steps and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        if step == self.start:
            self._numbers["batch_size"] = len(batch) if hasattr(batch, "__len__") else float("nan")
            _sync(pl_module)
            self._t["timed"] = (time.perf_counter() - self._t.get("timed", time.perf_counter())) / self.steps
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()
            self._t["profiled"] = time.perf_counter()
        if step == self.start + self.steps and self.sync_steps and cuda:
            import warnings

            self._warn = warnings.catch_warnings()
            self._warn.__enter__()
            self._records = []
            self._seen, self._epoch_ended, self._per_step = 0, False, []
            warnings.simplefilter("always")
            warnings.showwarning = self._record_sync
            torch.cuda.set_sync_debug_mode("warn")
            # switching the check on is itself reported as a synchronisation (torch 2.11); it is not the step's
            self._records.clear()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        """Close the window that ends at this step; write the report after the last one."""
        step = trainer.global_step  # already advanced by the optimizer step
        if self.start <= step:  # the latest loss, read in _finish at this same step's end (no copy per step)
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                self._last_loss = loss.detach()
        if step == self.start + self.steps and self._prof is not None:
            _sync(pl_module)
            wall = time.perf_counter() - self._t["profiled"]
            self._prof.__exit__(None, None, None)
            self._report_profile(wall)
            self._prof = None
            if not self.sync_steps or pl_module.device.type != "cuda":
                self._finish(trainer)
        if self._warn is not None:  # synchronisations since the last step's end, and whether an epoch ended
            n = len(self._records)
            ends_epoch = idx + 1 >= getattr(trainer, "num_training_batches", float("inf"))
            self._per_step.append((n - self._seen, self._epoch_ended or ends_epoch))
            self._seen, self._epoch_ended = n, False
        if step == self.start + self.steps + self.sync_steps and self._warn is not None:
            torch.cuda.set_sync_debug_mode(0)
            for key in self._records:
                self._syncs[key] = self._syncs.get(key, 0) + 1
            self._warn.__exit__(None, None, None)
            self._warn = None
            self._numbers["syncs_per_step"] = sum(self._syncs.values()) / self.sync_steps
            steady = [n for n, boundary in self._per_step if not boundary]
            self._numbers["syncs_per_steady_step"] = sum(steady) / len(steady) if steady else float("nan")
            self._numbers["sync_steps_at_epoch_end"] = len(self._per_step) - len(steady)
            self._lines.append(f"\nsynchronising calls per step ({self.sync_steps} steps), by source line:")
            for key, n in sorted(self._syncs.items(), key=lambda kv: -kv[1]):
                self._lines.append(f"{n / self.sync_steps:8.1f}  {key}")
            self._finish(trainer)

    def _record_sync(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                     line: Any = None) -> None:
        """``warnings.showwarning`` in the check window: count a synchronisation by its line and its caller.

        The line that synchronises is often inside torch (``Tensor.__format__`` calling ``item``); the callers are
        the three innermost frames of the stack outside the torch package (Lightning's count) and the warnings
        machinery.
        """
        if "synchroniz" not in str(message):
            return
        import traceback

        torch_dir = os.path.dirname(torch.__file__) + os.sep
        outside = [f for f in reversed(traceback.extract_stack()[:-1])
                   if not f.filename.startswith(torch_dir) and not f.filename.endswith("warnings.py")]
        where = f"{filename}:{lineno}"
        chain = [f"{f.filename}:{f.lineno} {f.name}" for f in outside[:3] if f.filename != filename]
        if chain:
            where += " (from " + " <- ".join(chain) + ")"
        self._records.append(where)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Mark the step interval that holds an epoch's end (its hooks may read values back)."""
        self._epoch_ended = True

    def _report_profile(self, wall: float) -> None:
        ka = self._prof.key_averages()
        # device time as torch's own table totals it: kernels and copies, not the annotated ranges around them
        # (an optimizer-step range alone would count the whole step again)
        busy = sum(
            e.self_device_time_total for e in ka
            if e.device_type != torch.autograd.DeviceType.CPU and not getattr(e, "is_user_annotation", False)
        ) / 1e6
        timed = self._t.get("timed", float("nan"))
        self._numbers.update(wall_ms=timed * 1e3, device_ms=busy / self.steps * 1e3,
                             busy_share=busy / self.steps / timed, profiled_wall_ms=wall / self.steps * 1e3)
        if torch.cuda.is_available():
            self._numbers["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            # what the caching allocator holds, CUDA graph pools included: their memory was allocated at capture,
            # before the window, so the allocated peak above leaves captured steps' activations out
            self._numbers["peak_memory_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        self._lines += [
            f"wall per step without profiler: {self._t.get('timed', float('nan')) * 1e3:.1f} ms",
            f"GPU busy share (device time / wall without profiler): {busy / self.steps / timed:.2f}",
            f"wall per step under profiler: {wall / self.steps * 1e3:.1f} ms",
            f"GPU kernel time per step: {busy / self.steps * 1e3:.1f} ms (busy share {busy / wall:.2f})",
            "",
            "by self CUDA time:",
            ka.table(sort_by="self_cuda_time_total", row_limit=self.rows),
            "by self CPU time:",
            ka.table(sort_by="self_cpu_time_total", row_limit=self.rows),
        ]

    def _finish(self, trainer: pl.Trainer) -> None:
        last = getattr(self, "_last_loss", None)
        if last is not None:
            self._numbers["last_loss"] = float(last.float())
            self._numbers["loss_finite"] = bool(torch.isfinite(last))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"profile_rank{trainer.global_rank}.txt").write_text("\n".join(self._lines) + "\n")
        (self.out_dir / f"profile_rank{trainer.global_rank}.json").write_text(json.dumps(self._numbers, indent=1))
        if self.stop:
            trainer.should_stop = True


class ScaleLearningRate(pl.Callback):
    """Scale the peak learning rate with the global batch, before the optimiser is built.

    ``lr = model.lr × (global_batch / base_batch) ** power`` with ``global_batch`` = batch size per rank ×
    world size (nodes × devices) × ``accumulate_grad_batches``. ``rule: sqrt`` (power 0.5) is the scaling
    for adaptive optimisers such as AdamW (Malladi et al. 2022, "On the SDEs and scaling rules for adaptive
    gradient algorithms"); ``rule: linear`` (power 1) is the rule for SGD (Goyal et al. 2017). Warm-up stays
    a number of optimiser steps (``warmup_steps``), as open_clip keeps it. The model's ``lr`` is the rate at
    ``base_batch``; the scaled rate replaces ``hparams.lr`` and is printed on rank 0 (``hparams.yaml`` keeps
    the configured rate). A run resumed on the same number of ranks gets the same rate.

    Args:
        base_batch: Global batch at which the configured ``lr`` was tuned (256: one GPU of the mp20p config).
        rule: ``sqrt`` or ``linear``.
    """

    def __init__(self, base_batch: int = 256, rule: str = "sqrt"):
        if rule not in ("sqrt", "linear"):
            raise ValueError(f"rule must be 'sqrt' or 'linear', got {rule!r}")
        if base_batch < 1:
            raise ValueError(f"base_batch must be >= 1, got {base_batch}")
        self.base_batch, self.rule = int(base_batch), rule
        self.global_batch: int | None = None
        self.lr: float | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Set ``hparams.lr`` from the global batch (runs before ``configure_optimizers``)."""
        if stage != "fit":
            return
        dm = getattr(trainer, "datamodule", None)
        batch = getattr(getattr(dm, "hparams", None), "batch_size", None)
        if batch is None or "lr" not in pl_module.hparams:
            raise ValueError("ScaleLearningRate needs data.batch_size and a model with an lr hyperparameter")
        base_lr = getattr(pl_module, "_base_lr", None)
        if base_lr is None:  # a second fit on the same module scales from the configured rate again
            base_lr = pl_module._base_lr = float(pl_module.hparams.lr)
        self.global_batch = int(batch) * trainer.world_size * trainer.accumulate_grad_batches
        power = 0.5 if self.rule == "sqrt" else 1.0
        self.lr = base_lr * (self.global_batch / self.base_batch) ** power
        pl_module.hparams.lr = self.lr
        if getattr(trainer, "global_rank", 0) == 0:
            print(
                f"ScaleLearningRate: global batch {self.global_batch} ({batch} x {trainer.world_size} ranks x "
                f"{trainer.accumulate_grad_batches} accumulated), lr {base_lr:g} at {self.base_batch} -> "
                f"{self.lr:g} ({self.rule})",
                flush=True,
            )
