"""One batch type for every stage: :class:`MultimodalBatch`, and the collate that builds it.

A batch holds every modality's input under ``batch.inputs[name]``, padded to the full batch size, plus a
presence mask per modality; a missing modality is a ``False`` in its mask (its rows are zeros), never a crash.
What each input is, is its modality spec's business (:mod:`mmmat.modalities`); the batch moves, pins and
pickles any nesting of tensors, dicts, lists and torch-geometric batches without knowing the modalities.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

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

    Each modality's input lives in ``inputs[name]``, built by its spec's
    :meth:`~mmmat.modalities.ModalitySpec.collate` (the registered specs document their structure). Those
    of the built-in modalities:

    * ``crystal``: torch-geometric ``Batch`` with ``z`` (N,), ``pos`` (N, 3) Å, ``frac_coords`` (N, 3),
      ``lattice`` (B, 3, 3) Å (rows are lattice vectors), ``batch`` (N,), ``ptr`` (B + 1,), and when the graph
      was built: ``edge_index`` (2, E) (row 0 source j, row 1 target i), ``cell_offset`` (E, 3) integer image
      of j, ``edge_dist`` (E,) Å;
    * ``xrd``: ``{"profile": (B, L) float32 powder profiles on mmmat.data.xrd.TWO_THETA (zeros where absent),
      "peaks": (B, P, 2) float32 peaks (d-spacing Å, relative intensity 0..100) zero-padded,
      "peak_mask": (B, P) bool, True for real peaks}``;
    * ``image``: (B, 1, H, W) uint8 images (zeros where absent);
    * ``processing_text``, ``literature_text``: ``{"ids": (B, T) token ids, "mask": (B, T) attention mask}``
      of one text per material;
    * a modality computed from the crystal (``neutron``) is absent until an encoder asks for it
      (:meth:`~mmmat.modalities.ModalitySpec.batch_input`), then kept here.

    ``batch.<name>`` reads ``batch.inputs[name]`` (``batch.crystal``, ``batch.image``, ...); assigning to it
    is an error (assign ``batch.inputs[name]``).

    Attributes:
        material_ids: Ids, in batch order.
        properties: (B, K) float32, NaN where missing; columns named by ``property_names``.
        property_names: Names of the property columns.
        present: modality name -> (B,) bool, one entry per registered modality (:mod:`mmmat.modalities`).
        inputs: modality name -> its input (see above).
        rows: Optional modality name -> (K,) long indices of the present rows, in order, where the batch
            builder knows them on the host (resident batches); encoders that run on present rows only use
            them instead of reading the mask back from the device.
        skipped: bad samples skipped so far by the process that built this batch.

    """

    material_ids: list[str]
    properties: torch.Tensor
    property_names: list[str]
    present: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.material_ids)

    def __getattr__(self, name: str) -> Any:
        # called only when normal lookup fails: a modality's input by its name
        inputs = self.__dict__.get("inputs")
        if inputs is not None and not name.startswith("__") and name in inputs:
            return inputs[name]
        raise AttributeError(f"MultimodalBatch has no attribute or input {name!r} (inputs: {list(inputs or ())})")

    def __setattr__(self, name: str, value: Any) -> None:
        inputs = self.__dict__.get("inputs")
        if inputs is not None and name in inputs:
            raise AttributeError(f"{name!r} is an input of the batch: assign batch.inputs[{name!r}]")
        object.__setattr__(self, name, value)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> MultimodalBatch:
        """A new batch with ``fn`` applied to every tensor (torch-geometric batches are updated in place)."""
        return MultimodalBatch(**{
            f.name: getattr(self, f.name) if f.name in _METADATA else map_tensors(getattr(self, f.name), fn)
            for f in fields(self)
        })

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MultimodalBatch:
        """Move every tensor to ``device`` (returns a new batch)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> MultimodalBatch:
        """Pin host memory (called by the DataLoader when ``pin_memory=True``)."""
        return self._map(lambda t: t.pin_memory())

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        # Pickle tensors as numpy arrays: one buffer copy through the worker pipe is much cheaper than a
        # shared-memory segment per tensor (about 1 ms each), which dominated DataLoader worker transfer.
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        return _rebuild_batch, ({k: v if k in _METADATA else _pack_tree(v) for k, v in state.items()},)


#: Fields of :class:`MultimodalBatch` that never hold tensors (kept as they are by ``to`` and ``pin_memory``).
_METADATA = frozenset({"material_ids", "property_names", "skipped"})


#: Values no tensor hides in: returned as they are without further checks.
_PLAIN = (str, bytes, int, float, bool, type(None))
_GRAPH: list[type] = []


def _graph_type() -> type:
    """torch-geometric's data base class (imported once, on first use)."""
    if not _GRAPH:
        from torch_geometric.data.data import BaseData

        _GRAPH.append(BaseData)
    return _GRAPH[0]


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it: nested dicts, lists, tuples and torch-geometric data.

    Containers are rebuilt; torch-geometric objects are updated in place (``Data.apply``) and returned, as
    their own ``to`` and ``pin_memory`` do. Anything else is returned unchanged.
    """
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return _rebuilt(value, [map_tensors(v, fn) for v in value])
    if isinstance(value, _graph_type()):
        return value.apply(fn)
    return value


def _rebuilt(like: list | tuple, items: list[Any]) -> Any:
    """``items`` in a container of ``like``'s type (named tuples take their fields positionally)."""
    if isinstance(like, tuple) and hasattr(like, "_fields"):
        return type(like)(*items)
    return type(like)(items)


class _Packed(NamedTuple):
    """A pickled tensor: a compact numpy array and the tensor's dtype name."""

    array: np.ndarray
    dtype: str


class _PackedGraph(dict):
    """A pickled torch-geometric batch: its tensors by attribute name."""


def _pack(t: torch.Tensor) -> _Packed:
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
    return _Packed(a.numpy(), dtype)


def _unpack(p: _Packed) -> torch.Tensor:
    return torch.from_numpy(p.array).to(getattr(torch, p.dtype))


def _pack_tree(value: Any) -> Any:
    """``value`` with every tensor packed (:func:`_pack`) and torch-geometric batches as :class:`_PackedGraph`."""
    if isinstance(value, torch.Tensor):
        return _pack(value)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        return {k: _pack_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return _rebuilt(value, [_pack_tree(v) for v in value])
    if isinstance(value, _graph_type()):
        return _PackedGraph({k: _pack(t) for k, t in value.to_dict().items() if isinstance(t, torch.Tensor)})
    return value


def _unpack_tree(value: Any) -> Any:
    """Inverse of :func:`_pack_tree`."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, _Packed):
        return _unpack(value)
    if isinstance(value, _PackedGraph):
        from torch_geometric.data import Batch

        g = Batch(**{n: _unpack(a) for n, a in value.items()})
        g._num_graphs = int(g.ptr.shape[0] - 1)
        return g
    if isinstance(value, dict):
        return {k: _unpack_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return _rebuilt(value, [_unpack_tree(v) for v in value])
    return value


def _rebuild_batch(state: dict[str, Any]) -> MultimodalBatch:
    return MultimodalBatch(**{k: v if k in _METADATA else _unpack_tree(v) for k, v in state.items()})


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

        inputs: dict[str, Any] = {}
        present: dict[str, torch.Tensor] = {}
        for spec in specs():
            value, present[spec.name] = spec.collate(records, self)
            if value is not None:
                inputs[spec.name] = value
        return MultimodalBatch(
            material_ids=[r.material_id for r in records],
            properties=properties_tensor(records, self.property_names),
            property_names=list(self.property_names),
            present=present,
            inputs=inputs,
            skipped=skipped,
        )
