"""One batch type for every stage: :class:`MultimodalBatch`, and the collate that builds it.

A batch holds every modality as a tensor of the full batch size, plus a presence mask per modality; a
missing modality is a ``False`` in its mask (its rows are zeros), never a crash. The crystals form one
torch-geometric ``Batch`` with a periodic neighbour graph (edges j → i, integer cell offsets, distances in Å).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from mmmat.data.schema import MaterialRecord


def __getattr__(name: str) -> Any:
    # ``MODALITIES``: the registered modality names (mmmat.modalities), looked up when asked for
    if name == "MODALITIES":
        from mmmat.modalities import modality_names

        return modality_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class MultimodalBatch:
    """A batch of materials with every modality padded to the batch size.

    Attributes:
        material_ids: Ids, in batch order.
        crystal: torch-geometric ``Batch`` with ``z`` (N,), ``pos`` (N, 3) Å, ``frac_coords`` (N, 3),
            ``lattice`` (B, 3, 3) Å (rows are lattice vectors), ``batch`` (N,), ``ptr`` (B + 1,), and when the
            graph was built: ``edge_index`` (2, E) (row 0 source j, row 1 target i), ``cell_offset`` (E, 3)
            integer image of j, ``edge_dist`` (E,) Å.
        xrd: (B, L) float32 powder profiles on :data:`mmmat.data.xrd.TWO_THETA` (zeros where absent).
        xrd_peaks: (B, P, 2) float32 peaks (d-spacing Å, relative intensity 0..100), zero-padded.
        xrd_peak_mask: (B, P) bool, True for real peaks.
        image: (B, 1, H, W) uint8 images (zeros where absent).
        processing_ids / processing_mask: (B, T) token ids and attention mask of one processing text each.
        literature_ids / literature_mask: (B, T) likewise for one literature text.
        properties: (B, K) float32, NaN where missing; columns named by ``property_names``.
        present: modality name -> (B,) bool, one entry per registered modality (:mod:`mmmat.modalities`).
        inputs: modality name -> input of a modality without a named field above (a registered modality's
            :meth:`~mmmat.modalities.ModalitySpec.collate` output, or computed from the crystal on first use
            by :meth:`~mmmat.modalities.ModalitySpec.batch_input`).
        rows: Optional modality name -> (K,) long indices of the present rows, in order, where the batch
            builder knows them on the host (resident batches); encoders that run on present rows only use
            them instead of reading the mask back from the device.
        skipped: bad samples skipped so far by the process that built this batch.

    """

    material_ids: list[str]
    crystal: Any
    xrd: torch.Tensor
    xrd_peaks: torch.Tensor
    xrd_peak_mask: torch.Tensor
    image: torch.Tensor
    processing_ids: torch.Tensor
    processing_mask: torch.Tensor
    literature_ids: torch.Tensor
    literature_mask: torch.Tensor
    properties: torch.Tensor
    property_names: list[str]
    present: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: int = 0
    inputs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.material_ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MultimodalBatch:
        """Move every tensor to ``device`` (returns a new batch)."""
        kw: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=non_blocking)
            elif f.name == "crystal":
                v = v.to(device, non_blocking=non_blocking)
            elif f.name in ("present", "rows", "inputs"):
                v = {k: t.to(device, non_blocking=non_blocking) for k, t in v.items()}
            kw[f.name] = v
        return MultimodalBatch(**kw)

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        # Pickle tensors as numpy arrays: one buffer copy through the worker pipe is much cheaper than a
        # shared-memory segment per tensor (about 1 ms each), which dominated DataLoader worker transfer.
        state: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = _pack(v)
            elif f.name == "crystal":
                v = {k: _pack(t) for k, t in v.to_dict().items() if isinstance(t, torch.Tensor)}
            elif f.name in ("present", "rows", "inputs"):
                v = {k: _pack(t) for k, t in v.items()}
            state[f.name] = v
        return _rebuild_batch, (state,)

    def pin_memory(self) -> MultimodalBatch:
        """Pin host memory (called by the DataLoader when ``pin_memory=True``)."""
        kw: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.pin_memory()
            elif f.name == "crystal":
                v = v.pin_memory()
            elif f.name in ("present", "rows", "inputs"):
                v = {k: t.pin_memory() for k, t in v.items()}
            kw[f.name] = v
        return MultimodalBatch(**kw)


def _pack(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A tensor as a compact numpy array plus its dtype (int64 travels as the narrowest int that holds it)."""
    a = t.detach().cpu()
    dtype = str(a.dtype).removeprefix("torch.")
    if a.dtype == torch.int64 and a.numel():
        lo, hi = int(a.min()), int(a.max())
        for small in (torch.int8, torch.int16, torch.int32):
            info = torch.iinfo(small)
            if info.min <= lo and hi <= info.max:
                a = a.to(small)
                break
    return a.numpy(), dtype


def _unpack(p: tuple[np.ndarray, str]) -> torch.Tensor:
    a, dtype = p
    return torch.from_numpy(a).to(getattr(torch, dtype))


def _rebuild_batch(state: dict[str, Any]) -> MultimodalBatch:
    from torch_geometric.data import Batch

    kw: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, tuple):
            v = _unpack(v)
        elif k == "crystal":
            v = Batch(**{n: _unpack(a) for n, a in v.items()})
            v._num_graphs = int(v.ptr.shape[0] - 1)
        elif k in ("present", "rows", "inputs"):
            v = {n: _unpack(a) for n, a in v.items()}
        kw[k] = v
    return MultimodalBatch(**kw)


def crystal_batch(
    z: torch.Tensor,
    frac: torch.Tensor,
    lattice: torch.Tensor,
    counts: torch.Tensor,
    cutoff: float | None = 5.0,
    max_num_neighbors: int | None = None,
    batch_vec: torch.Tensor | None = None,
) -> Any:
    """A torch-geometric ``Batch`` of crystals from flat atom arrays (on the device of the inputs).

    Args:
        z: (N,) atomic numbers.
        frac: (N, 3) fractional coordinates.
        lattice: (B, 3, 3) lattice vectors as rows, Å.
        counts: (B,) atoms per crystal.
        cutoff: Build the periodic neighbour graph within this radius (Å); None leaves it to the model.
        max_num_neighbors: Nearest neighbours kept per atom.
        batch_vec: (N,) crystal index of each atom, when already known.
    """
    from torch_geometric.data import Batch

    b = counts.shape[0]
    if batch_vec is None:
        batch_vec = torch.repeat_interleave(torch.arange(b, device=counts.device), counts)
    pos = torch.bmm(frac.unsqueeze(1), lattice[batch_vec]).squeeze(1)
    ptr = torch.zeros(b + 1, dtype=torch.long, device=counts.device)
    ptr[1:] = torch.cumsum(counts, 0)
    graph = {"z": z, "pos": pos, "frac_coords": frac, "lattice": lattice, "batch": batch_vec, "ptr": ptr,
             "num_atoms": counts}
    if cutoff is not None:
        from mmmat.data.graph import radius_graph_pbc

        ei, off, dist = radius_graph_pbc(pos, lattice, batch_vec, cutoff, max_num_neighbors)
        graph.update(edge_index=ei, cell_offset=off, edge_dist=dist)
    crystal = Batch(**graph)
    crystal._num_graphs = b
    return crystal


class ByteTokenizer:
    """A dependency-free tokenizer over UTF-8 bytes (ids 0..255 shifted by the special tokens).

    Ids: 0 = pad, 1 = begin, 2 = end, byte b -> b + 3. Used where no trained tokenizer is given; any
    Hugging Face tokenizer (callable on a list of strings) can replace it.
    """

    pad_token_id = 0
    vocab_size = 259

    def __call__(self, texts: Sequence[str], max_length: int = 128) -> dict[str, torch.Tensor]:
        """Tokenise and pad ``texts`` to the longest (at most ``max_length``) sequence."""
        seqs = [[1, *[b + 3 for b in t.encode("utf-8")[: max_length - 2]], 2] for t in texts]
        width = max((len(s) for s in seqs), default=2)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def _tokenize(tokenizer: Callable[..., Any], texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(tokenizer, ByteTokenizer):
        out = tokenizer(texts, max_length=max_length)
    else:  # Hugging Face tokenizers
        out = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return out["input_ids"].long(), out["attention_mask"].long()


@dataclass
class Collator:
    """Turns a list of :class:`MaterialRecord` into a :class:`MultimodalBatch`.

    Attributes:
        property_names: Property columns to carry (missing ones are NaN).
        cutoff: Neighbour-graph cutoff radius, Å.
        max_num_neighbors: Keep at most this many nearest neighbours per atom (None = all within cutoff).
        build_graph: Build the periodic graph here (False leaves it to the model, e.g. on the GPU).
        tokenizer: Callable on a list of strings; :class:`ByteTokenizer` when None.
        max_text_tokens: Token budget per text.
        random_text: Pick a random text per material (training) instead of the first (evaluation).
        include_generated_text: Let generated structure descriptions count as literature text.
        seed: Seed of the text choice.

    """

    property_names: list[str] = field(default_factory=list)
    cutoff: float = 5.0
    max_num_neighbors: int | None = None
    build_graph: bool = True
    tokenizer: Any = None
    max_text_tokens: int = 128
    random_text: bool = False
    include_generated_text: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        if self.tokenizer is None:
            self.tokenizer = ByteTokenizer()

    def __call__(self, records: Sequence[MaterialRecord], skipped: int = 0) -> MultimodalBatch:
        """Collate ``records``."""
        return self.collate(list(records), skipped=skipped)

    def _pick(self, texts: list[str]) -> str | None:
        if not texts:
            return None
        return self._rng.choice(texts) if self.random_text else texts[0]

    def collate(self, records: list[MaterialRecord], skipped: int = 0) -> MultimodalBatch:
        """Collate ``records`` into one batch."""
        from mmmat.modalities import specs
        from mmmat.modalities.builtin import properties_tensor

        fields_: dict[str, Any] = {}
        inputs: dict[str, Any] = {}
        present: dict[str, torch.Tensor] = {}
        for spec in specs():
            out, present[spec.name] = spec.collate(records, self)
            if "inputs" in out:
                inputs[spec.name] = out.pop("inputs")
            fields_.update(out)
        return MultimodalBatch(
            material_ids=[r.material_id for r in records],
            properties=properties_tensor(records, self.property_names),
            property_names=list(self.property_names),
            present=present,
            inputs=inputs,
            **fields_,
            skipped=skipped,
        )
