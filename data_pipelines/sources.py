"""The data sources that ``mmmat data build`` knows: mp20, perov5, carbon24, generic and builtin.

The large-file sources (extxyz, asedb, entries) live in :mod:`data_pipelines.bulk`, registered on import here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from data_pipelines.base import Joins, RawRow, SourceData, register_source
from mmmat.data.reference import (
    BUILTIN_PROPERTIES,
    CARBON24_PROPERTIES,
    MP20_PROPERTIES,
    PEROV5_PROPERTIES,
    builtin_prototypes,
    hash_split_name,
    limit_rows,
    read_csv_table,
    read_mp20p,
    read_split_tables,
)

log = logging.getLogger(__name__)


def _default_joins(data_root: Path, use_joins: bool) -> tuple[Joins, dict[str, Any]]:
    """Recipe and literature indexes from the folders beside a source (when present)."""
    info: dict[str, Any] = {}
    joins = Joins()
    if not use_joins:
        return joins, info
    syn = data_root / "synthesis_textmined"
    if syn.exists():
        from data_pipelines.recipes import RecipeIndex

        joins.recipes = RecipeIndex.from_root(syn)
        info["recipes"] = joins.recipes.stats()
    else:
        info["recipes"] = f"not found: {syn}"
    if any((data_root / d).exists() for d in ("matscholar_ner", "glass_abstracts_matscibert", "sofc_exp_corpus")):
        from data_pipelines.literature import LiteratureIndex

        joins.literature = LiteratureIndex.from_root(data_root)
        info["literature"] = joins.literature.stats()
    else:
        info["literature"] = f"not found under {data_root}"
    return joins, info


@register_source("mp20")
def load_mp20(root: str | Path, limit: int | None = None, joins: bool = True) -> SourceData:
    """The mp20p split of the partial MP-20 copy (see ../shared/data/README.md).

    train + val: every row of ``slices_raw_mp20_dataset_mini_train.csv.xz`` and
    ``REASSEMBLED_val_partial.csv.xz``; val is the 10 % whose material_id hashes (sha1, first 8 hex digits,
    modulo 10) to 0. test: every row of ``REASSEMBLED_test_partial.csv.xz``. Properties: formation energy and
    energy above hull in eV/atom, band gap in eV, space-group number.
    """
    root = Path(root)
    splits = read_mp20p(root)
    j, info = _default_joins(root.parent, joins)
    return SourceData("mp20", limit_rows(splits, limit), j, list(MP20_PROPERTIES), {"split": "mp20p", **info})


@register_source("perov5")
def load_perov5(root: str | Path, limit: int | None = None, joins: bool = False) -> SourceData:
    """CDVAE perovskites (val and test only are staged). Heats of formation in eV/atom, gaps in eV."""
    root = Path(root)
    splits = read_split_tables(root, PEROV5_PROPERTIES, "formula")
    j, info = _default_joins(root.parent, joins)
    return SourceData("perov5", limit_rows(splits, limit), j, list(PEROV5_PROPERTIES), info)


@register_source("carbon24")
def load_carbon24(root: str | Path, limit: int | None = None, joins: bool = False) -> SourceData:
    """CDVAE carbon polymorphs (val and test only are staged). Energy per atom in eV/atom."""
    root = Path(root)
    splits = read_split_tables(root, CARBON24_PROPERTIES)
    j, info = _default_joins(root.parent, joins)
    return SourceData("carbon24", limit_rows(splits, limit), j, list(CARBON24_PROPERTIES), info)


@register_source("generic")
def load_generic(root: str | Path, limit: int | None = None, joins: bool = False) -> SourceData:
    """A folder of CIF files, or a CSV file with a ``cif`` column and property columns.

    Folder: each ``*.cif`` is one material (id = file stem); an optional ``properties.csv`` in the folder
    with a ``material_id`` column adds numeric properties. CSV: the id is ``material_id`` (else the row
    number), every other numeric column is a property, and a ``split`` column (train/val/test) is used when
    present. Without a split column, rows go to train/val/test by the mp20p hash rule (80/10/10).
    """
    import pandas as pd

    root = Path(root)
    rows: list[RawRow] = []
    split_of: dict[str, str] = {}
    prop_cols: list[str] = []
    if root.is_dir():
        props: dict[str, dict[str, Any]] = {}
        pfile = root / "properties.csv"
        if pfile.exists():
            pdf = read_csv_table(pfile)
            if "material_id" not in pdf.columns:
                raise ValueError(f"{pfile}: needs a material_id column")
            prop_cols = [c for c in pdf.columns if c not in ("material_id", "split")]
            for rec in pdf.to_dict("records"):
                props[str(rec["material_id"])] = {c: rec[c] for c in prop_cols}
                if isinstance(rec.get("split"), str):
                    split_of[str(rec["material_id"])] = rec["split"]
        for f in sorted(root.glob("*.cif")):
            try:
                text = f.read_text(errors="replace")
            except OSError as exc:
                text = f"unreadable: {exc}"
            rows.append(RawRow(f.stem, cif=text, properties=props.get(f.stem, {}), source_ids={"file": f.name}))
    elif root.is_file():
        df = read_csv_table(root)
        if "cif" not in df.columns:
            raise ValueError(f"{root}: a generic CSV needs a 'cif' column (found {list(df.columns)})")
        prop_cols = [
            c
            for c in df.columns
            if c not in ("cif", "material_id", "split") and pd.api.types.is_numeric_dtype(df[c])
            and not str(c).startswith("Unnamed")
        ]
        for i, rec in enumerate(df.to_dict("records")):
            mid = str(rec["material_id"]) if "material_id" in df.columns else f"row-{i}"
            if isinstance(rec.get("split"), str):
                split_of[mid] = rec["split"]
            rows.append(
                RawRow(
                    mid,
                    cif=rec["cif"] if isinstance(rec["cif"], str) else None,
                    properties={c: rec[c] for c in prop_cols},
                    source_ids={"file": root.name, "row": str(i)},
                )
            )
    else:
        raise FileNotFoundError(f"{root}: neither a folder of CIFs nor a CSV file")
    splits: dict[str, list[RawRow]] = {"train": [], "val": [], "test": []}
    for r in rows:
        splits.setdefault(split_of.get(r.material_id, hash_split_name(r.material_id)), []).append(r)
    splits = {k: v for k, v in splits.items() if v}
    j, info = _default_joins(root.parent, joins)
    return SourceData("generic", limit_rows(splits, limit), j, prop_cols, info)


@register_source("builtin")
def load_builtin(root: str | Path | None = None, limit: int | None = None, joins: bool = False) -> SourceData:
    """The embedded default: the 288 AFLOW prototype crystals that ship inside pymatgen.

    Works offline on a fresh install. Properties are computed from the structure (density in g/cm³, volume
    per atom in Å³, number of atoms), so they are exact but only illustrative. Each prototype's mineral name,
    Strukturbericht and Pearson symbols become a generated text. Split by the mp20p hash rule (80/10/10).
    """
    splits = builtin_prototypes()
    return SourceData(
        "builtin",
        limit_rows(splits, limit),
        Joins(),
        list(BUILTIN_PROPERTIES),
        {"origin": "pymatgen.analysis.prototypes.AFLOW_PROTOTYPE_LIBRARY"},
    )


import data_pipelines.bulk  # noqa: E402, F401  (registers extxyz, asedb and entries)
