"""Fully sharded data parallel training (FSDP2) for encoders too large for one GPU.

Built on ``torch.distributed.fsdp.fully_shard`` and used through Lightning's ``ModelParallelStrategy``, which
builds a device mesh of shape (nodes, devices per node) and calls the LightningModule's ``configure_model``
hook, where :func:`apply_fsdp` shards:

- each element of every ``nn.ModuleList`` inside an encoder (transformer layers, interaction blocks, CNN
  stages) that holds parameters: gathered block by block, so the full weights of a whole encoder are never
  held at once;
- each encoder and each projection head (the parameters not in a block);
- the model as the root.

The loss's scalars (logit scale, SigLIP bias; ``fully_shard`` takes no 0-d parameters) stay replicated, their
gradients averaged over all ranks as DDP would.

On one node (or with ``data_parallel_size: 1``) every parameter is sharded over all ranks (FSDP). On several
nodes with the default mesh, parameters are sharded over the GPUs of a node and replicated across nodes
(hybrid sharding, HSDP): the all-gathers stay on the node's NVLink and only a gradient all-reduce crosses
the network. Parameters stay float32 (the crystal encoders compute geometry in the parameters' dtype);
``precision: bf16-mixed`` runs the arithmetic in bf16 under autocast as with DDP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def shard_mesh(mesh: Any) -> Any:
    """The mesh to shard over, from the (data_parallel, tensor_parallel) mesh of ``ModelParallelStrategy``.

    A dimension of size 1 is dropped (plain FSDP over the other); with both above 1 the 2-D mesh is returned:
    ``fully_shard`` then replicates over the first dimension (nodes) and shards over the second (devices).
    """
    if mesh.ndim != 2:
        return mesh
    dp, tp = mesh["data_parallel"], mesh["tensor_parallel"]
    if tp.size() == 1:
        return dp
    if dp.size() == 1:
        return tp
    return mesh


def shard_units(model: nn.Module) -> list[nn.Module]:
    """Sub-modules of a :class:`~mmmat.latent.model.MultimodalModel` that become FSDP units, innermost first."""
    units: list[nn.Module] = []
    for name in ("encoders", "projections"):
        for enc in getattr(model, name).values():
            if name == "encoders":
                blocks = [m for sub in enc.modules() if isinstance(sub, nn.ModuleList) for m in sub]
                # modules() lists a parent before its children: reversed, nested blocks come before outer ones
                units += [m for m in reversed(blocks) if any(True for _ in m.parameters())]
            if any(True for _ in enc.parameters()):
                units.append(enc)
    return units


def apply_fsdp(module: Any) -> int:
    """Shard ``module.model`` with FSDP2 over ``module.device_mesh`` (the loss's scalars stay replicated).

    Returns the number of FSDP units (0 without a device mesh, i.e. under any strategy other than
    ``ModelParallelStrategy``, or when already sharded). Raises if a parameter of ``module`` stays unsharded
    (its gradient would never be reduced across ranks).
    """
    mesh = getattr(module, "device_mesh", None)
    if mesh is None or _is_sharded(module):
        return 0
    from torch.distributed.fsdp import fully_shard

    m = shard_mesh(mesh)
    for p in module.parameters():  # FSDP shards dim 0 of contiguous tensors (channels_last conv weights are not)
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    units = shard_units(module.model)
    for u in units:
        fully_shard(u, mesh=m)
    fully_shard(module.model, mesh=m)
    from torch.distributed.tensor import DTensor

    rest = [(n, p) for n, p in module.named_parameters() if not isinstance(p, DTensor)]
    bad = [n for n, _ in rest if not n.startswith("loss.")]
    if bad:
        raise RuntimeError(f"FSDP: parameters outside the model and the loss would not be reduced: {bad[:5]}")
    for _, p in rest:  # the loss's scalars (logit scale, bias): replicated, gradients averaged over all ranks
        p.register_hook(_average_over_ranks)
    return len(units) + 1


def _average_over_ranks(grad: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / dist.get_world_size()


def unsharded_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict of a sharded ``model`` on CPU, on rank 0 (an empty dict on the other ranks).

    A collective: every rank must call it. Returns None when ``model`` is not sharded.
    """
    if not _is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
