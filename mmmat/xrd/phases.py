"""Peak tables of the crystals of an index: computed once, cached beside the index as ``phases.npz``.

A phase table holds, for every crystal, its reflections merged by d-spacing: d in Å (down to
:data:`D_MIN`) and the kinematic intensity 2·Σ|F|² of the merged reflections in electrons² per cell
**without** the Lorentz-polarisation factor (it depends on the wavelength and the instrument, so
:mod:`mmmat.xrd.identify` applies it at the scan's wavelength).  The intensities come from
:func:`mmmat.data.xrd_torch.reflections_torch` (pymatgen's scattering factors, no Debye-Waller factor).
Because they are absolute (per unit cell), a fitted scale factor S gives weight fractions by the
Hill-Howard relation w ∝ S·Z·M·V, with Z·M the cell mass (``mass``, amu) and V the cell volume
(``volume``, Å³).

On disk: ``phases.npz`` with the per-crystal columns ``material_id``, ``formula``, ``spacegroup``,
``elements`` (space-separated symbols), ``mass``, ``volume``, ``source``, and the ragged peaks ``d``,
``intensity`` with ``offsets`` (crystal i owns ``offsets[i]:offsets[i + 1]``).  An index folder may hold only
this file (a structure-only index: classical identification needs no model) or sit beside a FAISS
embedding index of the same crystals (:mod:`mmmat.retrieval`).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmmat.io import InputError

#: Smallest d-spacing kept, Å (Cu Kα1 2θ = 149°, Mo Kα 52°).
D_MIN = 0.8
#: Largest d-spacing kept, Å.
D_MAX = 50.0
#: File name of the table inside an index folder.
PHASES_FILE = "phases.npz"
#: Reflections closer in d than this relative amount are merged.
MERGE_RTOL = 2e-5
#: Reflections weaker than this fraction of a crystal's strongest are dropped.
MIN_RELATIVE = 1e-4


@dataclass
class PhaseTable:
    """Peak tables of N crystals (see the module docstring for the columns and units)."""

    material_id: np.ndarray
    formula: np.ndarray
    spacegroup: np.ndarray
    elements: np.ndarray
    mass: np.ndarray
    volume: np.ndarray
    source: np.ndarray
    d: np.ndarray
    intensity: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return int(self.material_id.shape[0])

    def peaks(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(d in Å, intensity without LP) of crystal ``i``, by decreasing d."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.d[a:b], self.intensity[a:b]

    def element_sets(self) -> list[frozenset[str]]:
        """Each crystal's elements."""
        return [frozenset(e.split()) for e in self.elements]

    def rows_within(self, elements: Iterable[str]) -> np.ndarray:
        """Rows of the crystals made only of ``elements``."""
        allowed = frozenset(elements)
        return np.array([i for i, e in enumerate(self.element_sets()) if e <= allowed], dtype=np.int64)

    def take(self, rows: Sequence[int]) -> PhaseTable:
        """A table of the given rows, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        counts = (self.offsets[rows + 1] - self.offsets[rows]).astype(np.int64)
        idx = np.concatenate([np.arange(self.offsets[r], self.offsets[r + 1]) for r in rows]) if rows.size else \
            np.zeros(0, dtype=np.int64)
        return PhaseTable(
            self.material_id[rows], self.formula[rows], self.spacegroup[rows], self.elements[rows],
            self.mass[rows], self.volume[rows], self.source[rows], self.d[idx], self.intensity[idx],
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        )

    @staticmethod
    def concat(tables: Sequence[PhaseTable]) -> PhaseTable:
        """Tables one after the other."""
        tables = [t for t in tables if len(t)]
        if not tables:
            return empty_table()
        cols = {k: np.concatenate([getattr(t, k) for t in tables]) for k in
                ("material_id", "formula", "spacegroup", "elements", "mass", "volume", "source", "d",
                 "intensity")}
        offs, base = [np.zeros(1, dtype=np.int64)], 0
        for t in tables:
            offs.append(t.offsets[1:] + base)
            base += int(t.offsets[-1])
        return PhaseTable(**cols, offsets=np.concatenate(offs))

    def save(self, folder: str | Path, info: dict | None = None) -> Path:
        """Write ``phases.npz`` (and ``phases.json``: counts and ``info``) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (PHASES_FILE + ".tmp.npz")
        np.savez(tmp, **{k: getattr(self, k) for k in self.__dataclass_fields__})
        tmp.replace(folder / PHASES_FILE)
        doc = {"crystals": len(self), "reflections": int(self.offsets[-1]), "d_min": D_MIN,
               "intensity": "2 sum |F|^2 per cell, electrons^2, no Lorentz-polarisation", **(info or {})}
        (folder / "phases.json").write_text(json.dumps(doc, indent=1))
        return folder / PHASES_FILE

    @classmethod
    def load(cls, folder: str | Path) -> PhaseTable:
        """Read the table of an index folder."""
        path = Path(folder) / PHASES_FILE
        if not path.is_file():
            raise InputError(f"{folder}: no peak table ({PHASES_FILE}); add crystals with `mmmat index add`")
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: z[k] for k in cls.__dataclass_fields__})


def empty_table() -> PhaseTable:
    """A table of no crystals."""
    s = np.zeros(0, dtype="<U1")
    f = np.zeros(0, dtype=np.float64)
    return PhaseTable(s, s, np.zeros(0, dtype=np.int64), s, f, f, s, np.zeros(0, np.float32),
                      np.zeros(0, np.float32), np.zeros(1, dtype=np.int64))


# ====================================================================== computing tables
def _masses() -> np.ndarray:
    from pymatgen.core.periodic_table import Element

    out = np.zeros(119)
    for z in range(1, 119):
        try:
            out[z] = float(Element.from_Z(z).atomic_mass)
        except (ValueError, TypeError):
            out[z] = 2.5 * z
    return out


def compute_table(crystals: Sequence[dict[str, Any]], batch_size: int = 256) -> PhaseTable:
    """Peak tables of crystals given as dicts.

    Each dict: ``material_id``, ``lattice`` (3, 3) rows in Å, ``frac`` (N, 3), ``z`` (N,), optional ``occ``
    (N,) site occupancies, ``formula``, ``spacegroup`` (int or None → 0), ``source``.
    """
    import torch

    from mmmat.data.xrd_torch import reflections_torch

    if not crystals:
        return empty_table()
    masses = _masses()
    lam = 1.0
    tt_range = (math.degrees(2 * math.asin(lam / (2 * D_MAX))), math.degrees(2 * math.asin(lam / (2 * D_MIN))))
    parts_d, parts_i, counts = [], [], []
    for b0 in range(0, len(crystals), batch_size):
        chunk = crystals[b0:b0 + batch_size]
        lat = torch.as_tensor(np.stack([np.asarray(c["lattice"], float) for c in chunk]), dtype=torch.float64)
        frac = torch.as_tensor(np.concatenate([np.asarray(c["frac"], float).reshape(-1, 3) for c in chunk]))
        z = torch.as_tensor(np.concatenate([np.asarray(c["z"], np.int64) for c in chunk]))
        occ = torch.as_tensor(np.concatenate([np.asarray(c.get("occ", np.ones(len(c["z"]))), float)
                                              for c in chunk]))
        batch = torch.as_tensor(np.repeat(np.arange(len(chunk)), [len(c["z"]) for c in chunk]))
        refl = reflections_torch(lat, frac, z, batch, wavelength=lam, two_theta_range=tt_range, occupancy=occ)
        th = torch.deg2rad(refl.two_theta.double()) / 2
        lp = (1 + torch.cos(2 * th) ** 2) / (torch.sin(th) ** 2 * torch.cos(th))
        inten = (refl.intensity.double() / lp).numpy()
        d = refl.d.double().numpy()
        owner = refl.crystal.numpy()
        for k in range(len(chunk)):
            sel = owner == k
            dk, ik = d[sel], inten[sel]
            if dk.size:
                order = np.argsort(-dk)
                dk, ik = dk[order], ik[order]
                new = np.concatenate([[True], np.diff(np.log(dk)) < -MERGE_RTOL])
                group = np.cumsum(new) - 1
                ik = np.bincount(group, weights=ik)
                dk = np.bincount(group, weights=dk * 1.0) / np.bincount(group)
                keep = ik >= MIN_RELATIVE * ik.max()
                dk, ik = dk[keep], ik[keep]
            parts_d.append(dk.astype(np.float32))
            parts_i.append(ik.astype(np.float32))
            counts.append(dk.size)
    vol = np.array([abs(float(np.linalg.det(np.asarray(c["lattice"], float)))) for c in crystals])
    mass = np.array([float((masses[np.asarray(c["z"], np.int64)] * np.asarray(c.get("occ", 1.0))).sum())
                     for c in crystals])
    return PhaseTable(
        material_id=np.array([str(c["material_id"]) for c in crystals]),
        formula=np.array([str(c.get("formula") or "") for c in crystals]),
        spacegroup=np.array([int(c.get("spacegroup") or 0) for c in crystals], dtype=np.int64),
        elements=np.array([" ".join(sorted(c["elements"])) for c in crystals]),
        mass=mass, volume=vol,
        source=np.array([str(c.get("source") or "") for c in crystals]),
        d=np.concatenate(parts_d) if parts_d else np.zeros(0, np.float32),
        intensity=np.concatenate(parts_i) if parts_i else np.zeros(0, np.float32),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
    )


def crystal_from_structure(structure: Any, material_id: str, source: str = "",
                           spacegroup: int | None = None) -> dict[str, Any]:
    """A :func:`compute_table` entry from a pymatgen ``Structure`` (disordered sites by occupancy)."""
    frac, z, occ = [], [], []
    for site in structure:
        for sp, amount in site.species.items():
            frac.append(site.frac_coords)
            z.append(int(sp.Z))
            occ.append(float(amount))
    if spacegroup is None:
        spacegroup = _spacegroup(structure.lattice.matrix, structure.frac_coords,
                                 [s.specie.Z if s.is_ordered else 0 for s in structure])
    return {
        "material_id": material_id, "lattice": np.asarray(structure.lattice.matrix), "frac": np.array(frac),
        "z": np.array(z), "occ": np.array(occ), "formula": structure.composition.reduced_formula,
        "spacegroup": spacegroup, "source": source,
        "elements": sorted({el.symbol for el in structure.composition.elements}),
        "structure": structure,
    }


def crystal_from_record(rec: Any, source: str = "") -> dict[str, Any]:
    """A :func:`compute_table` entry from a :class:`mmmat.data.schema.MaterialRecord`."""
    from pymatgen.core.periodic_table import Element

    sg = rec.properties.get("spacegroup_number")
    sg = int(round(sg)) if sg is not None and np.isfinite(sg) else _spacegroup(rec.lattice, rec.frac_coords,
                                                                                rec.numbers)
    return {
        "material_id": rec.material_id, "lattice": rec.lattice, "frac": rec.frac_coords, "z": rec.numbers,
        "formula": rec.formula, "spacegroup": sg, "source": source or rec.split,
        "elements": sorted({Element.from_Z(int(z)).symbol for z in rec.numbers}),
    }


def _spacegroup(lattice: Any, frac: Any, numbers: Any) -> int:
    import spglib

    try:
        ds = spglib.get_symmetry_dataset((np.asarray(lattice), np.asarray(frac), np.asarray(numbers)),
                                         symprec=0.1)
    except Exception:  # spglib raises on cells it cannot analyse
        return 0
    return 0 if ds is None else int(ds.number if hasattr(ds, "number") else ds["number"])


# ====================================================================== reading user crystals
def structures_from_paths(paths: Sequence[str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Crystals from CIF (or other structure) files, folders of them, and CSV tables with a ``cif`` column.

    Returns:
        (entries for :func:`compute_table`, problems: one message per file or row skipped, naming it).

    """
    from mmmat.io import STRUCTURE_SUFFIXES, read_structure

    out, problems = [], []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in STRUCTURE_SUFFIXES)
            if not files:
                problems.append(f"{p}: no structure files ({', '.join(STRUCTURE_SUFFIXES)})")
        elif p.is_file():
            files = [p]
        else:
            raise InputError(f"{p}: no such file or folder")
        for f in files:
            if f.suffix.lower() in (".csv", ".xz", ".gz") or f.name.endswith((".csv.xz", ".csv.gz")):
                out_csv, probs = _structures_from_csv(f)
                out += out_csv
                problems += probs
                continue
            try:
                s = read_structure(f)
            except InputError as exc:
                problems.append(str(exc))
                continue
            out.append(crystal_from_structure(s, f.stem, source=str(f.name)))
    return out, problems


def _structures_from_csv(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    import pandas as pd
    from pymatgen.core import Structure

    try:
        df = pd.read_csv(path)
    except Exception as exc:  # pandas raises many types on bad files
        raise InputError(f"{path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
    if "cif" not in df.columns:
        raise InputError(f"{path}: no 'cif' column (columns: {', '.join(map(str, df.columns))})")
    ids = df["material_id"].astype(str) if "material_id" in df.columns else [f"{path.stem}-{i}" for i in
                                                                             range(len(df))]
    sgs = df["spacegroup.number"] if "spacegroup.number" in df.columns else [None] * len(df)
    out, problems = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mid, cif, sg in zip(ids, df["cif"], sgs):
            try:
                s = Structure.from_str(str(cif), fmt="cif")
            except Exception as exc:  # pymatgen raises many types on bad CIFs
                problems.append(f"{path} [{mid}]: malformed CIF ({type(exc).__name__})")
                continue
            sg = int(sg) if sg is not None and np.isfinite(sg) else None
            out.append(crystal_from_structure(s, mid, source=path.name, spacegroup=sg))
    return out, problems


def add_crystals(index_dir: str | Path, crystals: Sequence[dict[str, Any]], skip_duplicates: bool = False,
                 info: dict | None = None) -> tuple[int, int]:
    """Compute the peak tables of ``crystals`` and append them to the index folder's table.

    Returns:
        ``(added, skipped)``; a material id already in the table is an error unless ``skip_duplicates``.

    """
    folder = Path(index_dir)
    old = PhaseTable.load(folder) if (folder / PHASES_FILE).is_file() else empty_table()
    have = set(old.material_id.tolist())
    seen: set[str] = set()
    fresh = []
    for c in crystals:
        mid = str(c["material_id"])
        if mid in have or mid in seen:
            if not skip_duplicates:
                raise InputError(f"material id {mid!r} is already in {folder} (use --skip-duplicates)")
            continue
        seen.add(mid)
        fresh.append(c)
    t0 = time.perf_counter()
    table = PhaseTable.concat([old, compute_table(fresh)])
    doc = {"seconds_last_add": round(time.perf_counter() - t0, 2), **(info or {})}
    table.save(folder, doc)
    return len(fresh), len(crystals) - len(fresh)


def ensure_table(index_dir: str | Path) -> PhaseTable:
    """The index's peak table; computed from the shards an embedding index records when missing."""
    folder = Path(index_dir)
    if (folder / PHASES_FILE).is_file():
        return PhaseTable.load(folder)
    meta = folder / "index.json"
    if not meta.is_file():
        raise InputError(f"{folder}: not an index (no {PHASES_FILE} and no index.json)")
    from mmmat.retrieval.api import shard_records

    info = json.loads(meta.read_text())
    records = []
    for shard_dir in info.get("shards", []):
        records += shard_records(shard_dir, info.get("splits"))
    if not records:
        raise InputError(f"{folder}: the index records no shards to compute peak tables from")
    add_crystals(folder, [crystal_from_record(r) for r in records], skip_duplicates=True,
                 info={"from_shards": info.get("shards", [])})
    return PhaseTable.load(folder)


def crystals_from_source(source: str, root: str | Path, splits: Sequence[str] | None = None
                         ) -> tuple[list[dict[str, Any]], list[str]]:
    """Crystals of a reference set (``mp20``, ``perov5``, ``carbon24``, ``builtin``; :mod:`mmmat.data.reference`).

    A folder of CIFs or a CSV table with a ``cif`` column is read by :func:`structures_from_paths`; other
    sources of ``mmmat data build`` (extxyz, ASE databases, entry JSON) are built into shards first.

    Returns:
        (entries for :func:`compute_table`, problems: one message per row skipped, naming it).

    """
    from mmmat.data.reference import REFERENCE_SETS, read_reference, row_structure
    from mmmat.data.schema import RecordError

    if source not in REFERENCE_SETS:
        raise InputError(
            f"unknown reference set {source!r}; known: {sorted(REFERENCE_SETS)} (CIF files, folders of them and "
            "CSV tables with a cif column are read as files; other sources of `mmmat data build` are added from "
            "their shards)"
        )
    try:
        data = read_reference(source, root)
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(str(exc)) from None
    out, problems = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for split, rows in data.splits.items():
            if splits and split not in splits:
                continue
            for row in rows:
                try:
                    s = row_structure(row)
                except RecordError as exc:
                    problems.append(f"{source}:{split} [{row.material_id}]: {exc.reason}")
                    continue
                sg = row.properties.get("spacegroup_number")
                sg = int(sg) if sg is not None and np.isfinite(sg) else None
                out.append(crystal_from_structure(s, row.material_id, source=f"{source}:{split}", spacegroup=sg))
    return out, problems
