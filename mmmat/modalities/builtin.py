"""The five original modalities: crystal, powder XRD, microscopy image, synthesis text and literature text.

Their shard members are those of the format the project has always written (``struct.npz``, ``meta.json``,
``xrd.npy``, ``peaks.npy``, ``image.png``), so shards built before the registry existed load unchanged. Their
batch inputs (``batch.inputs[name]``):

* ``crystal``: a torch-geometric ``Batch`` (see :func:`mmmat.data.batch.crystal_batch`);
* ``xrd``: ``{"profile": (B, 1701) float32, "peaks": (B, P, 2) float32 (d Å, intensity 0..100),
  "peak_mask": (B, P) bool}``;
* ``image``: (B, 1, H, W) uint8;
* ``processing_text`` / ``literature_text``: ``{"ids": (B, T) long, "mask": (B, T) long}``, one text each.
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
    augmentation = "mmmat.data.augment.CrystalAugment"

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

    def augmenter(self, **kwargs: Any) -> Any:
        """:class:`~mmmat.data.augment.CrystalAugment` (``displacement`` Å, ``strain``); None for an empty config."""
        unknown = sorted(set(kwargs) - {"displacement", "strain"})
        if unknown:
            raise ValueError(f"{self.name} augmentation: unknown keys {unknown} (displacement, strain)")
        return super().augmenter(**kwargs) if kwargs else None

    def collate(self, records: Sequence[Any], collator: Any) -> tuple[Any, torch.Tensor]:
        """A torch-geometric batch of the crystals."""
        import torch

        from mmmat.data.batch import crystal_batch

        counts = torch.tensor([r.num_atoms for r in records], dtype=torch.long)
        z = torch.from_numpy(np.concatenate([r.numbers for r in records]).astype(np.int64))
        frac = torch.from_numpy(np.concatenate([r.frac_coords for r in records]).astype(np.float32))
        lattice = torch.from_numpy(np.stack([r.lattice for r in records]).astype(np.float32))
        crystal = crystal_batch(
            z, frac, lattice, counts, collator.cutoff if collator.build_graph else None, collator.max_num_neighbors
        )
        return crystal, counts > 0

    def pack_resident(self, records: Sequence[Any], device: Any, resident: Any = None, **options: Any) -> dict:
        """The crystals are held by ``resident`` itself (its atoms, neighbour graphs and static edge capacity)."""
        return {"present": resident.t["counts"] > 0, "resident": resident}

    def resident_batch(self, packed: dict[str, Any], idx: Any, generator: Any) -> tuple[Any, torch.Tensor]:
        """The graph batch of the crystals at ``idx`` (:meth:`mmmat.data.resident.ResidentData.crystals_at`)."""
        return packed["resident"].crystals_at(idx), packed["present"][idx.device]

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
    augmentation = "mmmat.data.augment.XRDAugment"
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
        """``{"profile": (B, 1701), "peaks": (B, P, 2), "peak_mask": (B, P)}``, peaks zero-padded."""
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
        return {"profile": xrd, "peaks": peaks, "peak_mask": peak_mask}, present

    def pack_resident(self, records: Sequence[Any], device: Any, **options: Any) -> dict[str, Any]:
        """Profiles as float16 (M, 1701), peaks (M, P, 2) and their mask, presence (M,)."""
        import torch

        from mmmat.data.xrd import NUM_POINTS

        m = len(records)
        xrd = torch.zeros(m, NUM_POINTS, dtype=torch.float16)
        has_xrd = torch.zeros(m, dtype=torch.bool)
        n_peaks = max((0 if r.xrd_peaks is None else len(r.xrd_peaks)) for r in records)
        peaks = torch.zeros(m, max(n_peaks, 1), 2)
        peak_mask = torch.zeros(m, max(n_peaks, 1), dtype=torch.bool)
        for i, r in enumerate(records):
            if r.xrd is not None:
                xrd[i] = torch.from_numpy(np.asarray(r.xrd, dtype=np.float16)[:NUM_POINTS])
                has_xrd[i] = True
            if r.xrd_peaks is not None and len(r.xrd_peaks):
                peaks[i, : len(r.xrd_peaks)] = torch.from_numpy(np.asarray(r.xrd_peaks, dtype=np.float32))
                peak_mask[i, : len(r.xrd_peaks)] = True
        return {"profile": xrd.to(device), "present": has_xrd.to(device), "peaks": peaks.to(device),
                "peak_mask": peak_mask.to(device)}

    def resident_batch(self, packed: dict[str, Any], idx: Any, generator: Any) -> tuple[Any, torch.Tensor]:
        """The profiles (as float32), peaks and masks at ``idx``."""
        i = idx.device
        x = {"profile": packed["profile"][i].float(), "peaks": packed["peaks"][i], "peak_mask": packed["peak_mask"][i]}
        return x, packed["present"][i]

    def raw_batch(self, model: Any, chunk: Any) -> Any:
        """(N, 1701) profiles on the mmmat grid."""
        b, b.inputs[self.name]["profile"] = profile_batch(model, chunk, self.name)
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

    def collate(self, records: Sequence[Any], collator: Any) -> tuple[Any, torch.Tensor]:
        """(B, 1, H, W) uint8 images, zero-padded to the largest one."""
        import torch
        b = len(records)
        shapes = [r.image.shape for r in records if r.image is not None]
        h = max((s[0] for s in shapes), default=1)
        w = max((s[1] for s in shapes), default=1)
        image = torch.zeros(b, 1, h, w, dtype=torch.uint8)
        for i, r in enumerate(records):
            if r.image is not None:
                image[i, 0, : r.image.shape[0], : r.image.shape[1]] = torch.from_numpy(np.asarray(r.image))
        return image, torch.tensor([r.image is not None for r in records], dtype=torch.bool)

    def pack_resident(self, records: Sequence[Any], device: Any, **options: Any) -> dict[str, Any]:
        """(M, 1, H, W) uint8 images zero-padded to the largest, presence (M,)."""
        import torch

        m = len(records)
        shapes = [r.image.shape for r in records if r.image is not None]
        h, w = (max(s[0] for s in shapes), max(s[1] for s in shapes)) if shapes else (1, 1)
        image = torch.zeros(m, 1, h, w, dtype=torch.uint8)
        has_image = torch.zeros(m, dtype=torch.bool)
        for i, r in enumerate(records):
            if r.image is not None:
                image[i, 0, : r.image.shape[0], : r.image.shape[1]] = torch.from_numpy(np.array(r.image))
                has_image[i] = True
        return {"image": image.to(device), "present": has_image.to(device)}

    def resident_batch(self, packed: dict[str, Any], idx: Any, generator: Any) -> tuple[Any, torch.Tensor]:
        """The images at ``idx``."""
        return packed["image"][idx.device], packed["present"][idx.device]

    def raw_batch(self, model: Any, chunk: Any) -> Any:
        """(N, H, W) or (N, 1, H, W) uint8 images."""
        import torch
        x = torch.as_tensor(np.asarray(chunk))
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise ValueError(f"image inputs must be (N, H, W) or (N, 1, H, W), got {tuple(x.shape)}")
        b = _dummy_batch(model, len(x))
        b.inputs[self.name] = x.to(torch.uint8)
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


def _pack_texts(
    per_record: list[list[str]], tokenizer: Any, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenise every text once: (T + 1, L) ids and mask, and the (M + 1,) pointer of each record's texts.

    The last row is the empty text, which absent rows get (as the collator gives them).
    """
    import torch

    from mmmat.data.batch import _tokenize

    flat = [t for texts in per_record for t in texts] + [""]
    ptr = torch.zeros(len(per_record) + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.tensor([len(t) for t in per_record], dtype=torch.long), 0)
    ids, mask = [], []
    for start in range(0, len(flat), 4096):
        i, m = _tokenize(tokenizer, flat[start : start + 4096], max_tokens)
        ids.append(i)
        mask.append(m)
    width = max(x.shape[1] for x in ids)
    ids = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in ids])
    mask = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in mask])
    return ids, mask, ptr


class _TextSpec(ModalitySpec):
    """A text modality: texts in ``meta.json``, one tokenised text per material in a batch."""

    members = (META_KEY,)
    is_text = True
    present_rows_only = True
    query_units = "a sentence (plain text)"
    default_encoder = {"name": "text/transformer"}
    #: The :class:`~mmmat.data.schema.MaterialRecord` list field of the texts.
    field: str = ""

    def has(self, record: Any) -> bool:
        """Whether ``record`` has a text of this modality."""
        return bool(getattr(record, self.field))

    def encode_sample(self, record: Any) -> dict[str, Any]:
        """The texts as ``meta.json`` entries."""
        return {"meta": {self.field: [t.to_dict() for t in getattr(record, self.field)]}}

    def decode_sample(self, sample: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """The texts from ``meta.json``."""
        from mmmat.data.schema import TextItem

        return {self.field: [TextItem.from_dict(t) for t in meta.get(self.field, [])]}

    def texts(self, record: Any, include_generated_text: bool = False) -> list[str]:
        """The texts of ``record`` a batch may use."""
        return [t.text for t in getattr(record, self.field)]

    def collate(self, records: Sequence[Any], collator: Any) -> tuple[dict[str, Any], torch.Tensor]:
        """One text per material (random in training), tokenised: ``{"ids": (B, T), "mask": (B, T)}``."""
        import torch

        from mmmat.data.batch import _tokenize

        keep = getattr(collator, "include_generated_text", False)
        picked = [collator._pick(self.texts(r, keep)) for r in records]
        ids, mask = _tokenize(collator.tokenizer, [t or "" for t in picked], collator.max_text_tokens)
        return {"ids": ids, "mask": mask}, torch.tensor([t is not None for t in picked])

    def pack_resident(
        self, records: Sequence[Any], device: Any, tokenizer: Any = None, max_text_tokens: int = 128,
        include_generated_text: bool = False, **options: Any,
    ) -> dict[str, Any]:
        """Every text tokenised once (``ids``, ``mask``: (T + 1, L), the last row empty), ``ptr`` (M + 1,)."""
        from mmmat.data.batch import ByteTokenizer

        per_record = [self.texts(r, include_generated_text) for r in records]
        ids, mask, ptr = _pack_texts(per_record, tokenizer or ByteTokenizer(), max_text_tokens)
        return {"ids": ids.to(device), "mask": mask.to(device), "ptr": ptr.to(device),
                "present": (ptr[1:] > ptr[:-1]).to(device)}

    def resident_batch(self, packed: dict[str, Any], idx: Any, generator: Any) -> tuple[Any, torch.Tensor]:
        """One text per record at ``idx``: a uniform choice drawn from ``generator``, else the first."""
        import torch

        i = idx.device
        ptr = packed["ptr"]
        start, n = ptr[i], ptr[i + 1] - ptr[i]
        if generator is not None:
            r = torch.rand(i.shape[0], device=i.device, generator=generator)
            pick = start + torch.floor(r * n.clamp(min=1)).long()
        else:
            pick = start
        present = n > 0
        empty = packed["ids"].shape[0] - 1
        pick = torch.where(present, pick, torch.full_like(pick, empty))
        return {"ids": packed["ids"][pick], "mask": packed["mask"][pick]}, present

    def raw_batch(self, model: Any, chunk: Any) -> Any:
        """A list of non-empty strings, tokenised with the model's tokenizer."""
        from mmmat.data.batch import _tokenize

        texts = list(chunk)
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError("text inputs must be non-empty strings")
        b = _dummy_batch(model, len(texts))
        ids, mask = _tokenize(model._collator().tokenizer, texts, model.config["max_text_tokens"])
        b.inputs[self.name] = {"ids": ids, "mask": mask}
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
        items = getattr(record, self.field)
        return items[0].text if items else None


@register_modality
class ProcessingTextSpec(_TextSpec):
    """Synthesis (processing) texts rendered from recipes."""

    name = "processing_text"
    order = 30
    record_fields = ("processing_texts",)
    query_aliases = ("synthesis",)
    field = "processing_texts"


@register_modality
class LiteratureTextSpec(_TextSpec):
    """Literature texts mentioning the material (generated descriptions count only when the collator says)."""

    name = "literature_text"
    order = 40
    record_fields = ("literature_texts",)
    query_aliases = ("literature", "text")
    field = "literature_texts"

    def texts(self, record: Any, include_generated_text: bool = False) -> list[str]:
        """Texts written by people, plus generated ones when ``include_generated_text``."""
        return [t.text for t in record.literature_texts if include_generated_text or not t.generated]


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
