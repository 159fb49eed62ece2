"""Embedding lookup with a trained model: embed shards, build and extend an index, search it by any modality.

The same verbs as the command line (``mmmat embed``, ``mmmat index build``, ``mmmat index add``,
``mmmat search``).  The index holds crystal embeddings (the gallery); a query may be

* a CIF file (first structure, parsed with pymatgen) → ``crystal``;
* a measured powder pattern (any format :func:`mmmat.io.read_pattern` reads: vendor files, xy/csv, powder CIF) put on
  the model's 2θ grid (5-90°, Cu Kα, :func:`mmmat.data.xrd.resample`) → ``xrd``;
* an image (PNG, TIFF, anything Pillow reads, or ``.npy``) turned into 8-bit grayscale and resized to the
  image encoder's side (64 px by default) → ``image``;
* a sentence → ``literature_text`` (or ``processing_text``).

An index records the fingerprint of the model that embedded it (sha256 of ``config.json`` and
``model.safetensors``); searching or extending it with another model is refused, since the two embedding
spaces would not match.  Every problem with an input raises :class:`~mmmat.retrieval.index.RetrievalError`
with a message that names it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmmat.io import InputError, read_image, read_structure
from mmmat.retrieval.index import (
    DEFAULT_APPROX_THRESHOLD,
    DEFAULT_NPROBE,
    EmbeddingIndex,
    Hit,
    RetrievalError,
    make_meta,
)

TEXT_MODALITIES = ("literature_text", "processing_text")


def __getattr__(name: str) -> Any:
    # ``EMBED_MODALITIES``: modalities an index or a query can be embedded from (every registered one)
    if name == "EMBED_MODALITIES":
        from mmmat.modalities import modality_names

        return modality_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------- the model
def model_fingerprint(model_dir: str | Path) -> str:
    """``sha256:<hex>`` of a saved model's ``config.json`` followed by its ``model.safetensors``."""
    from mmmat.modelio import model_fingerprint as fingerprint

    try:
        return fingerprint(model_dir)
    except FileNotFoundError as exc:
        raise RetrievalError(str(exc)) from None


def load_model(model_dir: str | Path) -> Any:
    """Load a :class:`~mmmat.latent.model.MultimodalModel` for inference (CPU, eval mode)."""
    from mmmat.latent.model import MultimodalModel

    d = Path(model_dir)
    if not d.is_dir():
        raise RetrievalError(f"model directory {d} not found")
    try:
        model = MultimodalModel.from_pretrained(d)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise RetrievalError(f"cannot load the model in {d}: {exc}") from None
    model.model_dir = str(d.resolve())
    return model.eval()


def _require(model: Any, modality: str) -> None:
    from mmmat.modalities import modality_names

    if modality not in modality_names():
        raise RetrievalError(f"unknown modality {modality!r} (one of {', '.join(modality_names())})")
    if modality not in model.modalities:
        where = getattr(model, "model_dir", "this model")
        has = ", ".join(model.modalities)
        raise RetrievalError(f"the model in {where} has no {modality!r} encoder (it has {has})")


# ---------------------------------------------------------------------- shards
def shard_records(shard_dir: str | Path, split: str | Sequence[str] | None = None) -> list[Any]:
    """Every record of the given splits (default: all in ``manifest.json``) of a shard folder."""
    from mmmat.data.loader import load_records
    from mmmat.io import find_shards

    try:
        found = find_shards(shard_dir, split)
    except InputError as exc:
        raise RetrievalError(str(exc)) from None
    return load_records([u for urls in found.values() for u in urls])


def _spacegroup(rec: Any, symprec: float) -> int | None:
    v = rec.properties.get("spacegroup_number")
    if v is not None and np.isfinite(v):
        return int(round(v))
    if symprec <= 0:
        return None
    import spglib

    try:
        ds = spglib.get_symmetry_dataset((rec.lattice, rec.frac_coords, rec.numbers), symprec=symprec)
    except Exception:  # spglib raises on cells it cannot analyse
        return None
    return None if ds is None else int(ds.number if hasattr(ds, "number") else ds["number"])


def material_table(records: Sequence[Any], symprec: float = 0.1) -> pd.DataFrame:
    """Material table of records: id, formula, space group, split, and every property as an extra column.

    The space group number is the record's ``spacegroup_number`` property when it has one, else spglib's
    (tolerance ``symprec`` Å; 0 leaves it unknown).
    """
    rows = []
    for r in records:
        row = {
            "material_id": r.material_id,
            "formula": r.formula,
            "spacegroup_number": _spacegroup(r, symprec),
            "split": r.split,
        }
        row.update({k: v for k, v in r.properties.items() if k != "spacegroup_number"})
        rows.append(row)
    return make_meta(pd.DataFrame(rows), len(rows))


def _modality_inputs(records: Sequence[Any], modality: str) -> tuple[list[int], Any]:
    """(rows that carry ``modality``, their inputs for ``model.embed``), as the modality's spec reads them."""
    from mmmat.modalities import get_modality

    spec = get_modality(modality)
    rows, values = [], []
    for i, r in enumerate(records):
        v = spec.record_input(r)
        if v is not None:
            rows.append(i)
            values.append(v)
    if values and isinstance(values[0], np.ndarray):
        return rows, np.stack(values)
    return rows, values


def embed_records(
    model: Any, records: Sequence[Any], modality: str = "crystal", batch_size: int = 128, symprec: float = 0.1
) -> pd.DataFrame:
    """Embed one modality of ``records``: their material table plus an ``embedding`` column (float32 arrays).

    Records without the modality are left out (text modalities use each record's first text).
    """
    from mmmat.progress import report

    _require(model, modality)
    rows, inputs = _modality_inputs(records, modality)
    kept = [records[i] for i in rows]
    table = material_table(kept, symprec)
    if not rows:
        table["embedding"] = pd.Series([], dtype=object)
        return table
    chunk = max(batch_size, 16 * batch_size)  # progress every few batches; results do not depend on it
    parts = []
    task = f"embedding {modality}"
    report(task, 0, len(rows))
    for start in range(0, len(rows), chunk):
        parts.append(model.embed(modality, inputs[start : start + chunk], batch_size=batch_size).float().cpu().numpy())
        report(task, min(start + chunk, len(rows)), len(rows))
    emb = np.concatenate(parts)
    table["embedding"] = list(emb.astype(np.float32))
    return table


def embed_shards(
    model: Any,
    shard_dir: str | Path,
    modality: str = "crystal",
    split: str | Sequence[str] | None = None,
    batch_size: int = 128,
) -> pd.DataFrame:
    """Embed every material of a shard folder (``model``: a loaded model or a model folder).

    Returns:
        The material table (``material_id``, ``formula``, ``spacegroup_number``, ``spacegroup_symbol``,
        ``split``, properties) with an ``embedding`` column of (embed_dim,) float32 arrays.

    """
    if isinstance(model, str | Path):
        model = load_model(model)
    _require(model, modality)
    return embed_records(model, shard_records(shard_dir, split), modality, batch_size)


def embedding_matrix(table: pd.DataFrame) -> np.ndarray:
    """The ``embedding`` column of an :func:`embed_shards` table as an (N, d) float32 array."""
    if len(table) == 0:
        raise RetrievalError("no embeddings to index (no material carries the modality)")
    return np.stack(table["embedding"].to_numpy()).astype(np.float32)


# ---------------------------------------------------------------------- index build and add
def build_index(
    model_dir: str | Path,
    shard_dir: str | Path,
    out: str | Path,
    split: str | Sequence[str] | None = None,
    kind: str = "auto",
    nprobe: int = DEFAULT_NPROBE,
    approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
    batch_size: int = 128,
    threads: int | None = None,
) -> EmbeddingIndex:
    """Embed the crystals of a shard folder with a saved model and write an index to ``out``.

    Args:
        model_dir: Folder written by ``MultimodalModel.save_pretrained``.
        shard_dir: Folder written by ``mmmat data build``.
        out: Index folder to write.
        split: Split name(s) (comma-separated or a list); default every split.
        kind: ``auto`` (exact up to ``approx_threshold`` vectors, IVF above), ``exact`` or ``ivf``.
        nprobe: IVF lists scanned per query.
        approx_threshold: Size above which ``auto`` builds an IVF index.
        batch_size: Crystals per forward pass.
        threads: FAISS threads (default: every available core).

    """
    model = load_model(model_dir)
    _require(model, "crystal")
    fingerprint = model_fingerprint(model_dir)
    t0 = time.perf_counter()
    table = embed_shards(model, shard_dir, "crystal", split, batch_size)
    embed_s = time.perf_counter() - t0
    info = {
        "model_fingerprint": fingerprint,
        "model_path": str(Path(model_dir).resolve()),
        "modality": "crystal",
        "shards": [str(Path(shard_dir).resolve())],
        "splits": sorted(set(table["split"])),
        "embed_seconds": round(embed_s, 3),
    }
    index = EmbeddingIndex.build(
        embedding_matrix(table), table.drop(columns="embedding"), kind=kind, nprobe=nprobe,
        approx_threshold=approx_threshold, threads=threads, info=info,
    )
    index.save(out)
    return index


def open_index(index_dir: str | Path, nprobe: int | None = None) -> EmbeddingIndex:
    """Load an index folder, turning a missing or broken folder into a :class:`RetrievalError`."""
    try:
        return EmbeddingIndex.load(index_dir, nprobe=nprobe)
    except FileNotFoundError as exc:
        raise RetrievalError(str(exc)) from None


def check_model(index: EmbeddingIndex, model_dir: str | Path) -> str:
    """Refuse a model other than the one the index was built with; returns the fingerprint."""
    fp = model_fingerprint(model_dir)
    want = index.info.get("model_fingerprint")
    if want and fp != want:
        raise RetrievalError(
            f"the index was built with another model (fingerprint {want[:19]}…, from "
            f"{index.info.get('model_path', '?')}), but {model_dir} has {fp[:19]}…: its embeddings would not "
            "match; search with the index's own model or rebuild the index"
        )
    return fp


def _model_dir(index: EmbeddingIndex, model_dir: str | Path | None) -> Path:
    if model_dir is not None:
        return Path(model_dir)
    recorded = index.info.get("model_path")
    if not recorded:
        raise RetrievalError("the index records no model path: pass the model folder")
    return Path(recorded)


def _crystal_index(index_dir: str | Path, model_dir: str | Path | None) -> tuple[EmbeddingIndex, Any]:
    """The index to add crystals to and the model that built it (checked by fingerprint and modality)."""
    index = open_index(index_dir)
    mdir = _model_dir(index, model_dir)
    model = load_model(mdir)
    check_model(index, mdir)
    if index.info.get("modality", "crystal") != "crystal":
        raise RetrievalError(f"the index holds {index.info['modality']!r} embeddings, not crystals")
    return index, model


def add_to_index(
    index_dir: str | Path,
    shard_dir: str | Path,
    model_dir: str | Path | None = None,
    split: str | Sequence[str] | None = None,
    skip_duplicates: bool = False,
    batch_size: int = 128,
) -> tuple[int, int]:
    """Embed the crystals of another shard folder and append them to an index (no rebuild).

    Args:
        index_dir: Index folder (rewritten in place).
        shard_dir: Shard folder to add.
        model_dir: The model the index was built with (default: the path recorded in ``index.json``).
        split: Split name(s); default every split.
        skip_duplicates: Leave out materials already indexed instead of refusing the whole batch.
        batch_size: Crystals per forward pass.

    Returns:
        ``(added, skipped)`` counts.

    """
    index, model = _crystal_index(index_dir, model_dir)
    table = embed_shards(model, shard_dir, "crystal", split, batch_size)
    meta = table.drop(columns="embedding")
    added = index.add(embedding_matrix(table), meta, skip_duplicates=skip_duplicates)
    index.info["shards"] = [*index.info.get("shards", []), str(Path(shard_dir).resolve())]
    index.info["splits"] = sorted(set(index.meta["split"]))
    index.save(index_dir)
    return added, len(table) - added


def add_structures_to_index(
    index_dir: str | Path,
    structures: Sequence[tuple[str, Any]],
    model_dir: str | Path | None = None,
    skip_duplicates: bool = False,
    batch_size: int = 128,
) -> tuple[int, int]:
    """Embed crystals given as ``(material_id, pymatgen Structure)`` and append them to an index.

    Returns:
        ``(added, skipped)`` counts.

    """
    from mmmat.data.schema import MaterialRecord, RecordError

    index, model = _crystal_index(index_dir, model_dir)
    records = []
    for mid, s in structures:
        try:
            rec = MaterialRecord.from_structure(s, mid)
            rec.validate()
        except RecordError as exc:
            raise RetrievalError(f"{mid}: {exc.reason}") from None
        records.append(rec)
    table = embed_records(model, records, "crystal", batch_size)
    added = index.add(embedding_matrix(table), table.drop(columns="embedding"), skip_duplicates=skip_duplicates)
    index.save(index_dir)
    return added, len(table) - added


# ---------------------------------------------------------------------- queries
def read_query(modality: str, value: Any, model: Any = None, wavelength: float | None = None) -> Any:
    """One raw input of ``modality`` read by its spec (:meth:`mmmat.modalities.ModalitySpec.read_query`).

    ``value``: a file path, or an in-memory value the spec takes (CIF text, a Structure, a ``Pattern``, an
    array, a sentence). Bad input raises :class:`RetrievalError` naming it.
    """
    from mmmat.io import InputError
    from mmmat.modalities import get_modality

    spec = get_modality(modality)
    if isinstance(value, str | Path) and not spec.is_text and not (
        isinstance(value, str) and "\n" in value
    ):
        value = Path(value)
        if not value.is_file():
            raise RetrievalError(f"{spec.label or spec.name} file {value} not found")
    try:
        return spec.read_query(value, model, wavelength=wavelength)
    except InputError as exc:
        raise RetrievalError(f"unusable {spec.label or spec.name} query: {exc}") from None


def query_record(cif: str | Path | Any) -> Any:
    """A crystal query as a validated record.

    ``cif`` is a structure file or CIF text (:func:`mmmat.io.read_structure`), or a pymatgen ``Structure``.

    Raises:
        InputError: unreadable file, or a structure that is no valid record (the message names it).

    """
    from mmmat.data.schema import MaterialRecord, RecordError

    text_given = isinstance(cif, str) and "\n" in cif
    name = "<CIF text>" if text_given else str(cif) if isinstance(cif, str | Path) else "<structure>"
    structure = read_structure(cif) if isinstance(cif, str | Path) else cif
    try:
        rec = MaterialRecord.from_structure(structure, name)
        rec.validate()
    except RecordError as exc:
        raise InputError(f"{name}: {exc.reason}") from None
    return rec


#: An image query as a (size, size) uint8 array (:func:`mmmat.io.read_image`; kept importable here).
load_image = read_image


def _image_size(model: Any) -> int:
    enc = model.encoders["image"]
    return int(getattr(enc, "image_size", None) or model.config["encoders"]["image"].get("image_size") or 64)


def embed_query(
    model: Any,
    cif: str | Path | None = None,
    xrd: str | Path | None = None,
    image: str | Path | np.ndarray | None = None,
    text: str | None = None,
    text_modality: str = "literature_text",
    wavelength: float | None = None,
    query: tuple[str, Any] | None = None,
) -> tuple[str, np.ndarray]:
    """Embed one query given as exactly one of ``query``, ``cif``, ``xrd``, ``image`` or ``text``.

    Args:
        model: A loaded :class:`~mmmat.latent.model.MultimodalModel`.
        cif: CIF file (or CIF text) → ``crystal`` (alias of ``query=("crystal", cif)``).
        xrd: Powder pattern file (any :func:`mmmat.io.read_pattern` format) → ``xrd``.
        image: Image file (PNG/TIFF/...) or ``.npy``, or an array → ``image``.
        text: A sentence → ``text_modality``.
        text_modality: ``literature_text`` or ``processing_text``.
        wavelength: Wavelength of a pattern in Å when the file does not give it (default: the modality's).
        query: ``(modality, value)`` for any registered modality (:mod:`mmmat.modalities`) or alias
            (``structure``, ``cif``, ``neutron``, ...): a file path or what the modality's reader takes.

    Returns:
        ``(modality, (embed_dim,) float32 embedding)``.

    """
    from mmmat.modalities import get_modality

    given = {k: v for k, v in (("query", query), ("cif", cif), ("xrd", xrd), ("image", image), ("text", text))
             if v is not None}
    if len(given) != 1:
        got = ", ".join(sorted(given)) or "none"
        raise RetrievalError(f"give exactly one query (query, cif, xrd, image or text), got {got}")
    if text is not None:
        if text_modality not in TEXT_MODALITIES:
            known = ", ".join(TEXT_MODALITIES)
            raise RetrievalError(f"text_modality must be one of {known}, got {text_modality!r}")
        query = (text_modality, text)
    elif query is None:
        query = next(iter(given.items()))
    name, value = query
    try:
        modality = get_modality(name).name
    except KeyError as exc:
        raise RetrievalError(str(exc.args[0])) from None
    _require(model, modality)
    raw = read_query(modality, value, model, wavelength)
    inputs = raw[None] if isinstance(raw, np.ndarray) else [raw]
    with _one_thread():
        return modality, model.embed(modality, inputs).float().cpu().numpy()[0]


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one CPU thread for the duration (one small query gains nothing from more).

    Thread hand-offs cost far more than the work of one input, and on a busy machine each one can wait for a
    time slice (hundreds of ms per forward pass measured on 2 shared cores, against ~10 ms on one thread).
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def search(
    index_dir: str | Path,
    model_dir: str | Path | None = None,
    *,
    cif: str | Path | None = None,
    xrd: str | Path | None = None,
    image: str | Path | np.ndarray | None = None,
    text: str | None = None,
    text_modality: str = "literature_text",
    k: int = 10,
    nprobe: int | None = None,
    wavelength: float | None = None,
    query: tuple[str, Any] | None = None,
) -> list[Hit]:
    """Search an index with one query (see :func:`embed_query`) and return the top ``k`` hits, best first.

    Args:
        index_dir: Index folder.
        model_dir: The model the index was built with (default: the path recorded in ``index.json``).
        cif: CIF file or text.
        xrd: Powder pattern file.
        image: Image file or array.
        text: A sentence.
        text_modality: ``literature_text`` or ``processing_text`` for ``text``.
        k: Number of hits.
        nprobe: IVF lists to scan (default: the index's).
        wavelength: Wavelength in Å for a pattern file that does not say (default: the modality's).
        query: ``(modality, value)`` for any registered modality, e.g. ``("neutron", "scan.xy")``.

    """
    index = open_index(index_dir, nprobe=nprobe)
    mdir = _model_dir(index, model_dir)
    model = load_model(mdir)
    check_model(index, mdir)
    _, q = embed_query(model, cif=cif, xrd=xrd, image=image, text=text, text_modality=text_modality,
                       wavelength=wavelength, query=query)
    return index.search(q, k)


# ---------------------------------------------------------------------- batch queries
def query_kind(path: str | Path) -> str | None:
    """The modality of a query file by its suffix (:func:`mmmat.modalities.query_modality`; None: unknown)."""
    from mmmat.modalities import query_modality

    return query_modality(path)


def collect_queries(source: str | Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Queries from a folder (every file with a known suffix) or a list file (one query per line).

    In a list file, a line naming an existing file (absolute, or relative to the list's folder) is a file
    query; ``text: ...`` is a sentence; empty lines and lines starting with ``#`` are skipped.

    Returns:
        ``(queries, skipped)``: ``(kind, value)`` pairs with kind a modality name or ``text``, and
        ``(entry, reason)`` for entries that are not usable queries.

    """
    src = Path(source)
    queries: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    if src.is_dir():
        for f in sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")):
            kind = query_kind(f)
            if kind is None:
                skipped.append((str(f), "unknown suffix"))
            else:
                queries.append((kind, str(f)))
    elif src.is_file():
        for line in src.read_text(encoding="utf-8", errors="replace").splitlines():
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if entry.lower().startswith("text:"):
                queries.append(("text", entry[5:].strip()))
                continue
            p = Path(entry) if Path(entry).is_absolute() else src.parent / entry
            kind = query_kind(p)
            if not p.is_file():
                skipped.append((entry, "file not found (write 'text: ...' for a sentence)"))
            elif kind is None:
                skipped.append((entry, "unknown suffix"))
            else:
                queries.append((kind, str(p)))
    else:
        raise RetrievalError(f"--queries {src}: neither a folder nor a list file")
    return queries, skipped


def search_queries(
    index_dir: str | Path,
    queries: Sequence[tuple[str, Any]],
    model_dir: str | Path | None = None,
    k: int = 10,
    nprobe: int | None = None,
    wavelength: float | None = None,
    text_modality: str = "literature_text",
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Search many queries with one model load; a bad query is skipped and reported, never fatal.

    Args:
        index_dir: Index folder.
        queries: ``(kind, value)`` pairs, kind a registered modality (or alias) or ``text``.
        model_dir: The index's model (default: the path recorded in the index).
        k: Hits per query.
        nprobe: IVF lists to scan.
        wavelength: X-ray wavelength in Å for pattern files that do not say (default Cu Kα).
        text_modality: ``literature_text`` or ``processing_text``.

    Returns:
        ``(hits, failures)``: one row per hit (``query``, ``kind``, ``rank``, ``material_id``, ``formula``,
        ``spacegroup``, ``score``) and ``(query, reason)`` for each query that could not be embedded.

    """
    index = open_index(index_dir, nprobe=nprobe)
    mdir = _model_dir(index, model_dir)
    model = load_model(mdir)
    check_model(index, mdir)
    vecs, names, kinds, failures = [], [], [], []
    for kind, value in queries:
        try:
            given = {"text": value} if kind == "text" else {"query": (kind, value)}
            _, q = embed_query(model, text_modality=text_modality, wavelength=wavelength, **given)
        except (RetrievalError, ValueError) as exc:
            failures.append((str(value), str(exc)))
            continue
        vecs.append(q)
        names.append(str(value))
        kinds.append(kind)
    cols = ["query", "kind", "rank", "material_id", "formula", "spacegroup", "score"]
    if not vecs:
        return pd.DataFrame(columns=cols), failures
    scores, rows = index.search_batch(np.stack(vecs), k)
    recs = [{"query": names[i], "kind": kinds[i], **h.to_dict()} for i, hs in enumerate(index.hits(scores, rows))
            for h in hs]
    return pd.DataFrame(recs, columns=cols), failures
