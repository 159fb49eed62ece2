"""Sources for large structure sets: extended XYZ, ASE databases and pymatgen ``ComputedStructureEntry`` JSON.

Each file is read record by record, never whole: extxyz frame by frame (each frame parsed on its own, so a
malformed frame is skipped and the next one read), an ASE database row by row through its cursor, and entry
JSON (``.json``, ``.json.gz``, ``.json.bz2``: a list of entry dicts as in Materials Project dumps, or an object
whose ``entries`` hold them as in Alexandria's files) with ijson's streaming parser.  Only what a record needs
is kept per row (the structure and the named properties), not the whole entry.

Properties come from named fields: ``properties={"band_gap": "data.band_gap"}`` (``mmmat data build entries
--property band_gap=data.band_gap``).  A field is a dotted path into the record:

* extxyz: a key of the frame's ``info`` (the comment line) or of its calculator results (``energy``,
  ``free_energy``, ...);
* ASE database: a row attribute or key-value pair (``energy``, ``natoms``, any key) or ``data.NAME``;
* entry JSON: a path into the entry dict (``energy``, ``correction``, ``data.e_form``, ``parameters.run_type``).

Everywhere ``energy_per_atom`` falls back to the (corrected, for entries) energy divided by the number of atoms
when the record has no such field.  Units are the file's (eV, eV/atom for DFT sets).  A record whose field is
missing or not a number gets NaN for that property and is kept; a record without a usable structure becomes a
failed row (skipped and counted in the manifest, with its reason); a truncated or malformed file ends the
stream with one failed row naming the place, and every record read before it is kept.

Splits follow the mp20p hash rule (80/10/10 by material id), or a ``split`` field of the record when it has one.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from data_pipelines.base import Joins, RawRow, SourceData, register_source
from mmmat.data.reference import hash_split_name

log = logging.getLogger(__name__)

#: Fields tried, in order, for a record's id when no ``id_field`` is given.
ID_FIELDS = ("material_id", "entry_id", "mp_id", "id", "data.material_id", "data.mat_id")


def _split_of(material_id: str, given: Any) -> str:
    if isinstance(given, str) and given in ("train", "val", "test"):
        return given
    return hash_split_name(material_id)


def lookup(record: Any, field: str) -> Any:
    """The value at a dotted ``field`` path of nested mappings (or attributes); None when absent."""
    cur = record
    for part in field.split("."):
        if isinstance(cur, Mapping):
            cur = cur.get(part)
        else:
            cur = getattr(cur, part, None)
        if cur is None:
            return None
    return cur


def _properties(get: Any, fields: Mapping[str, str], n_atoms: int, energy: Any) -> dict[str, Any]:
    """Named properties from ``get(field)``; ``energy_per_atom`` falls back to ``energy / n_atoms``.

    Values are kept as found: the record builder turns a missing or non-numeric one into NaN.
    """
    out = {}
    for name, field in fields.items():
        value = get(field)
        if value is None and field == "energy_per_atom" and energy is not None and n_atoms:
            try:
                value = float(energy) / n_atoms
            except (TypeError, ValueError):
                value = None
        out[name] = value
    return out


def _record_id(get: Any, id_field: str | None, default: str) -> str:
    """The record's id: ``get(id_field)``, else the first of :data:`ID_FIELDS` it has, else ``default``."""
    found = get(id_field) if id_field else next((v for f in ID_FIELDS if (v := get(f)) is not None), None)
    return str(found) if found is not None else default


def _parse_fields(properties: Mapping[str, str] | None) -> dict[str, str]:
    fields = dict(properties or {})
    for name, field in fields.items():
        if not name or not field:
            raise ValueError(f"a property needs a name and a field, got {name!r}={field!r}")
    return fields


def _finish(name: str, rows: list[tuple[str, RawRow]], fields: Mapping[str, str], limit: int | None,
            info: dict[str, Any]) -> SourceData:
    splits: dict[str, list[RawRow]] = {"train": [], "val": [], "test": []}
    for split, row in rows:
        if not limit or len(splits[split]) < limit:
            splits[split].append(row)
    info["records_read"] = len(rows)
    info["records_unusable"] = sum(r.error is not None for _, r in rows)
    return SourceData(name, {k: v for k, v in splits.items() if v}, Joins(), list(fields), info)


def _need_file(root: str | Path | None, what: str) -> Path:
    if root is None:
        raise ValueError(f"the {what} source needs --root FILE")
    p = Path(root)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file ({what})")
    return p


def _structure_row(structure: Any, rid: str, props: dict[str, float], source_ids: dict[str, str]) -> RawRow:
    return RawRow(rid, structure=structure.as_dict(), properties=props, source_ids=source_ids)


def _atoms_row(atoms: Any, where: str, rid: str, get: Any, fields: Mapping[str, str], energy: Any,
               source_ids: dict[str, str]) -> RawRow:
    """The row of one ASE ``Atoms`` (its named properties read by ``get``), or a failed row naming ``where``."""
    from mmmat.io import InputError, structure_from_atoms

    try:
        structure = structure_from_atoms(atoms, where)
    except InputError as exc:
        return RawRow(rid, source_ids=source_ids, error=str(exc))
    return _structure_row(structure, rid, _properties(get, fields, len(atoms), energy), source_ids)


# ====================================================================== extended XYZ
def _open_text(p: Path) -> io.TextIOBase:
    suffix = p.suffix.lower()
    if suffix == ".gz":
        return gzip.open(p, "rt", encoding="utf-8", errors="replace")
    if suffix == ".bz2":
        return bz2.open(p, "rt", encoding="utf-8", errors="replace")
    if suffix == ".xz":
        import lzma

        return lzma.open(p, "rt", encoding="utf-8", errors="replace")
    return open(p, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by the caller


def extxyz_frames(path: str | Path) -> Iterator[tuple[int, int, str | None, str]]:
    """``(frame index, first line number, problem or None, frame text)`` of an extxyz file, one frame at a time.

    A frame is a count line, a comment line and that many atom lines.  A count line that is not an integer is
    a problem: the lines up to the next bare integer are skipped as one bad frame.
    """
    with _open_text(Path(path)) as fh:
        k = 0
        line_no = 0
        pending: str | None = None
        while True:
            head = pending if pending is not None else fh.readline()
            pending = None
            if not head:
                return
            line_no += 1
            start = line_no
            if not head.strip():
                continue
            try:
                n = int(head.strip())
                if n < 0:
                    raise ValueError
            except ValueError:
                while True:  # resynchronise at the next bare integer
                    nxt = fh.readline()
                    if not nxt:
                        break
                    line_no += 1
                    if nxt.strip().isdigit():
                        pending = nxt
                        line_no -= 1
                        break
                yield k, start, f"line {start}: expected an atom count, got {head.strip()[:40]!r}", ""
                k += 1
                continue
            lines = [head]
            for _ in range(n + 1):
                ln = fh.readline()
                if not ln:
                    break
                line_no += 1
                lines.append(ln)
            if len(lines) < n + 2:
                yield k, start, f"line {start}: the file ends inside a frame of {n} atoms", ""
                return
            yield k, start, None, "".join(lines)
            k += 1


@register_source("extxyz")
def load_extxyz(
    root: str | Path | None,
    limit: int | None = None,
    joins: bool = False,
    properties: Mapping[str, str] | None = None,
    id_field: str | None = None,
) -> SourceData:
    """Every frame of an extended XYZ file (``.extxyz``/``.xyz``, also ``.gz``/``.bz2``/``.xz``) as a material.

    The id is ``info[id_field]`` (default: the first of :data:`ID_FIELDS` present, else ``frame-K``).  See
    the module docstring for properties, failures and splits.
    """
    import warnings

    import ase.io

    p = _need_file(root, "extxyz")
    fields = _parse_fields(properties)
    rows: list[tuple[str, RawRow]] = []
    for k, line, problem, text in extxyz_frames(p):
        rid = f"frame-{k}"
        ids = {"file": p.name, "frame": str(k), "line": str(line)}
        if problem is not None:
            rows.append((_split_of(rid, None), RawRow(rid, source_ids=ids, error=f"{p.name}: {problem}")))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                atoms = ase.io.read(io.StringIO(text), format="extxyz")
        except Exception as exc:  # noqa: BLE001 - ASE raises many types on a bad frame
            error = f"{p.name} line {line}: unreadable frame ({type(exc).__name__}: {str(exc)[:160]})"
            rows.append((_split_of(rid, None), RawRow(rid, source_ids=ids, error=error)))
            continue
        info = dict(atoms.info)
        results = dict(atoms.calc.results) if atoms.calc is not None else {}
        merged = {**results, **info}
        get = functools.partial(lookup, merged)
        rid = _record_id(get, id_field, rid)
        row = _atoms_row(atoms, f"{p.name} line {line}", rid, get, fields, merged.get("energy"), ids)
        rows.append((_split_of(rid, merged.get("split")), row))
    return _finish("extxyz", rows, fields, limit, {"file": str(p), "properties": fields})


# ====================================================================== ASE database
@register_source("asedb")
def load_asedb(
    root: str | Path | None,
    limit: int | None = None,
    joins: bool = False,
    properties: Mapping[str, str] | None = None,
    id_field: str | None = None,
) -> SourceData:
    """Every row of an ASE database (``.db`` SQLite, ``.json``, ...) as a material, read through its cursor.

    The id is the row's ``id_field`` (default: the first of :data:`ID_FIELDS` present, else ``row-ID``).  See
    the module docstring for properties, failures and splits.
    """
    import ase.db

    p = _need_file(root, "asedb")
    fields = _parse_fields(properties)
    try:
        db = ase.db.connect(str(p))
        selection = db.select()
    except Exception as exc:  # noqa: BLE001 - ASE raises many types on a bad database
        raise ValueError(f"{p}: not an ASE database ({type(exc).__name__}: {exc})") from None
    rows: list[tuple[str, RawRow]] = []
    try:
        for row in selection:
            def get(field: str, row: Any = row) -> Any:
                if field.startswith("data."):
                    return lookup(row.data, field[5:])
                try:
                    return row.get(field)
                except Exception:  # noqa: BLE001 - a row property that cannot be computed is absent
                    return None

            rid = _record_id(get, id_field, f"row-{row.id}")
            ids = {"file": p.name, "row": str(row.id)}
            split = _split_of(rid, get("split"))
            try:
                atoms = row.toatoms()
            except Exception as exc:  # noqa: BLE001 - a row ASE cannot rebuild is a failed record
                error = f"{p.name} row {row.id}: unusable ({type(exc).__name__}: {str(exc)[:160]})"
                rows.append((split, RawRow(rid, source_ids=ids, error=error)))
                continue
            rows.append((split, _atoms_row(atoms, f"{p.name} row {row.id}", rid, get, fields, get("energy"), ids)))
    except Exception as exc:  # noqa: BLE001 - a corrupt database ends the stream; the rows read are kept
        rid = f"after-{len(rows)}-rows"
        rows.append((_split_of(rid, None), RawRow(rid, error=f"{p.name}: the database stops being readable "
                                                             f"after {len(rows)} rows ({type(exc).__name__}: {exc})")))
    return _finish("asedb", rows, fields, limit, {"file": str(p), "properties": fields})


# ====================================================================== ComputedStructureEntry JSON
def _open_binary(p: Path) -> Any:
    name = p.name.lower()
    if name.endswith(".gz"):
        return gzip.open(p, "rb")
    if name.endswith(".bz2"):
        return bz2.open(p, "rb")
    return open(p, "rb")  # noqa: SIM115 - closed by the caller


def entry_dicts(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """``(index, entry dict or None, problem or None)`` of an entry JSON file, streamed with ijson.

    The file holds a list of entries, or an object whose ``entries`` is that list.  A malformed or truncated
    file ends with one ``(index, None, problem)``.
    """
    import ijson

    p = Path(path)
    with _open_binary(p) as fh:
        head = b""
        while not head.strip():
            chunk = fh.read(1)
            if not chunk:
                yield 0, None, f"{p.name}: empty file"
                return
            head += chunk
    prefix = "item" if head.strip()[:1] == b"[" else "entries.item"
    count = 0
    with _open_binary(p) as fh:
        try:
            for entry in ijson.items(fh, prefix, use_float=True):
                yield count, entry, None
                count += 1
        except (ijson.JSONError, OSError, EOFError, ValueError) as exc:
            yield count, None, (f"{p.name}: malformed or truncated JSON after {count} entries "
                                f"({type(exc).__name__}: {exc})")
            return
    if count == 0 and prefix == "entries.item":
        yield 0, None, f"{p.name}: no entries (expected a JSON list of entries or an object with 'entries')"


@register_source("entries")
def load_entries(
    root: str | Path | None,
    limit: int | None = None,
    joins: bool = False,
    properties: Mapping[str, str] | None = None,
    id_field: str | None = None,
) -> SourceData:
    """Every pymatgen ``ComputedStructureEntry`` of a JSON file (``.json``, ``.json.gz``, ``.json.bz2``).

    The id is ``entry[id_field]`` (default: the first of :data:`ID_FIELDS` present, else ``entry-K``); the
    structure is the entry's ``structure`` (a ``Structure.as_dict()``).  ``energy_per_atom`` falls back to
    (``energy`` + ``correction``)/atoms, the corrected energy per atom of pymatgen's ``ComputedEntry``.  See
    the module docstring for the file layout, properties, failures and splits.
    """
    from pymatgen.core import Structure

    p = _need_file(root, "entries")
    fields = _parse_fields(properties)
    rows: list[tuple[str, RawRow]] = []
    for k, entry, problem in entry_dicts(p):
        rid = f"entry-{k}"
        ids = {"file": p.name, "entry": str(k)}
        if problem is not None:
            rows.append((_split_of(rid, None), RawRow(rid, source_ids=ids, error=problem)))
            continue
        if not isinstance(entry, Mapping):
            rows.append((_split_of(rid, None), RawRow(rid, source_ids=ids, error=f"{p.name} entry {k}: not an "
                                                                                f"object")))
            continue
        rid = _record_id(lambda f, e=entry: lookup(e, f), id_field, rid)
        split = _split_of(rid, lookup(entry, "data.split"))
        sdict = entry.get("structure")
        try:
            structure = Structure.from_dict(sdict)
            if len(structure) == 0:
                raise ValueError("no sites")
        except Exception as exc:  # noqa: BLE001 - pymatgen raises many types on a bad dict
            reason = "no structure" if sdict is None else f"bad structure ({type(exc).__name__}: {str(exc)[:160]})"
            rows.append((split, RawRow(rid, source_ids=ids, error=f"{p.name} entry {k}: {reason}")))
            continue
        energy = entry.get("energy")
        if energy is not None and entry.get("correction") is not None:
            try:
                energy = float(energy) + float(entry["correction"])
            except (TypeError, ValueError):
                energy = None
        props = _properties(lambda f, e=entry: lookup(e, f), fields, len(structure), energy)
        rows.append((split, _structure_row(structure, rid, props, ids)))
    return _finish("entries", rows, fields, limit, {"file": str(p), "properties": fields})
