"""The modality registry: one :class:`ModalitySpec` subclass per kind of data that joins the latent space.

A spec declares everything the rest of the code needs to know about its modality:

* its record field(s) on :class:`~mmmat.data.schema.MaterialRecord` and the webdataset member(s) of a shard
  sample, with :meth:`ModalitySpec.encode_sample` / :meth:`ModalitySpec.decode_sample`;
* how records collate into a :class:`~mmmat.data.batch.MultimodalBatch`: its input ``batch.inputs[name]``
  and its presence mask ``batch.present[name]`` (:meth:`ModalitySpec.collate`);
* how a whole split is held as tensors on a device and a batch gathered from them
  (:meth:`ModalitySpec.pack_resident`, :meth:`ModalitySpec.resident_batch`, used by
  :class:`~mmmat.data.resident.ResidentData`), giving the same input as the collate;
* its query reader (:meth:`ModalitySpec.read_query`, units in :attr:`ModalitySpec.query_units`) turning a
  user's file into what :meth:`~mmmat.latent.model.MultimodalModel.embed` takes, and the raw-input batch
  :meth:`ModalitySpec.raw_batch` that ``embed`` builds from it;
* its default encoder config (:attr:`ModalitySpec.default_encoder`) and its training augmentation
  (:meth:`ModalitySpec.augmenter`, built from :attr:`ModalitySpec.augmentation`);
* for a modality derived from the crystal, its renderer from a structure (:meth:`ModalitySpec.render`) and,
  when the batch does not carry it, how it is computed on the batch's device (:meth:`ModalitySpec.derive`).

Every module in this package is imported on first use, so a new modality is one new module here with one
class decorated by :func:`register_modality`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from mmmat.data.batch import Collator, MultimodalBatch
    from mmmat.data.schema import MaterialRecord


class ModalitySpec:
    """Base class of a modality: subclass it, set the class attributes, override what differs.

    Attributes:
        name: The modality's name (the key of ``batch.present``, of the model's encoders and of queries).
        order: Position in :func:`modality_names` (lower first).
        record_fields: Attributes of :class:`~mmmat.data.schema.MaterialRecord` that hold it.
        members: Webdataset sample members (tar member suffixes) it is stored in; ``meta.json`` for what lives
            in the JSON metadata; empty when it is derived from the crystal on the fly.
        derived: True when it is a function of the crystal (a renderer from a structure exists).
        lazy: True when batches do not carry it: :meth:`derive` computes it from ``batch.crystal`` on demand.
        query_aliases: Other names a query may use for it (``structure``/``cif`` for ``crystal``).
        query_suffixes: File suffixes of query files of this modality.
        query_units: What a query holds and its units.
        label: How messages name a query file of it (``"CIF file x.cif not found"``).
        is_text: A text modality (queries are sentences, not files).
        default_encoder: Encoder config (``{"name": registered encoder, **kwargs}``) of a new model.
        augmentation: Dotted name of the class of its training augmentation (:meth:`augmenter` builds it), or
            empty when it has none.
        condition_weight: Default weight of its latent when it conditions the generator (the chance of being
            picked as a training condition, relative to the other modalities).
        present_rows_only: Its encoder runs on the batch's present rows only (absent rows embed as zeros); a
            batch builder that knows those rows on the host lists them in ``batch.rows[name]``.

    """

    name: str = ""
    order: int = 100
    record_fields: tuple[str, ...] = ()
    members: tuple[str, ...] = ()
    derived: bool = False
    lazy: bool = False
    query_aliases: tuple[str, ...] = ()
    query_suffixes: tuple[str, ...] = ()
    query_units: str = ""
    label: str = ""
    is_text: bool = False
    default_encoder: dict[str, Any] = {}
    augmentation: str = ""
    condition_weight: float = 1.0
    present_rows_only: bool = False

    # ------------------------------------------------------------------ records <-> shard samples
    def encode_sample(self, record: MaterialRecord) -> dict[str, Any]:
        """Shard members (member suffix -> bytes) and ``meta.json`` entries (under ``"meta"``) of ``record``."""
        return {}

    def decode_sample(self, sample: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """``MaterialRecord`` keyword arguments from a sample's members and its decoded ``meta.json``."""
        return {}

    def has(self, record: MaterialRecord) -> bool:
        """Whether ``record`` carries this modality."""
        return all(getattr(record, f, None) is not None for f in self.record_fields)

    # ------------------------------------------------------------------ batches
    def collate(self, records: Sequence[MaterialRecord], collator: Collator) -> tuple[Any, torch.Tensor]:
        """``(input, (B,) bool presence)`` of ``records``: the input becomes ``batch.inputs[name]``.

        The default (a lazy modality) carries no input (None) and is present wherever the crystal is.
        """
        import torch
        return None, torch.tensor([r.num_atoms > 0 for r in records], dtype=torch.bool)

    def pack_resident(self, records: Sequence[MaterialRecord], device: torch.device, **options: Any) -> dict[str, Any]:
        """The modality of every record as tensors on ``device``, for :meth:`resident_batch` to gather from.

        The dict holds at least ``"present"``: (M,) bool per record. ``options`` are those of
        :class:`~mmmat.data.resident.ResidentData` (``tokenizer``, ``max_text_tokens``,
        ``include_generated_text``, and ``resident``, the ResidentData being built); a spec takes what it needs.
        The default serves a lazy modality: presence only, wherever the crystal is.
        """
        import torch

        if not self.lazy:
            raise NotImplementedError(f"modality {self.name!r} does not say how to hold its records resident")
        present = torch.tensor([r.num_atoms > 0 for r in records], dtype=torch.bool)
        return {"present": present.to(device)}

    def resident_batch(self, packed: dict[str, Any], idx: Any, generator: torch.Generator | None) -> tuple[Any, Any]:
        """``(input, (B,) bool presence)`` of the records at ``idx`` from :meth:`pack_resident`'s tensors.

        Args:
            packed: What :meth:`pack_resident` returned.
            idx: :class:`~mmmat.data.resident.ResidentIndex`: the batch's record indices on the device
                (``idx.device``) and on the host (``idx.host``).
            generator: Random choices (e.g. one text of several), None for the first / deterministic one.

        The input equals what :meth:`collate` gives for the same records (the tests hold them equal).
        """
        return None, packed["present"][idx.device]

    def augmenter(self, **kwargs: Any) -> Any:
        """Its training augmentation built from config keyword arguments (:attr:`augmentation` called with them).

        The augmenter is a ``torch.nn.Module`` whose ``augment_batch(batch, name)`` replaces (or changes in
        place) ``batch.inputs[name]`` by an augmented input and returns the parameters it drew (a dict of
        tensors, possibly empty). A spec may return None where ``kwargs`` ask for nothing.

        Raises:
            ValueError: The modality has no augmentation.

        """
        if not self.augmentation:
            raise ValueError(f"modality {self.name!r} has no training augmentation")
        module, _, cls = self.augmentation.rpartition(".")
        return getattr(importlib.import_module(module), cls)(**kwargs)

    def batch_input(self, batch: MultimodalBatch) -> Any:
        """The input of this modality in ``batch`` (computed by :meth:`derive` and kept when the batch lacks it)."""
        if self.name in batch.inputs:
            return batch.inputs[self.name]
        if not self.lazy:
            raise KeyError(f"the batch carries no {self.name!r} input")
        value = self.derive(batch)
        batch.inputs[self.name] = value
        return value

    def derive(self, batch: MultimodalBatch) -> Any:
        """Compute this modality from ``batch.crystal`` on its device (lazy modalities only)."""
        raise NotImplementedError(f"{self.name} is not derived from the crystal")

    def run_encoder(self, encoder: torch.nn.Module, batch: MultimodalBatch) -> torch.Tensor:
        """Run this modality's encoder on ``batch`` (B, out_dim)."""
        return encoder(batch)

    # ------------------------------------------------------------------ raw inputs and queries
    def raw_batch(self, model: Any, chunk: Any) -> MultimodalBatch:
        """A batch holding raw ``chunk`` inputs of this modality for ``model`` (see ``MultimodalModel.embed``)."""
        raise NotImplementedError(f"{self.name} has no raw-input path")

    def read_query(self, source: Any, model: Any = None, **options: Any) -> Any:
        """One raw input (what :meth:`raw_batch` takes one of) from a file path or an in-memory value.

        Raises:
            mmmat.io.InputError: Unusable input; the message names it.

        """
        raise NotImplementedError(f"{self.name} has no query reader")

    def record_input(self, record: MaterialRecord) -> Any:
        """The raw input of this modality in ``record`` (None when the record lacks it)."""
        return None

    def render(self, structure: Any, **options: Any) -> Any:
        """The modality computed from a pymatgen ``Structure`` (derived modalities only)."""
        raise NotImplementedError(f"{self.name} is not rendered from a structure")

    def fill_record(self, record: MaterialRecord, structure: Any) -> None:
        """Render this modality from ``structure`` into ``record``'s fields (derived, stored modalities)."""
        raise NotImplementedError(f"{self.name} is not stored from a structure")


_SPECS: dict[str, ModalitySpec] = {}
_LOADED = False


def register_modality(cls: type[ModalitySpec]) -> type[ModalitySpec]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _SPECS and type(_SPECS[cls.name]) is not cls:
        raise KeyError(f"modality {cls.name!r} is registered twice")
    _SPECS[cls.name] = cls()
    return cls


def _load() -> None:
    """Import every module of this package once (each registers its specs)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")


def specs() -> list[ModalitySpec]:
    """Every registered modality spec, in their fixed order."""
    _load()
    return sorted(_SPECS.values(), key=lambda s: (s.order, s.name))


def modality_names() -> tuple[str, ...]:
    """Names of every registered modality, in their fixed order."""
    return tuple(s.name for s in specs())


def get_modality(name: str) -> ModalitySpec:
    """The spec registered under ``name`` or one of its query aliases (KeyError naming the known ones)."""
    _load()
    if name in _SPECS:
        return _SPECS[name]
    for s in _SPECS.values():
        if name in s.query_aliases:
            return s
    raise KeyError(f"unknown modality {name!r}; registered: {list(modality_names())}")


def query_modality(path: str | Path) -> str | None:
    """The modality a query file belongs to by its suffix (None when no spec claims the suffix)."""
    suffix = Path(path).suffix.lower()
    return next((s.name for s in specs() if suffix in s.query_suffixes), None)


def each(fn: Callable[[ModalitySpec], Any]) -> dict[str, Any]:
    """``{name: fn(spec)}`` over every registered modality, in order."""
    return {s.name: fn(s) for s in specs()}
