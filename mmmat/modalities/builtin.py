"""The five original modalities: crystal, powder XRD, microscopy image, synthesis text and literature text.

Their shard members and batch fields are those of the format the project has always written
(``struct.npz``, ``meta.json``, ``xrd.npy``, ``peaks.npy``, ``image.png``; ``MultimodalBatch.xrd``, ...), so
shards built before the registry existed load unchanged.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmmat.data.schema import IMAGE_KEY, META_KEY, PEAKS_KEY, STRUCT_KEY, XRD_KEY
from mmmat.modalities import ModalitySpec, register_modality

if TYPE_CHECKING:
    import torch


def _npy_load(value: Any) -> Any:
    return np.load(io.BytesIO(value)) if isinstance(value, bytes | bytearray) else value


def _dummy_batch(model: Any, n: int) -> Any:
    """A batch of ``n`` one-atom placeholder crystals without a graph, for raw inputs of another modality."""
    from mmmat.data.schema import MaterialRecord

    dummy = [MaterialRecord(f"input-{i}", np.eye(3) * 5.0, np.zeros((1, 3)), [1]) for i in range(n)]
    return model._collator(build_graph=False)(dummy)


def profile_batch(model: Any, chunk: Any, name: str) -> tuple[Any, torch.Tensor]:
    """A placeholder batch for ``model`` and the (N, 1701) float32 profiles ``chunk`` of modality ``name``."""
    import torch

    from mmmat.data.xrd import NUM_POINTS

    x = torch.as_tensor(np.asarray(chunk, dtype=np.float32))
    if x.ndim != 2 or x.shape[1] != NUM_POINTS:
        shape = tuple(x.shape)
        raise ValueError(f"{name} inputs must be (N, {NUM_POINTS}) profiles on the mmmat grid, got {shape}")
    return _dummy_batch(model, len(x)), x


def _grid_profile(values: np.ndarray, name: str) -> np.ndarray:
    """A (1701,) float32 profile on the mmmat grid, or InputError."""
    from mmmat.data.xrd import NUM_POINTS

    a = np.asarray(values, dtype=np.float32).reshape(-1)
    if a.shape != (NUM_POINTS,) or not np.isfinite(a).all():
        raise _input_error(f"a {name} profile must be {NUM_POINTS} finite values on the 5-90° 2θ grid")
    return a


def _input_error(message: str) -> Exception:
    from mmmat.io import InputError

    return InputError(message)


@register_modality
class CrystalSpec(ModalitySpec):
    """The crystal: lattice (Å), fractional coordinates and atomic numbers, as a periodic graph batch."""

    name = "crystal"
    order = 0
    record_fields = ("lattice", "frac_coords", "numbers")
    members = (STRUCT_KEY,)
    query_aliases = ("structure", "cif")
    label = "CIF"
    query_suffixes = (".cif", ".mcif", ".vasp", ".poscar", ".extxyz")
    query_units = "a structure file (CIF, POSCAR, extxyz, ...) or a pymatgen Structure / ASE Atoms; lengths in Å"
    default_encoder = {"name": "crystal/schnet"}
    augmentations = ()

    def has(self, record: Any) -> bool:
        """Whether ``record`` has atoms."""
        return record.num_atoms > 0

    def encode_sample(self, record: Any) -> dict[str, Any]:
        """``struct.npz``: lattice and coordinates as float64, atomic numbers as int16."""
        buf = io.BytesIO()
        np.savez(
            buf,
            lattice=record.lattice.astype(np.float64),
            frac_coords=record.frac_coords.astype(np.float64),
            numbers=record.numbers.astype(np.int16),
        )
        return {self.members[0]: buf.getvalue()}

    def decode_sample(self, sample: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """Lattice, coordinates and atomic numbers from ``struct.npz``."""
        st = _npy_load(sample[self.members[0]])
        return {
            "lattice": np.asarray(st["lattice"]),
            "frac_coords": np.asarray(st["frac_coords"]),
            "numbers": np.asarray(st["numbers"]),
        }

    def collate(self, records: Sequence[Any], collator: Any) -> tuple[dict[str, Any], torch.Tensor]:
        """A torch-geometric batch of the crystals (``batch.crystal``)."""
        import torch

        from mmmat.data.batch import crystal_batch

        counts = torch.tensor([r.num_atoms for r in records], dtype=torch.long)
        z = torch.from_numpy(np.concatenate([r.numbers for r in records]).astype(np.int64))
        frac = torch.from_numpy(np.concatenate([r.frac_coords for r in records]).astype(np.float32))
        lattice = torch.from_numpy(np.stack([r.lattice for r in records]).astype(np.float32))
        crystal = crystal_batch(
            z, frac, lattice, counts, collator.cutoff if collator.build_graph else None, collator.max_num_neighbors
        )
        return {"crystal": crystal}, counts > 0

    def raw_batch(self, model: Any, chunk: Any) -> Any:
        """Structures, ASE Atoms or records (validated) as a batch."""
        from mmmat.data.schema import as_records

        records = as_records(chunk)
        for r in records:
            r.validate()
        return model._collator()(records)

    def read_query(self, source: Any, model: Any = None, **options: Any) -> Any:
        """A validated :class:`~mmmat.data.schema.MaterialRecord` from a structure file, CIF text or object."""
        from pymatgen.core import Structure

        from mmmat.data.schema import RecordError, as_records
        from mmmat.retrieval.api import query_record

        if isinstance(source, str | Path | Structure):  # a structure file (any format mmmat.io reads) or CIF text
            return query_record(source)
        try:
            rec = as_records([source])[0]
            rec.validate()
        except RecordError as exc:
            raise _input_error(f"<structure>: {exc.reason}") from None
        return rec

    def record_input(self, record: Any) -> Any:
        """The record itself."""
        return record if record.num_atoms > 0 else None


@register_modality
class XRDSpec(ModalitySpec):
    """Powder X-ray diffraction: a (1701,) profile on :data:`mmmat.data.xrd.TWO_THETA` (Cu Kα) and its peaks."""

    name = "xrd"
    order = 10
    record_fields = ("xrd",)
    members = (XRD_KEY, PEAKS_KEY)
    derived = True
    label = "XRD"
    query_suffixes = (".xy", ".xye", ".csv", ".dat", ".txt", ".xrdml", ".brml", ".raw", ".ras", ".gsa", ".fxye")
    query_units = "a powder pattern file: 2θ in degrees, intensity in counts; wavelength in Å (default Cu Kα)"
    default_encoder = {"name": "xrd/cnn"}
    augmentations = ("mmmat.data.augment.XRDAugment",)
    condition_weight = 2.0

    def encode_sample(self, record: Any) -> dict[str, Any]:
        """``xrd.npy`` (float16 profile) and ``peaks.npy`` ((P, 2) float32 d-spacing Å, intensity 0..100)."""
        from mmmat.data.schema import _npy_bytes

        out = {}
        if record.xrd is not None:
            out[XRD_KEY] = _npy_bytes(np.asarray(record.xrd, dtype=np.float16))
        if record.xrd_peaks is not None:
            out[PEAKS_KEY] = _npy_bytes(np.asarray(record.xrd_peaks, dtype=np.float32))
        return out

    def decode_sample(self, sample: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """Profile and peaks as float32 (None when absent)."""
        xrd, peaks = _npy_load(sample.get(XRD_KEY)), _npy_load(sample.get(PEAKS_KEY))
        return {
            "xrd": None if xrd is None else np.asarray(xrd, dtype=np.float32),
            "xrd_peaks": None if peaks is None else np.asarray(peaks, dtype=np.float32),
        }

    def collate(self, records: Sequence[Any], collator: Any) -> tuple[dict[str, Any], torch.Tensor]:
        """``batch.xrd`` (B, 1701) and the zero-padded ``batch.xrd_peaks`` / ``batch.xrd_peak_mask``."""
        import torch

        from mmmat.data.xrd import NUM_POINTS

        b = len(records)
        xrd = torch.zeros(b, NUM_POINTS)
        for i, r in enumerate(records):
            if r.xrd is not None:
                xrd[i, : len(r.xrd)] = torch.from_numpy(np.asarray(r.xrd, dtype=np.float32))[:NUM_POINTS]
        npk = max((0 if r.xrd_peaks is None else len(r.xrd_peaks)) for r in records)
        peaks = torch.zeros(b, max(npk, 1), 2)
        peak_mask = torch.zeros(b, max(npk, 1), dtype=torch.bool)
        for i, r in enumerate(records):
            if r.xrd_peaks is not None and len(r.xrd_peaks):
                p = torch.from_numpy(np.asarray(r.xrd_peaks, dtype=np.float32))
                peaks[i, : len(p)] = p
                peak_mask[i, : len(p)] = True
        present = torch.tensor([r.xrd is not None for r in records], dtype=torch.bool)
        return {"xrd": xrd, "xrd_peaks": peaks, "xrd_peak_mask": peak_mask}, present

    def raw_batch(self, model: Any, chunk: Any) -> Any:
        """(N, 1701) profiles on the mmmat grid."""
        b, b.xrd = profile_batch(model, chunk, self.name)
        return b

    def read_query(self, source: Any, model: Any = None, wavelength: float | None = None, **options: Any) -> Any:
        """A (1701,) profile from a pattern file (:func:`mmmat.io.read_pattern`), a ``Pattern`` or a profile."""
        from mmmat.io import Pattern, read_xrd_profile

        if isinstance(source, np.ndarray):  # a profile already on the grid
            return _grid_profile(source, self.name)
        return read_xrd_profile(source if isinstance(source, Pattern) else Path(source), wavelength=wavelength)

    def record_input(self, record: Any) -> Any:
        """The stored profile."""
        return record.xrd

    def render(self, structure: Any, **options: Any) -> np.ndarray:
        """The (1701,) Cu Kα profile of ``structure`` (:func:`mmmat.data.xrd.xrd_profile`)."""
        from mmmat.data.xrd import xrd_profile

        return xrd_profile(structure, **options)[0]

    def fill_record(self, record: Any, structure: Any) -> None:
        """Peaks (pymatgen ``XRDCalculator``, Cu Kα) and the profile rendered from them."""
        from mmmat.data.xrd import compute_peaks, render_profile

        record.xrd_peaks = compute_peaks(structure)
        record.xrd = render_profile(record.xrd_peaks)


@register_modality
class ImageSpec(ModalitySpec):
    """A (simulated or measured) grayscale microscopy image, (H, W) uint8."""

    name = "image"
    order = 20
    record_fields = ("image",)
    members = (IMAGE_KEY,)
    derived = True
    label = "image"
    query_suffixes = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy")
    query_units = "an image file (Pillow formats or .npy), grayscale; resized to the encoder's input size"
    default_encoder = {"name": "image/timm"}
    augmentations = ()

    def encode_sample(self, record: Any) -> dict[str, Any]:
        """``image.png`` (8-bit grayscale PNG); how it was made goes into ``meta.json`` (``image_meta``)."""
        from mmmat.data.schema import _png_bytes

        out: dict[str, Any] = {"meta": {"image_meta": record.image_meta}}
        if record.image is not None:
            out[IMAGE_KEY] = _png_bytes(record.image)
        return out

    def decode_sample(self, sample: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """The image (uint8 array) and its ``image_meta``."""
        from mmmat.data.schema import _png_decode

        image = sample.get(IMAGE_KEY)
        if isinstance(image, bytes | bytearray):
            image = _png_decode(image)
        return {"image": image, "image_meta": meta.get("image_meta", {})}

    def collate(self, records: Sequence[Any], collator: Any) -> tuple[dict[str, Any], torch.Tensor]:
        """``batch.image`` (B, 1, H, W) uint8, zero-padded to the largest image."""
        import torch
        b = len(records)
        shapes = [r.image.shape for r in records if r.image is not None]
        h = max((s[0] for s in shapes), default=1)
        w = max((s[1] for s in shapes), default=1)
        image = torch.zeros(b, 1, h, w, dtype=torch.uint8)
        for i, r in enumerate(records):
            if r.image is not None:
                image[i, 0, : r.image.shape[0], : r.image.shape[1]] = torch.from_numpy(np.asarray(r.image))
        return {"image": image}, torch.tensor([r.image is not None for r in records], dtype=torch.bool)

    def raw_batch(self, model: Any, chunk: Any) -> Any:
        """(N, H, W) or (N, 1, H, W) uint8 images."""
        import torch
        x = torch.as_tensor(np.asarray(chunk))
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise ValueError(f"image inputs must be (N, H, W) or (N, 1, H, W), got {tuple(x.shape)}")
        b = _dummy_batch(model, len(x))
        b.image = x.to(torch.uint8)
        return b

    def read_query(self, source: Any, model: Any = None, **options: Any) -> Any:
        """A (size, size) uint8 image at the model's image size (see :func:`mmmat.io.read_image`)."""
        from mmmat.io import read_image
        from mmmat.retrieval.api import _image_size

        return read_image(source, _image_size(model) if model is not None else 64)

    def record_input(self, record: Any) -> Any:
        """The stored image."""
        return record.image

    def render(self, structure: Any, **options: Any) -> np.ndarray:
        """A simulated Z-contrast image (uint8) of a ``Structure`` or record (``mmmat.data.image.simulate_image``)."""
        from mmmat.data.image import simulate_image
        from mmmat.data.schema import as_records

        return simulate_image(as_records([structure])[0], **options)[0]

    def fill_record(self, record: Any, structure: Any) -> None:
        """A simulated Z-contrast image of the record's crystal and how it was made."""
        from mmmat.data.image import simulate_zcontrast

        record.image, record.image_meta = simulate_zcontrast(record.lattice, record.frac_coords, record.numbers)


class _TextSpec(ModalitySpec):
    """A text modality: texts in ``meta.json``, one tokenised text per material in a batch."""

    members = (META_KEY,)
    is_text = True
    query_units = "a sentence (plain text)"
    default_encoder = {"name": "text/transformer"}
    #: ``(MaterialRecord list field, batch ids field, batch mask field)``.
    fields: tuple[str, str, str] = ("", "", "")

    def has(self, record: Any) -> bool:
        """Whether ``record`` has a text of this modality."""
        return bool(getattr(record, self.fields[0]))

    def encode_sample(self, record: Any) -> dict[str, Any]:
        """The texts as ``meta.json`` entries."""
        return {"meta": {self.fields[0]: [t.to_dict() for t in getattr(record, self.fields[0])]}}

    def decode_sample(self, sample: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """The texts from ``meta.json``."""
        from mmmat.data.schema import TextItem

        return {self.fields[0]: [TextItem.from_dict(t) for t in meta.get(self.fields[0], [])]}

    def texts(self, record: Any, collator: Any) -> list[str]:
        """The texts of ``record`` a batch may use."""
        return [t.text for t in getattr(record, self.fields[0])]

    def collate(self, records: Sequence[Any], collator: Any) -> tuple[dict[str, Any], torch.Tensor]:
        """One text per material (random in training), tokenised into the ids and mask fields."""
        import torch

        from mmmat.data.batch import _tokenize

        picked = [collator._pick(self.texts(r, collator)) for r in records]
        ids, mask = _tokenize(collator.tokenizer, [t or "" for t in picked], collator.max_text_tokens)
        return {self.fields[1]: ids, self.fields[2]: mask}, torch.tensor([t is not None for t in picked])

    def raw_batch(self, model: Any, chunk: Any) -> Any:
        """A list of non-empty strings, tokenised with the model's tokenizer."""
        from mmmat.data.batch import _tokenize

        texts = list(chunk)
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError("text inputs must be non-empty strings")
        b = _dummy_batch(model, len(texts))
        ids, mask = _tokenize(model._collator().tokenizer, texts, model.config["max_text_tokens"])
        setattr(b, self.fields[1], ids)
        setattr(b, self.fields[2], mask)
        return b

    def read_query(self, source: Any, model: Any = None, **options: Any) -> Any:
        """The sentence itself (stripped), or the text of a ``.txt`` file."""
        text = source
        if isinstance(source, Path):
            if not source.is_file():
                raise _input_error(f"{source}: text file not found")
            text = source.read_text(encoding="utf-8", errors="replace")
        if not isinstance(text, str) or not text.strip():
            raise _input_error("empty text: give a sentence to search with")
        return text.strip()

    def record_input(self, record: Any) -> Any:
        """The first text, or None."""
        items = getattr(record, self.fields[0])
        return items[0].text if items else None


@register_modality
class ProcessingTextSpec(_TextSpec):
    """Synthesis (processing) texts rendered from recipes."""

    name = "processing_text"
    order = 30
    record_fields = ("processing_texts",)
    query_aliases = ("synthesis",)
    fields = ("processing_texts", "processing_ids", "processing_mask")


@register_modality
class LiteratureTextSpec(_TextSpec):
    """Literature texts mentioning the material (generated descriptions count only when the collator says)."""

    name = "literature_text"
    order = 40
    record_fields = ("literature_texts",)
    query_aliases = ("literature", "text")
    fields = ("literature_texts", "literature_ids", "literature_mask")

    def texts(self, record: Any, collator: Any) -> list[str]:
        """Texts written by people, plus generated ones when ``collator.include_generated_text``."""
        keep = getattr(collator, "include_generated_text", False)
        return [t.text for t in record.literature_texts if keep or not t.generated]


def properties_tensor(records: Sequence[Any], names: Sequence[str]) -> torch.Tensor:
    """(B, K) float32 properties of ``records``, NaN where missing."""
    import torch
    props = torch.full((len(records), len(names)), math.nan)
    for i, r in enumerate(records):
        for j, name in enumerate(names):
            v = r.properties.get(name)
            if v is not None:
                props[i, j] = float(v)
    return props
