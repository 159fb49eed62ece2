"""Reference sets of crystals read from their raw tables, split by material.

``mp20``
    The mp20p split of the partial MP-20 copy (a folder like ../shared/data/mp_20; see its README).
``perov5``, ``carbon24``
    The CDVAE tables (``train/val/test.csv.xz``; only val and test are staged for these two).
``builtin``
    The 288 AFLOW prototype crystals that ship inside pymatgen (works offline on a fresh install).

A reader returns, per split, a list of :class:`RawRow` in the file's order (id, CIF text or structure dict,
properties); it parses no CIF, so reading is fast and a malformed CIF surfaces only where a structure is
needed (:func:`row_structure` names the row). The shard builder (``mmmat data build``) adds recipe and
literature joins to these rows and renders every modality; the library reads known phases and templates
through :func:`read_reference` (the design loop, the peak tables of ``mmmat index add --source``).

Units of the properties: mp20 formation energy and energy above hull in eV/atom, band gap in eV; perov5 heats
of formation in eV/atom and gaps in eV; carbon24 energy in eV/atom; builtin density in g/cm³, volume per atom
in Å³.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmmat.data.schema import RecordError, TextItem

#: The mp20p raw files under the mp_20 folder: the train pool, the val part and the test part.
MP20_FILES = (
    "slices_raw_mp20_dataset_mini_train.csv.xz",
    "REASSEMBLED_val_partial.csv.xz",
    "REASSEMBLED_test_partial.csv.xz",
)
#: Properties of mp20 rows (eV/atom, eV, eV/atom, space-group number).
MP20_PROPERTIES = ["formation_energy_per_atom", "band_gap", "e_above_hull", "spacegroup_number"]
#: Properties of perov5 rows (eV/atom, eV/atom, eV, eV).
PEROV5_PROPERTIES = ["heat_all", "heat_ref", "dir_gap", "ind_gap"]
#: Properties of carbon24 rows (eV/atom).
CARBON24_PROPERTIES = ["energy_per_atom"]
#: Properties of builtin rows (g/cm³, Å³, count), computed from each structure.
BUILTIN_PROPERTIES = ["density", "volume_per_atom", "num_atoms"]


@dataclass
class RawRow:
    """One row of a source before rendering.

    Attributes:
        material_id: Unique id in the source.
        cif: CIF text of the structure (or None when ``structure`` is given).
        structure: A pymatgen ``Structure`` as a dict (``Structure.as_dict()``), or None.
        properties: Named numeric properties (NaN or None = missing).
        formula: Reduced formula if the source gives one (used for text joins), else derived.
        source_ids: Ids in the source (row index, original file, ...).
        extra_texts: Texts that come with the row itself (e.g. prototype names), already labelled.
        error: Why the row cannot be used (reported and skipped by the shard builder), or None.

    """

    material_id: str
    cif: str | None = None
    structure: dict[str, Any] | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    formula: str | None = None
    source_ids: dict[str, str] = field(default_factory=dict)
    extra_texts: list[TextItem] = field(default_factory=list)
    error: str | None = None


@dataclass
class ReferenceSet:
    """Rows per split of a reference set, and the names of their properties."""

    name: str
    splits: dict[str, list[RawRow]]
    property_columns: list[str]


def hash_split(material_id: str, modulo: int = 10) -> int:
    """Bucket of ``material_id``: sha1, first 8 hex digits as an integer, modulo ``modulo`` (mp20p rule)."""
    return int(hashlib.sha1(material_id.encode("utf-8")).hexdigest()[:8], 16) % modulo


def hash_split_name(material_id: str) -> str:
    """The split of ``material_id`` by the mp20p hash rule: bucket 0 val, 1 test, the rest train (80/10/10)."""
    b = hash_split(material_id)
    return "val" if b == 0 else "test" if b == 1 else "train"


def read_csv_table(path: str | Path) -> Any:
    """Read a CSV (plain, .gz or .xz) with pandas, keeping ids as strings."""
    import pandas as pd

    return pd.read_csv(path, dtype={"material_id": str}, keep_default_na=True)


def rows_from_table(
    df: Any, columns: list[str], file: str, rename: dict[str, str] | None = None, formula_col: str | None = None
) -> list[RawRow]:
    """Rows of a table with ``material_id`` and ``cif`` columns; ``columns`` become properties (renamed by ``rename``).

    The table's first column is recorded as the row index in ``source_ids`` (with the file name and the id).
    """
    rename = rename or {}
    idx_col = df.columns[0]
    rows = []
    for rec in df.to_dict("records"):
        props = {rename.get(c, c): rec.get(c) for c in columns}
        mid = str(rec["material_id"])
        rows.append(
            RawRow(
                material_id=mid,
                cif=rec.get("cif") if isinstance(rec.get("cif"), str) else None,
                properties=props,
                formula=rec.get(formula_col) if formula_col and isinstance(rec.get(formula_col), str) else None,
                source_ids={"file": file, "row": str(rec.get(idx_col, "")), "mp_id": mid},
            )
        )
    return rows


def limit_rows(splits: dict[str, list[RawRow]], limit: int | None) -> dict[str, list[RawRow]]:
    """The first ``limit`` rows of each split (all rows when ``limit`` is None or 0)."""
    if not limit:
        return splits
    return {k: v[:limit] for k, v in splits.items()}


def _need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"expected {path} (is --root the right folder?)")
    return path


def read_mp20p(root: str | Path) -> dict[str, list[RawRow]]:
    """The mp20p split of the partial MP-20 copy in folder ``root`` (see ../shared/data/README.md).

    train + val: every row of ``slices_raw_mp20_dataset_mini_train.csv.xz`` and
    ``REASSEMBLED_val_partial.csv.xz`` (first occurrence of an id kept); val is the 10 % whose material_id
    hashes (:func:`hash_split`) to 0. test: every row of ``REASSEMBLED_test_partial.csv.xz``. Properties
    (:data:`MP20_PROPERTIES`): formation energy and energy above hull in eV/atom, band gap in eV, space-group
    number.

    Raises:
        FileNotFoundError: a file of :data:`MP20_FILES` is missing (the message names it).

    """
    root = Path(root)
    pool_name, val_name, test_name = MP20_FILES
    frames = [read_csv_table(_need(root / name)) for name in MP20_FILES]
    cols = ["formation_energy_per_atom", "band_gap", "e_above_hull", "spacegroup.number"]
    rename = {"spacegroup.number": "spacegroup_number"}
    trainval: list[RawRow] = []
    seen: set[str] = set()
    for df, name in ((frames[0], pool_name), (frames[1], val_name)):
        for row in rows_from_table(df, cols, name, rename, "pretty_formula"):
            if row.material_id in seen:
                continue
            seen.add(row.material_id)
            trainval.append(row)
    return {
        "train": [r for r in trainval if hash_split(r.material_id) != 0],
        "val": [r for r in trainval if hash_split(r.material_id) == 0],
        "test": rows_from_table(frames[2], cols, test_name, rename, "pretty_formula"),
    }


def read_split_tables(root: str | Path, columns: list[str], formula_col: str | None = None) -> dict[str, list[RawRow]]:
    """The CDVAE layout: ``train.csv.xz``, ``val.csv.xz``, ``test.csv.xz`` in ``root`` (those present).

    Raises:
        FileNotFoundError: none of the three files is in ``root``.

    """
    root = Path(root)
    splits = {}
    for split in ("train", "val", "test"):
        p = root / f"{split}.csv.xz"
        if p.exists():
            splits[split] = rows_from_table(read_csv_table(p), columns, p.name, None, formula_col)
    if not splits:
        raise FileNotFoundError(f"no train/val/test.csv.xz under {root}")
    return splits


def builtin_prototypes() -> dict[str, list[RawRow]]:
    """The AFLOW prototype crystals shipped inside pymatgen, split by the mp20p hash rule (80/10/10).

    Properties (:data:`BUILTIN_PROPERTIES`) are computed from the structure (density in g/cm³, volume per atom
    in Å³, number of atoms), so they are exact but only illustrative. Each prototype's mineral name,
    Strukturbericht and Pearson symbols become a generated text.
    """
    from pymatgen.analysis.prototypes import AFLOW_PROTOTYPE_LIBRARY

    rows: list[RawRow] = []
    for entry in AFLOW_PROTOTYPE_LIBRARY:
        snl = entry["snl"]
        structure = snl.structure
        tags = entry.get("tags", {})
        mid = "aflow-" + str(tags.get("aflow", len(rows)))
        n_same = sum(1 for r in rows if r.material_id == mid or r.material_id.startswith(mid + "-v"))
        if n_same:  # a few AFLOW labels name more than one prototype
            mid = f"{mid}-v{n_same + 1}"
        words = [f"{structure.composition.reduced_formula} in the {tags.get('aflow', '?')} prototype"]
        if tags.get("mineral"):
            words.append(f"the {tags['mineral']} structure")
        if tags.get("strukturbericht"):
            words.append(f"Strukturbericht designation {tags['strukturbericht']}")
        if tags.get("pearson"):
            words.append(f"Pearson symbol {tags['pearson']}")
        rows.append(
            RawRow(
                mid,
                structure=structure.as_dict(),
                properties={
                    "density": float(structure.density),
                    "volume_per_atom": float(structure.volume / len(structure)),
                    "num_atoms": float(len(structure)),
                },
                source_ids={"aflow": str(tags.get("aflow", "")), "library": "pymatgen AFLOW prototypes"},
                extra_texts=[TextItem(", ".join(words) + ".", "aflow_prototype_tags", generated=True)],
            )
        )
    splits: dict[str, list[RawRow]] = {"train": [], "val": [], "test": []}
    for r in rows:
        splits[hash_split_name(r.material_id)].append(r)
    return splits


#: name -> (reader of a root folder (ignored by builtin), property columns)
REFERENCE_SETS: dict[str, tuple[Callable[[Any], dict[str, list[RawRow]]], list[str]]] = {
    "mp20": (read_mp20p, MP20_PROPERTIES),
    "perov5": (lambda root: read_split_tables(root, PEROV5_PROPERTIES, "formula"), PEROV5_PROPERTIES),
    "carbon24": (lambda root: read_split_tables(root, CARBON24_PROPERTIES), CARBON24_PROPERTIES),
    "builtin": (lambda root: builtin_prototypes(), BUILTIN_PROPERTIES),
}


def read_reference(name: str, root: str | Path | None = None, limit: int | None = None) -> ReferenceSet:
    """Rows per split of the reference set ``name`` (``mp20``, ``perov5``, ``carbon24`` or ``builtin``).

    Args:
        name: A key of :data:`REFERENCE_SETS`.
        root: Its folder (e.g. ../shared/data/mp_20); not used by ``builtin``.
        limit: At most this many rows per split (None: all).

    Raises:
        KeyError: unknown ``name`` (the message lists the known ones).
        ValueError: no ``root`` for a set that needs one.
        FileNotFoundError: a file of the set is missing under ``root``.

    """
    if name not in REFERENCE_SETS:
        raise KeyError(f"unknown reference set {name!r}; known: {sorted(REFERENCE_SETS)}")
    reader, columns = REFERENCE_SETS[name]
    if root is None and name != "builtin":
        raise ValueError(f"reference set {name!r} needs its folder (root)")
    return ReferenceSet(name, limit_rows(reader(root), limit), list(columns))


def row_structure(row: RawRow) -> Any:
    """The pymatgen ``Structure`` of a row (from its structure dict, else its CIF text).

    Raises:
        RecordError: no structure, or one that cannot be parsed (the message names the row).

    """
    import warnings

    from pymatgen.core import Structure

    if row.structure is None and row.cif is None:
        raise RecordError(row.material_id, "row has neither a CIF nor a structure")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if row.structure is not None:
                return Structure.from_dict(row.structure)
            return Structure.from_str(row.cif, fmt="cif")
    except Exception as exc:  # pymatgen raises many types on bad CIFs and dicts
        raise RecordError(row.material_id, f"malformed structure ({type(exc).__name__})") from None
