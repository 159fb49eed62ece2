"""A split held as flat tensors on one device, batches assembled by indexing: the fast path for small sets.

A data set the size of MP-20 (17k crystals, ~100 MB with XRD profiles and images) fits on a GPU many times
over. :class:`ResidentData` packs every record once (atoms and lattices here; every other modality by its spec's
:meth:`~mmmat.modalities.ModalitySpec.pack_resident`: XRD profiles and peaks, images, pre-tokenised texts, ...;
properties) and :meth:`ResidentData.batch` builds a :class:`MultimodalBatch` for any index tensor with a
handful of gathers on the device (:meth:`~mmmat.modalities.ModalitySpec.resident_batch`), including the periodic
neighbour graph. No worker processes, no pickling, no host-to-device copies per step. :class:`ResidentLoader`
iterates it like a ``DistributedSampler``-driven ``DataLoader``: a seeded permutation per epoch, an equal number
of batches on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from mmmat.data.batch import ByteTokenizer, MultimodalBatch, crystal_batch, map_tensors
from mmmat.data.schema import MaterialRecord


class ResidentIndex(NamedTuple):
    """The records of one batch: indices on the data's device (for gathers) and on the host (for sizes)."""

    device: torch.Tensor
    host: torch.Tensor


class ResidentData:
    """Every record of a split as tensors on ``device``.

    Args:
        records: The records (e.g. from :func:`mmmat.data.loader.load_records`).
        property_names: Property columns to carry (missing values are NaN).
        tokenizer: Callable on a list of strings (Hugging Face tokenizer); :class:`ByteTokenizer` when None.
        max_text_tokens: Token budget per text.
        include_generated_text: Count generated descriptions as literature text.
        cutoff: Periodic neighbour-graph cutoff, Å (None: leave the graph to the model).
        max_num_neighbors: Nearest neighbours kept per atom.
        device: Where the tensors live.
        precompute_graph: Build each crystal's periodic neighbour list once, here, and assemble a batch's graph
            by gathering (the same edges, in the same order, as building it per batch); a batch then needs no
            graph search and no device synchronisation.
        edge_capacity: With ``precompute_graph``, pad every batch's edge list to this fixed length (static
            shapes for compiled or captured steps; ``0`` picks 1.15 × the mean edges per batch, rounded up to a
            multiple of 4,096). Padding edges join atom 0 to a far image of itself (distance ≥ 1,000 × |a|,
            beyond any cutoff), so they carry zero weight. A batch with more edges than the capacity is never
            truncated: the capacity grows to fit it (``capacity_grown`` counts how often).

    Attributes:
        t: The crystals' atoms, lattices (and precomputed graphs and features) and the properties, on ``device``.
        packed: modality -> its spec's :meth:`~mmmat.modalities.ModalitySpec.pack_resident` tensors.
        present_host: modality -> (M,) bool presence per record, on the host.

    """

    def __init__(
        self,
        records: Sequence[MaterialRecord],
        property_names: Sequence[str] = (),
        tokenizer: Any = None,
        max_text_tokens: int = 128,
        include_generated_text: bool = False,
        cutoff: float | None = 5.0,
        max_num_neighbors: int | None = None,
        device: str | torch.device = "cpu",
        precompute_graph: bool = False,
        edge_capacity: int | None = None,
    ):
        from mmmat.modalities import specs

        if not records:
            raise ValueError("ResidentData needs at least one record")
        self.device = torch.device(device)
        self.cutoff, self.max_num_neighbors = cutoff, max_num_neighbors
        self.property_names = list(property_names)
        self.material_ids = [r.material_id for r in records]
        m = len(records)
        counts = torch.tensor([r.num_atoms for r in records], dtype=torch.long)
        ptr = torch.zeros(m + 1, dtype=torch.long)
        ptr[1:] = torch.cumsum(counts, 0)
        props = torch.full((m, len(self.property_names)), math.nan)
        for i, r in enumerate(records):
            for j, name in enumerate(self.property_names):
                v = r.properties.get(name)
                if v is not None:
                    props[i, j] = float(v)
        dev = self.device
        self._counts_cpu = counts
        self.crystal_features: list[str] = []
        self.t = {
            "counts": counts.to(dev),
            "ptr": ptr.to(dev),
            "z": torch.from_numpy(np.concatenate([r.numbers for r in records]).astype(np.int64)).to(dev),
            "frac": torch.from_numpy(np.concatenate([r.frac_coords for r in records]).astype(np.float32)).to(dev),
            "lattice": torch.from_numpy(np.stack([r.lattice for r in records]).astype(np.float32)).to(dev),
            "props": props.to(dev),
        }
        # every modality, packed by its spec (the crystal's spec hands its graphs back to this object)
        options = {"tokenizer": tokenizer or ByteTokenizer(), "max_text_tokens": max_text_tokens,
                   "include_generated_text": include_generated_text, "resident": self}
        self.packed = {s.name: s.pack_resident(records, dev, **options) for s in specs()}
        #: modality -> (M,) bool presence per record, on the host: a batch's present rows without a device sync
        self.present_host = {name: p["present"].cpu() for name, p in self.packed.items()}
        self.precompute_graph = bool(precompute_graph) and cutoff is not None
        self.edge_capacity: int | None = None
        self.capacity_grown = 0
        if self.precompute_graph:
            self._pack_graphs()
            if edge_capacity is not None:
                if edge_capacity < 0:
                    raise ValueError(f"edge_capacity must be >= 0, got {edge_capacity}")
                self.edge_capacity = int(edge_capacity) or None
                self._auto_capacity = edge_capacity == 0
        elif edge_capacity is not None:
            raise ValueError("edge_capacity needs precompute_graph=True (and a cutoff)")

    def __len__(self) -> int:
        return len(self.material_ids)

    def _crystal_chunks(self, max_atoms: int = 65_536) -> Iterator[torch.Tensor]:
        """Consecutive index ranges of crystals holding about ``max_atoms`` atoms each."""
        cum = torch.cumsum(self._counts_cpu, 0)
        start = 0
        m = len(self)
        while start < m:
            base = int(cum[start - 1]) if start else 0
            stop = int(torch.searchsorted(cum, base + max_atoms, right=True))
            stop = min(max(stop, start + 1), m)
            yield torch.arange(start, stop)
            start = stop

    def _pack_graphs(self) -> None:
        """Every crystal's neighbour list, once: local (source, target) atom indices, cell offsets, pointers."""
        from mmmat.data.graph import radius_graph_pbc

        srcs, tgts, offs, per = [], [], [], []
        for idx in self._crystal_chunks():
            b = self._plain_crystal(idx.to(self.device))
            ei, off, _ = radius_graph_pbc(b.pos, b.lattice, b.batch, self.cutoff, self.max_num_neighbors)
            first = b.ptr[:-1]
            owner = b.batch[ei[1]]
            srcs.append((ei[0] - first[owner]).to(torch.int32))
            tgts.append((ei[1] - first[owner]).to(torch.int32))
            offs.append(off.to(torch.int8) if off.numel() == 0 or int(off.abs().max()) < 127 else off)
            per.append(torch.bincount(owner, minlength=idx.shape[0]).cpu())
        e_counts = torch.cat(per)
        e_ptr = torch.zeros(len(self) + 1, dtype=torch.long)
        e_ptr[1:] = torch.cumsum(e_counts, 0)
        dt = torch.int8 if all(o.dtype == torch.int8 for o in offs) else torch.long
        self._e_counts_cpu = e_counts
        self.t.update(
            e_src=torch.cat(srcs), e_tgt=torch.cat(tgts), e_off=torch.cat([o.to(dt) for o in offs]),
            e_counts=e_counts.to(self.device), e_ptr=e_ptr.to(self.device),
        )

    def _plain_crystal(self, idx: torch.Tensor) -> Any:
        """The crystals at ``idx`` (on the device) as a graph batch without edges."""
        counts = self.t["counts"][idx]
        n_atoms = int(counts.sum())
        return self._crystals(idx, counts, n_atoms, cutoff=None)

    def _crystals(self, idx: torch.Tensor, counts: torch.Tensor, n_atoms: int, cutoff: float | None) -> Any:
        t = self.t
        b = idx.shape[0]
        batch_vec = torch.repeat_interleave(torch.arange(b, device=self.device), counts, output_size=n_atoms)
        first = torch.zeros(b, dtype=torch.long, device=self.device)
        first[1:] = torch.cumsum(counts, 0)[:-1]
        atom = t["ptr"][idx][batch_vec] + torch.arange(n_atoms, device=self.device) - first[batch_vec]
        return crystal_batch(
            t["z"][atom], t["frac"][atom], t["lattice"][idx], counts, cutoff, self.max_num_neighbors,
            batch_vec=batch_vec,
        )

    def _gathered_edges(self, idx: torch.Tensor, idx_cpu: torch.Tensor, crystal: Any) -> None:
        """Put the precomputed neighbour lists of the crystals at ``idx`` on ``crystal`` (no device sync)."""
        t = self.t
        n_edges = int(self._e_counts_cpu[idx_cpu].sum())
        dev = self.device
        b = idx.shape[0]
        e_counts = t["e_counts"][idx]
        owner = torch.repeat_interleave(torch.arange(b, device=dev), e_counts, output_size=n_edges)
        e_first = torch.cumsum(e_counts, 0) - e_counts
        edge = t["e_ptr"][idx][owner] + torch.arange(n_edges, device=dev) - e_first[owner]
        first = crystal.ptr[:-1]
        src = t["e_src"][edge].long() + first[owner]
        tgt = t["e_tgt"][edge].long() + first[owner]
        off = t["e_off"][edge].long()
        cap = self.edge_capacity
        if cap is None and getattr(self, "_auto_capacity", False):
            mean = float(self._e_counts_cpu.float().mean()) * b
            cap = self.edge_capacity = int(math.ceil(1.15 * mean / 4096) * 4096)
        if cap is not None:
            if n_edges > cap:
                cap = self.edge_capacity = int(math.ceil(1.1 * n_edges / 4096) * 4096)
                self.capacity_grown += 1
            pad = cap - n_edges
            zero = torch.zeros(pad, dtype=torch.long, device=dev)
            far = torch.zeros(pad, 3, dtype=torch.long, device=dev)
            far[:, 0] = 1000
            src, tgt, off = torch.cat([src, zero]), torch.cat([tgt, zero]), torch.cat([off, far])
        lat = crystal.lattice[crystal.batch[src]]
        vec = crystal.pos[src] - crystal.pos[tgt] + torch.bmm(off.to(lat.dtype).unsqueeze(1), lat).squeeze(1)
        crystal.edge_index = torch.stack([src, tgt])
        crystal.cell_offset = off
        crystal.edge_dist = torch.linalg.vector_norm(vec, dim=1)

    def precompute_crystal_feature(self, name: str, fn: Any, max_atoms: int = 65_536) -> None:
        """Compute ``fn(crystal_batch) -> (B, ...)`` once for every crystal and attach it to every batch.

        Batches then carry it as ``batch.crystal[name]`` (for example the powder pattern a crystal encoder
        computes from the structure, which is fixed when the geometry is not augmented).
        """
        parts = []
        for idx in self._crystal_chunks(max_atoms):
            parts.append(fn(self._plain_crystal(idx.to(self.device))))
        self.t[f"feat_{name}"] = torch.cat(parts)
        if name not in self.crystal_features:
            self.crystal_features.append(name)

    def nbytes(self) -> int:
        """Bytes held on the device (the crystals, properties and every modality's packed tensors)."""
        seen: dict[int, int] = {}

        def count(t: torch.Tensor) -> torch.Tensor:
            if t.device == self.device:
                seen[id(t)] = t.numel() * t.element_size()
            return t

        map_tensors([self.t, *({k: v for k, v in p.items() if v is not self} for p in self.packed.values())], count)
        return sum(seen.values())

    def crystals_at(self, idx: ResidentIndex) -> Any:
        """The graph batch of the crystals at ``idx``: atoms gathered, the periodic graph built or gathered."""
        t = self.t
        n_atoms = int(self._counts_cpu[idx.host].sum())  # from the host copy: no device sync
        counts = t["counts"][idx.device]
        crystal = self._crystals(idx.device, counts, n_atoms, None if self.precompute_graph else self.cutoff)
        if self.precompute_graph:
            self._gathered_edges(idx.device, idx.host, crystal)
        for name in self.crystal_features:
            crystal[name] = t[f"feat_{name}"][idx.device]
        return crystal

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> MultimodalBatch:
        """The batch of the records at ``idx`` (a random text per material when ``generator`` is given)."""
        from mmmat.modalities import specs

        idx_cpu = idx.cpu()  # ids and sizes come from host copies: no device sync for them
        at = ResidentIndex(idx_cpu.to(self.device, non_blocking=True), idx_cpu)
        inputs, present, rows = {}, {}, {}
        for spec in specs():
            value, present[spec.name] = spec.resident_batch(self.packed[spec.name], at, generator)
            if value is not None:
                inputs[spec.name] = value
            if spec.present_rows_only:
                r = torch.nonzero(self.present_host[spec.name][idx_cpu]).squeeze(1)
                rows[spec.name] = (r if r.numel() else torch.zeros(1, dtype=torch.long)).to(
                    self.device, non_blocking=True)
        return MultimodalBatch(
            material_ids=[self.material_ids[i] for i in idx_cpu.tolist()],
            properties=self.t["props"][at.device],
            property_names=list(self.property_names),
            present=present,
            inputs=inputs,
            rows=rows,
        )


class ResidentLoader:
    """Iterates a :class:`ResidentData` in batches, like a ``DataLoader`` with a ``DistributedSampler``.

    Args:
        data: The resident split.
        batch_size: Samples per batch per rank.
        shuffle: A new seeded permutation each epoch (call :meth:`set_epoch`), and random text choice.
        seed: Base seed.
        drop_last: Drop the last partial batch (training); else keep it (evaluation).
        rank / world_size: This rank and the number of ranks (default: from torch.distributed or 0 / 1).

    """

    def __init__(
        self,
        data: ResidentData,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        from mmmat.data.loader import _world

        r, ws = _world()
        self.data, self.batch_size, self.shuffle, self.seed, self.drop_last = data, batch_size, shuffle, seed, drop_last
        self.rank = r if rank is None else rank
        self.world_size = ws if world_size is None else world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (changes the permutation)."""
        self.epoch = epoch

    batch_sampler = None  # read by Lightning's data checks

    @property
    def sampler(self) -> ResidentLoader:
        """Itself: Lightning calls ``loader.sampler.set_epoch(epoch)`` at the start of every epoch."""
        return self

    def _indices(self) -> torch.Tensor:
        n = len(self.data)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        per_rank = n // self.world_size if self.drop_last else math.ceil(n / self.world_size)
        total = per_rank * self.world_size
        if total > n:  # pad by wrapping, as DistributedSampler does
            order = torch.cat([order, order[: total - n]])
        return order[self.rank : total : self.world_size]

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[MultimodalBatch]:
        idx = self._indices()  # stays on the host; each batch's slice is copied without a sync
        g = None
        if self.shuffle:
            g = torch.Generator(device=self.data.device)
            g.manual_seed(self.seed * 7919 + self.epoch * 31 + self.rank)
        for k in range(len(self)):
            yield self.data.batch(idx[k * self.batch_size : (k + 1) * self.batch_size], generator=g)
