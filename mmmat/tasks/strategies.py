"""Data parallelism for a step whose backward is captured: one all-reduce of the whole gradient per step.

PyTorch's ``DistributedDataParallel`` hooks every parameter: when autograd hands over a gradient, its reducer
copies it into a bucket (one eager kernel and one hook call per parameter, about 400 per step for the mp20p
pretraining model) and all-reduces each full bucket. That is what overlaps communication with a long eager
backward. When the backward is a few replayed CUDA graphs (``engine.cuda_graphs``), those per-parameter copies
are the host's main work per step, and each rank's NCCL kernels wait for the other rank's host: on two
NVLinked H200s the DDP step ran at 1.06x one GPU although an all-reduce of the whole 109 MB gradient takes
0.4 ms there (``benchmarks/results/pretrain_2gpu_speed*.json``).

:class:`FlatGradientDDPStrategy` keeps everything of Lightning's :class:`~pytorch_lightning.strategies.DDPStrategy`
(process launch, ranks, samplers, reductions, checkpoints) except the wrapper: the module is not wrapped; its
parameters and buffers are broadcast from rank 0 once, and after every backward the gradients are averaged
across ranks as one flat buffer (one concatenation, one all-reduce, one batched copy back), and rank 0's
buffers (batch-norm statistics) are broadcast the same way, which is what DDP's ``broadcast_buffers`` leaves
every rank with at the next forward. The averaged gradients equal DDP's (``tests/test_strategies.py``). The
all-reduce follows the backward instead of overlapping it: at 0.4 ms on NVLink against a step of about 20 ms,
overlap would win at most that.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class FlatGradientDDPStrategy(DDPStrategy):
    """Lightning's DDP without the per-parameter reducer: the gradient is averaged in one flat all-reduce.

    Args:
        broadcast_buffers: Broadcast rank 0's buffers after every step (as DDP's default does before every
            forward).
        **kwargs: :class:`~pytorch_lightning.strategies.DDPStrategy`'s arguments; those that configure the
            ``DistributedDataParallel`` wrapper (buckets, communication hooks, ``static_graph``, ...) are
            refused with a message, since there is no wrapper.

    """

    _WRAPPER_ONLY = ("bucket_cap_mb", "gradient_as_bucket_view", "static_graph", "find_unused_parameters",
                     "ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper")

    def __init__(self, broadcast_buffers: bool = True, **kwargs: Any):
        wrapper = [k for k in kwargs if k in self._WRAPPER_ONLY and kwargs[k] not in (None, False)]
        if wrapper:
            raise ValueError(f"FlatGradientDDPStrategy: {', '.join(sorted(wrapper))} configure(s) the "
                             "DistributedDataParallel wrapper, which this strategy does not use")
        super().__init__(**kwargs)
        self.broadcast_buffers = broadcast_buffers
        self._grad_params: list[torch.nn.Parameter] | None = None

    def configure_ddp(self) -> None:
        """Leave the module unwrapped; start every rank from rank 0's parameters and buffers."""
        module = self.model
        assert module is not None
        with torch.no_grad():
            _flat_collective(list(module.parameters()) + list(module.buffers()), dist.broadcast, src=0)

    def post_backward(self, closure_loss: Tensor) -> None:
        """Average the gradients across ranks (after each backward of automatic optimisation)."""
        module = self.lightning_module
        if module is None or not module.automatic_optimization:
            return
        self.sync_gradients()

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """All-reduce (mean) every trainable parameter's gradient as one flat buffer; broadcast rank 0's buffers.

        A parameter without a gradient on this rank counts as a zero gradient (and gets the mean), so that
        the flat layouts of all ranks agree.
        """
        module = self.lightning_module
        if self._grad_params is None:
            self._grad_params = [p for p in module.parameters() if p.requires_grad]
        params = self._grad_params
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _flat_collective([p.grad for p in params], dist.all_reduce, divide=self.world_size)
        if self.broadcast_buffers:
            _flat_collective(list(module.buffers()), dist.broadcast, src=0)


def _flat_collective(tensors: list[Tensor], collective: Any, divide: int = 1, **kwargs: Any) -> None:
    """Run ``collective`` (``dist.all_reduce`` or ``dist.broadcast``) on ``tensors`` in place.

    One flat buffer per dtype; the result is divided by ``divide`` and copied back in one batched copy.
    """
    if not tensors or not dist.is_available() or not dist.is_initialized():
        return
    for group in _dtype_groups(tensors):
        flat = _flatten_dense_tensors(group)
        collective(flat, **kwargs)
        if divide != 1:
            flat.div_(divide)
        torch._foreach_copy_(group, list(_unflatten_dense_tensors(flat, group)))


def _dtype_groups(tensors: list[Tensor]) -> list[list[Tensor]]:
    """``tensors`` grouped by dtype, groups in the order their dtype first appears.

    The order must be the same on every rank: each group is one collective, and ranks that issue them in
    different orders exchange mismatched buffers. A set of dtypes iterates in hash order, which differs
    between processes.
    """
    groups: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())
