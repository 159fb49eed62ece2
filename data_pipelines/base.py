"""What a data source is: raw rows per split, plus the joins that turn a row into a record.

A source returns, per split, a list of :class:`~mmmat.data.reference.RawRow` in a fixed order (the order
decides which shard a row lands in, so a rebuild writes the same shards).  :func:`make_record` turns one row into a
:class:`~mmmat.data.schema.MaterialRecord` with every modality rendered; it raises
:class:`~mmmat.data.schema.RecordError` for a row that cannot be used, and the builder reports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mmmat.data.reference import RawRow, hash_split  # noqa: F401 (re-export: the row type and the mp20p rule)
from mmmat.data.schema import MaterialRecord, RecordError, TextItem, parse_cif


@dataclass
class BuildOptions:
    """What to render for each record.

    Attributes:
        xrd: Compute the powder pattern (Cu Kα, grid of :mod:`mmmat.data.xrd`).
        image: Simulate a Z-contrast image.
        describe: Add a generated structure description (labelled generated) where no literature text exists.
        max_atoms: Rows with more atoms are reported and skipped (0 = no limit).
        min_distance: Atoms closer than this (Å) count as overlapping.
        leak_free_texts: A joined text (recipe or literature, matched by formula or id) pairs only with
            materials of one split: a text that would join materials of two splits is dropped from all of them
            and counted in the manifest (``text_pairs``), so no text links a test material to a training one.

    """

    xrd: bool = True
    image: bool = True
    describe: bool = True
    max_atoms: int = 0
    min_distance: float = 0.5
    leak_free_texts: bool = True


@dataclass
class Joins:
    """Indexes that add texts to a material (picklable, sent once to every worker)."""

    recipes: Any = None  # data_pipelines.recipes.RecipeIndex
    literature: Any = None  # data_pipelines.literature.LiteratureIndex
    #: joined texts that would pair with materials of more than one split (dropped; see BuildOptions)
    cross_split: frozenset[str] = frozenset()

    def texts_for(self, row: RawRow, formula: str | None) -> tuple[list[TextItem], list[TextItem]]:
        """(processing, literature) texts joined to ``row``, before any cross-split filtering."""
        proc = self.recipes.lookup(row.source_ids.get("mp_id") or row.material_id, formula) if self.recipes else []
        lit = self.literature.lookup(formula) if self.literature is not None else []
        return proc, lit


@dataclass
class SourceData:
    """What a source loader returns."""

    name: str
    splits: dict[str, list[RawRow]]
    joins: Joins = field(default_factory=Joins)
    property_columns: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def make_record(row: RawRow, split: str, joins: Joins, options: BuildOptions) -> tuple[MaterialRecord, dict]:
    """Render every modality of one row; returns the record and per-record notes (e.g. clipped texts)."""
    from pymatgen.core import Structure

    from mmmat.data.text import MAX_TEXT_CHARS, clip_text

    notes: dict[str, Any] = {}
    rid = row.material_id
    if row.error:
        raise RecordError(rid, row.error)
    if row.structure is not None:
        if not row.structure.get("sites"):
            raise RecordError(rid, "empty structure (no atoms)")
        try:
            structure = Structure.from_dict(row.structure)
        except Exception as exc:
            raise RecordError(rid, f"bad structure dict ({type(exc).__name__}: {exc})") from None
    elif row.cif is not None:
        structure = parse_cif(row.cif, rid)
    else:
        raise RecordError(rid, "row has neither a CIF nor a structure")
    if len(structure) == 0:
        raise RecordError(rid, "empty structure (no atoms)")
    if options.max_atoms and len(structure) > options.max_atoms:
        raise RecordError(rid, f"{len(structure)} atoms > max_atoms={options.max_atoms}")
    for site in structure:
        if not site.is_ordered:
            raise RecordError(rid, "disordered structure (partial occupancies) is not supported")
        z = getattr(site.specie, "Z", None)
        if z is None or not (1 <= int(z) <= 118):
            raise RecordError(rid, f"unknown element {site.species_string!r}")

    props = {}
    for k, v in row.properties.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        props[k] = f if math.isfinite(f) else math.nan

    record = MaterialRecord.from_structure(
        structure, rid, properties=props, source_ids=dict(row.source_ids), split=split
    )
    record.validate(min_distance=options.min_distance)

    from mmmat.modalities import specs

    # modalities rendered from the structure and stored in the shards (each switchable by its BuildOptions flag)
    for spec in specs():
        if spec.derived and not spec.lazy and getattr(options, spec.name, True):
            spec.fill_record(record, structure)

    formula = row.formula or structure.composition.reduced_formula
    texts_clipped = dropped = 0
    proc, lit = joins.texts_for(row, formula)
    for texts, target in ((proc, record.processing_texts), (lit, record.literature_texts)):
        for t in texts:
            if options.leak_free_texts and t.text in joins.cross_split:
                dropped += 1
                continue
            t.text, clipped = clip_text(t.text, MAX_TEXT_CHARS)
            texts_clipped += clipped
            target.append(t)
    if dropped:
        notes["texts_dropped_cross_split"] = dropped
    for t in row.extra_texts:
        t = TextItem(t.text, t.source, t.generated, t.ref)
        t.text, clipped = clip_text(t.text, MAX_TEXT_CHARS)
        texts_clipped += clipped
        record.literature_texts.append(t)
    if options.describe and not any(not t.generated for t in record.literature_texts):
        from mmmat.data.text import describe_structure

        record.literature_texts.append(
            TextItem(describe_structure(structure), source="mmmat/describe_structure", generated=True)
        )
    if texts_clipped:
        notes["texts_clipped"] = texts_clipped
    return record, notes


#: name -> loader(root, limit) -> SourceData
SOURCES: dict[str, Callable[..., SourceData]] = {}


def register_source(name: str) -> Callable[[Callable[..., SourceData]], Callable[..., SourceData]]:
    """Register a source loader under ``name`` (used by ``mmmat data build NAME``)."""

    def deco(fn: Callable[..., SourceData]) -> Callable[..., SourceData]:
        SOURCES[name] = fn
        return fn

    return deco


def get_source(name: str) -> Callable[..., SourceData]:
    """Return the loader registered under ``name``."""
    import data_pipelines.sources  # noqa: F401  (registers the built-in sources)

    if name not in SOURCES:
        raise KeyError(f"unknown data source {name!r}; known: {sorted(SOURCES)}")
    return SOURCES[name]

