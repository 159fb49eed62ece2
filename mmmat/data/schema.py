"""The record schema: one material with all the modalities that may come with it.

A :class:`MaterialRecord` holds the crystal (lattice in Å, fractional coordinates, atomic numbers) and,
optionally, named scalar properties (``NaN`` = missing), an XRD profile on the fixed grid of
:mod:`mmmat.data.xrd`, a (simulated or measured) microscopy image, processing texts, literature texts and
the ids of the sources it came from.  Records convert to and from pymatgen ``Structure``, ASE ``Atoms`` and
CIF text, and serialise to one webdataset sample (see :meth:`MaterialRecord.to_sample`).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Sample keys inside one webdataset sample (the tar member suffixes).
STRUCT_KEY = "struct.npz"
META_KEY = "meta.json"
XRD_KEY = "xrd.npy"
PEAKS_KEY = "peaks.npy"
IMAGE_KEY = "image.png"

#: Largest atomic number that the project accepts (Og).
MAX_Z = 118

#: Shortest interatomic distance (Å) below which atoms count as overlapping.
MIN_DISTANCE = 0.5


class RecordError(ValueError):
    """A record that cannot be used; the message names the record."""

    def __init__(self, record_id: str, reason: str):
        super().__init__(f"record {record_id!r}: {reason}")
        self.record_id = record_id
        self.reason = reason


@dataclass
class TextItem:
    """One text attached to a material.

    Attributes:
        text: The text itself.
        source: Where it came from (for example ``"synthesis_textmined/solid-state"``, ``"matscholar_ner"``).
        generated: True when the text was generated from the structure rather than written by people.
        ref: A reference inside the source (DOI, sentence index, ...), empty when unknown.

    """

    text: str
    source: str
    generated: bool = False
    ref: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"text": self.text, "source": self.source, "generated": self.generated, "ref": self.ref}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextItem:
        """Build from :meth:`to_dict` output."""
        return cls(
            text=str(d["text"]),
            source=str(d.get("source", "")),
            generated=bool(d.get("generated", False)),
            ref=str(d.get("ref", "")),
        )


@dataclass
class MaterialRecord:
    """One material and every modality that comes with it.

    Attributes:
        material_id: Unique id within a data set (for example ``"mp-1234"``).
        lattice: (3, 3) lattice vectors as rows, Å.
        frac_coords: (N, 3) fractional coordinates.
        numbers: (N,) atomic numbers.
        properties: Named scalar properties; ``NaN`` means missing. Units are those of the source column
            (MP-20: formation energy and energy above hull in eV/atom, band gap in eV).
        xrd: Powder profile on :data:`mmmat.data.xrd.TWO_THETA` (Cu Kα), max-normalised to 1, or None.
        xrd_peaks: (P, 2) array of (d-spacing Å, relative intensity 0..100) or None.
        image: (H, W) uint8 image or None.
        image_meta: How the image was made (``{"kind": "simulated_zcontrast", ...}``); must say simulated
            or measured.
        processing_texts: Synthesis texts (rendered from recipes).
        literature_texts: Texts from the literature that mention the material, or generated descriptions
            (``generated=True``) where none exists.
        source_ids: Ids in the source data sets (``{"mp": "mp-1234", "row": "17"}``).
        split: Split name (``train``/``val``/``test``) or empty.

    """

    material_id: str
    lattice: np.ndarray
    frac_coords: np.ndarray
    numbers: np.ndarray
    properties: dict[str, float] = field(default_factory=dict)
    xrd: np.ndarray | None = None
    xrd_peaks: np.ndarray | None = None
    image: np.ndarray | None = None
    image_meta: dict[str, Any] = field(default_factory=dict)
    processing_texts: list[TextItem] = field(default_factory=list)
    literature_texts: list[TextItem] = field(default_factory=list)
    source_ids: dict[str, str] = field(default_factory=dict)
    split: str = ""

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        self.lattice = np.asarray(self.lattice, dtype=np.float64).reshape(3, 3)
        self.frac_coords = np.asarray(self.frac_coords, dtype=np.float64).reshape(-1, 3)
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        self.properties = {str(k): _to_float(v) for k, v in self.properties.items()}

    @property
    def num_atoms(self) -> int:
        """Number of atoms in the cell."""
        return int(self.numbers.shape[0])

    @property
    def cart_coords(self) -> np.ndarray:
        """Cartesian coordinates, Å."""
        return self.frac_coords @ self.lattice

    @property
    def volume(self) -> float:
        """Cell volume, Å³."""
        return float(abs(np.linalg.det(self.lattice)))

    @property
    def formula(self) -> str:
        """Reduced formula (pymatgen convention)."""
        from pymatgen.core import Composition, Element

        counts: dict[str, float] = {}
        for z in self.numbers:
            sym = Element.from_Z(int(z)).symbol
            counts[sym] = counts.get(sym, 0) + 1
        return Composition(counts).reduced_formula

    def modalities(self) -> dict[str, bool]:
        """Which modalities this record carries."""
        from mmmat.modalities import specs

        out = {s.name: s.has(self) for s in specs() if not s.lazy}
        out["literature_text"] = any(not t.generated for t in self.literature_texts)
        out["generated_text"] = any(t.generated for t in self.literature_texts)
        return out

    def validate(self, min_distance: float = MIN_DISTANCE) -> None:
        """Raise :class:`RecordError` if the crystal is unusable.

        Checks: at least one atom, finite coordinates and lattice, a cell volume above 0.1 Å³, known
        elements (1..118), and no two atoms closer than ``min_distance`` Å (periodic images included).
        """
        rid = self.material_id
        if self.num_atoms == 0:
            raise RecordError(rid, "empty structure (no atoms)")
        if not (np.isfinite(self.lattice).all() and np.isfinite(self.frac_coords).all()):
            raise RecordError(rid, "non-finite lattice or coordinates")
        if self.volume < 0.1:
            raise RecordError(rid, f"degenerate cell (volume {self.volume:.3g} Å^3)")
        bad = [int(z) for z in self.numbers if z < 1 or z > MAX_Z]
        if bad:
            raise RecordError(rid, f"unknown element (atomic numbers {sorted(set(bad))})")
        dmin = self.min_distance()
        if dmin < min_distance:
            raise RecordError(rid, f"overlapping atoms (closest pair {dmin:.3f} Å < {min_distance} Å)")

    def min_distance(self) -> float:
        """Shortest interatomic distance in Å, periodic images included (inf for one atom in a big cell)."""
        from pymatgen.optimization.neighbors import find_points_in_spheres

        cart = np.ascontiguousarray(self.cart_coords)
        # search radius: enough to see the nearest image of every atom
        r = 0.5
        while True:
            c, n, _, d = find_points_in_spheres(
                cart, cart, r, np.array([1, 1, 1], dtype=np.int64),
                np.ascontiguousarray(self.lattice), tol=1e-8,
            )
            # two different atoms on the same point
            if np.any((c != n) & (d <= 1e-8)):
                return 0.0
            mask = d > 1e-8
            if mask.any():
                return float(d[mask].min())
            if r > 20.0:
                return math.inf
            r *= 2.0

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_structure(cls, structure: Any, material_id: str, **kwargs: Any) -> MaterialRecord:
        """Build from a pymatgen ``Structure`` (ordered; disordered sites raise :class:`RecordError`)."""
        if not structure.is_ordered:
            raise RecordError(material_id, order_policy_message())
        numbers = [site.specie.Z for site in structure]
        return cls(
            material_id=material_id,
            lattice=structure.lattice.matrix,
            frac_coords=structure.frac_coords if len(structure) else np.zeros((0, 3)),
            numbers=numbers,
            **kwargs,
        )

    def to_structure(self) -> Any:
        """Return a pymatgen ``Structure``."""
        from pymatgen.core import Lattice, Structure

        return Structure(Lattice(self.lattice), [int(z) for z in self.numbers], self.frac_coords)

    def reduced(self) -> MaterialRecord:
        """A copy with the Niggli-reduced cell of the same crystal (atoms in the same order, wrapped into it).

        The reduced cell is unique up to the lattice's symmetry, so a model of lattice parameters (a generator)
        sees one cell per crystal instead of any of the equivalent ones a data source happened to store.
        Everything derived from the crystal alone (patterns, properties, texts) is unchanged.
        """
        from dataclasses import replace

        if self.num_atoms == 0:
            return self
        red = self.to_structure().get_reduced_structure()
        return replace(self, lattice=red.lattice.matrix, frac_coords=red.frac_coords)

    @classmethod
    def from_ase(cls, atoms: Any, material_id: str, **kwargs: Any) -> MaterialRecord:
        """Build from an ASE ``Atoms`` with a full 3-D cell."""
        cell = np.asarray(atoms.cell[:], dtype=np.float64)
        if abs(np.linalg.det(cell)) < 1e-8:
            raise RecordError(material_id, "ASE Atoms has no 3-D cell")
        return cls(
            material_id=material_id,
            lattice=cell,
            frac_coords=atoms.get_scaled_positions(wrap=False),
            numbers=atoms.get_atomic_numbers(),
            **kwargs,
        )

    def to_ase(self) -> Any:
        """Return an ASE ``Atoms`` with periodic boundary conditions."""
        from ase import Atoms

        return Atoms(numbers=self.numbers, scaled_positions=self.frac_coords, cell=self.lattice, pbc=True)

    @classmethod
    def from_cif(cls, cif: str, material_id: str, **kwargs: Any) -> MaterialRecord:
        """Parse CIF text (first structure). Unparseable CIFs raise :class:`RecordError`."""
        structure = parse_cif(cif, material_id)
        return cls.from_structure(structure, material_id, **kwargs)

    def to_cif(self) -> str:
        """Return CIF text."""
        from pymatgen.io.cif import CifWriter

        return str(CifWriter(self.to_structure()))

    # ------------------------------------------------------------------ serialisation
    def to_sample(self) -> dict[str, Any]:
        """Serialise to one webdataset sample (bytes per key; deterministic for the same record).

        Each registered modality (:mod:`mmmat.modalities`) writes its own members and ``meta.json`` entries.
        """
        from mmmat.modalities import specs

        meta: dict[str, Any] = {
            "material_id": self.material_id,
            "split": self.split,
            "properties": {k: (None if math.isnan(v) else v) for k, v in sorted(self.properties.items())},
            "source_ids": self.source_ids,
            "modalities": self.modalities(),
        }
        sample: dict[str, Any] = {"__key__": sample_key(self.material_id)}
        for spec in specs():
            members = spec.encode_sample(self)
            meta.update(members.pop("meta", {}))
            sample.update(members)
        sample[META_KEY] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return sample

    @classmethod
    def from_sample(cls, sample: dict[str, Any]) -> MaterialRecord:
        """Inverse of :meth:`to_sample` (accepts raw bytes or already-decoded values)."""
        from mmmat.modalities import specs

        key = sample.get("__key__", "?")
        try:
            meta = sample[META_KEY]
            meta = json.loads(meta) if isinstance(meta, bytes | bytearray | str) else meta
            kwargs: dict[str, Any] = {}
            for spec in specs():
                kwargs.update(spec.decode_sample(sample, meta))
        except KeyError as exc:
            raise RecordError(str(key), f"sample lacks {exc.args[0]!r}") from None
        props = {k: (math.nan if v is None else float(v)) for k, v in meta.get("properties", {}).items()}
        return cls(
            material_id=meta["material_id"],
            properties=props,
            source_ids=meta.get("source_ids", {}),
            split=meta.get("split", ""),
            **kwargs,
        )


def as_records(items: Any) -> list[MaterialRecord]:
    """Records from any mix of MaterialRecord, pymatgen ``Structure`` and ASE ``Atoms`` (ids ``input-<i>``)."""
    out = []
    for i, x in enumerate(items):
        if isinstance(x, MaterialRecord):
            out.append(x)
        elif hasattr(x, "lattice") and hasattr(x, "frac_coords"):
            out.append(MaterialRecord.from_structure(x, f"input-{i}"))
        elif hasattr(x, "get_scaled_positions"):
            out.append(MaterialRecord.from_ase(x, f"input-{i}"))
        else:
            raise TypeError(f"input {i}: cannot use a {type(x).__name__} as a crystal")
    return out


#: The one policy for partial occupancies, everywhere a crystal goes in.
ORDER_POLICY = (
    "disordered structure (partial occupancies) is not supported: order it first (one species per site, e.g. "
    "with pymatgen's OrderDisorderedStructureTransformation on a supercell), or ask mmmat to order it "
    "(`--order` on the command line, order_structure() in Python)"
)


def order_policy_message(name: str | None = None) -> str:
    """The refusal message for a disordered crystal (``name``: the file or record it came from)."""
    return f"{name}: {ORDER_POLICY}" if name else ORDER_POLICY


def order_structure(structure: Any, max_supercell: int = 8, name: str = "?") -> Any:
    """An ordered version of a disordered ``structure`` (pymatgen's lowest-Ewald-energy ordering).

    Oxidation states are guessed when the structure has none; the cell is enlarged (up to ``max_supercell``
    times) until every site's occupancy times its multiplicity is a whole number of atoms. An ordered
    structure is returned unchanged.

    Raises:
        RecordError: No ordering was found (the message names ``name``).

    """
    import warnings

    from pymatgen.transformations.standard_transformations import OrderDisorderedStructureTransformation

    if structure.is_ordered:
        return structure
    s = structure.copy()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not any(hasattr(sp, "oxi_state") for site in s for sp in site.species):
                s.add_oxidation_state_by_guess()
            for n in range(1, max_supercell + 1):
                occ = [float(v) * n for site in s for v in site.species.values()]
                if all(abs(o - round(o)) < 1e-3 for o in occ):
                    break
            else:
                raise ValueError(f"occupancies need a supercell larger than {max_supercell} cells")
            cell = s * (n, 1, 1) if n > 1 else s
            out = OrderDisorderedStructureTransformation(algo=0).apply_transformation(cell)
            out.remove_oxidation_states()
    except Exception as exc:  # pymatgen raises many types here
        raise RecordError(name, f"could not order the disordered structure ({type(exc).__name__}: {exc})") from None
    return out


def parse_cif(cif: str, record_id: str = "?") -> Any:
    """Parse CIF text into a pymatgen ``Structure`` (:func:`mmmat.io.parse_cif_text`); failures raise RecordError."""
    from mmmat.io import InputError, parse_cif_text

    try:
        return parse_cif_text(cif, record_id)
    except InputError as exc:
        raise RecordError(record_id, str(exc).removeprefix(f"{record_id}: ")) from None


def sample_key(material_id: str) -> str:
    """A webdataset-safe key: no dots (webdataset splits keys at the first dot), slashes or spaces."""
    return "".join(c if (c.isalnum() or c in "-_") else "_" for c in material_id)


def _to_float(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, dtype=np.uint8)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _png_decode(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(io.BytesIO(data)).convert("L"))
