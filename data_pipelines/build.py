"""Build webdataset shards and ``manifest.json`` from a source, in parallel and resumably.

Layout written under ``out``::

    out/<split>/shard-000000.tar        one sample per material (see MaterialRecord.to_sample)
    out/<split>/shard-000000.json       the shard's report: samples, failures with reasons, sha256, bytes
    out/manifest.json                   counts per split, coverage per modality, every failure, shards

Rows are assigned to shards by their position in the source (``shard_size`` rows per shard), so the
assignment does not depend on the number of workers. A shard is done when its report exists and the tar's
size and sha256 match it; a rebuild skips such shards, so a build killed half-way continues where it
stopped and ends with the same shards (tar members carry fixed mtime/owner, so bytes are reproducible).
A row that fails is reported with its reason and skipped; it never aborts the build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

from data_pipelines.base import BuildOptions, Joins, RawRow, SourceData, make_record
from mmmat.data.manifest import MANIFEST_VERSION, load_manifest, write_manifest  # noqa: F401 (re-export)
from mmmat.data.schema import RecordError

log = logging.getLogger(__name__)

_JOINS: Joins | None = None  # set in each worker process
_OPTIONS: BuildOptions | None = None


def _init_worker(joins: Joins, options: BuildOptions) -> None:
    global _JOINS, _OPTIONS
    _JOINS, _OPTIONS = joins, options
    import warnings

    warnings.filterwarnings("ignore")


def _init_pool_worker(joins: Joins, options: BuildOptions) -> None:
    _init_worker(joins, options)
    # one BLAS thread per worker process: many threaded pools on few cores slow small products down
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shard_done(tar: Path, report: Path) -> dict[str, Any] | None:
    """The shard's report if the shard is complete and intact, else None."""
    if not (tar.exists() and report.exists()):
        return None
    try:
        rep = json.loads(report.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rep.get("bytes") != tar.stat().st_size or rep.get("sha256") != sha256_file(tar):
        return None
    return rep


def build_shard(split: str, index: int, rows: list[RawRow], tar: Path, report: Path) -> dict[str, Any]:
    """Render ``rows`` into one tar shard and write its report; returns the report."""
    import webdataset as wds

    joins = _JOINS if _JOINS is not None else Joins()
    options = _OPTIONS if _OPTIONS is not None else BuildOptions()
    t0 = time.perf_counter()
    failures: list[dict[str, str]] = []
    coverage: Counter[str] = Counter()
    texts_clipped = texts_dropped = 0
    n = 0
    tmp = tar.with_suffix(f".tar.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, user="mmmat", group="mmmat", mtime=0.0)
        for row in rows:
            try:
                record, notes = make_record(row, split, joins, options)
                sample = record.to_sample()
            except RecordError as exc:
                failures.append({"material_id": row.material_id, "reason": exc.reason})
                continue
            except Exception as exc:  # a renderer bug must not abort the build: report it
                failures.append({"material_id": row.material_id, "reason": f"{type(exc).__name__}: {exc}"})
                continue
            writer.write(sample)
            n += 1
            texts_clipped += notes.get("texts_clipped", 0)
            texts_dropped += notes.get("texts_dropped_cross_split", 0)
            for k, v in record.modalities().items():
                coverage[k] += int(v)
        writer.close()
    os.replace(tmp, tar)
    rep = {
        "split": split,
        "shard": tar.name,
        "index": index,
        "rows": len(rows),
        "samples": n,
        "failures": failures,
        "coverage": dict(sorted(coverage.items())),
        "texts_clipped": texts_clipped,
        "texts_dropped_cross_split": texts_dropped,
        "bytes": tar.stat().st_size,
        "sha256": sha256_file(tar),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    rtmp = report.with_suffix(f".json.tmp{os.getpid()}")
    rtmp.write_text(json.dumps(rep, indent=1))
    os.replace(rtmp, report)
    return rep


def _run_shard(args: tuple[str, int, list[RawRow], str, str]) -> dict[str, Any]:
    split, index, rows, tar, report = args
    return build_shard(split, index, rows, Path(tar), Path(report))


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("mmmat", "pymatgen", "numpy", "webdataset"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _mark_duplicates(source: SourceData) -> None:
    """Flag every repeat of a material_id (across all splits) so it is reported, not written twice."""
    first: dict[str, str] = {}
    for split, rows in source.splits.items():
        for row in rows:
            if row.material_id in first and row.error is None:
                row.error = f"duplicate material_id (first seen in split {first[row.material_id]!r})"
            first.setdefault(row.material_id, split)


def _formula(row: RawRow) -> str | None:
    """The reduced formula a row's texts are joined by (parsed from its structure when the source gives none)."""
    if row.formula:
        return row.formula
    try:
        from pymatgen.core import Structure

        if row.structure is not None:
            return Structure.from_dict(row.structure).composition.reduced_formula
        if row.cif is not None:
            return Structure.from_str(row.cif, fmt="cif").composition.reduced_formula
    except Exception:  # a bad row is reported by the build itself
        return None
    return None


def cross_split_texts(source: SourceData) -> tuple[frozenset[str], dict[str, Any]]:
    """Joined texts that would pair with materials of more than one split, and the counts for the manifest.

    Every row's recipe and literature joins are looked up as the build will look them up; a text whose
    materials fall in two or more splits is returned (the build drops it everywhere).
    """
    joins = source.joins
    if joins.recipes is None and joins.literature is None:
        return frozenset(), {"leak_free": True, "texts_joined": 0, "texts_dropped_cross_split": 0}
    where: dict[str, set[str]] = {}
    for split, rows in source.splits.items():
        for row in rows:
            if row.error is not None:
                continue
            proc, lit = joins.texts_for(row, _formula(row))
            for t in (*proc, *lit):
                where.setdefault(t.text, set()).add(split)
    crossing = frozenset(t for t, splits in where.items() if len(splits) > 1)
    kept = Counter(next(iter(s)) for t, s in where.items() if len(s) == 1)
    stats = {
        "leak_free": True,
        "texts_joined": len(where),
        "texts_dropped_cross_split": len(crossing),
        "texts_kept_by_split": dict(sorted(kept.items())),
    }
    return crossing, stats


def build_shards(
    source: SourceData,
    out: str | Path,
    workers: int = 1,
    shard_size: int = 256,
    options: BuildOptions | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Write shards for every split of ``source`` under ``out`` and return the manifest.

    Args:
        source: Rows per split and the joins (from a registered source loader).
        out: Output folder (created).
        workers: Worker processes (1 = in this process).
        shard_size: Rows per shard.
        options: What to render.
        progress: Show a progress bar.
        command: The command line, recorded in the manifest.

    """
    options = options or BuildOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _mark_duplicates(source)
    text_pairs: dict[str, Any] = {"leak_free": False}
    if options.leak_free_texts:
        crossing, text_pairs = cross_split_texts(source)
        source.joins.cross_split = crossing
    tasks: list[tuple[str, int, list[RawRow], str, str]] = []
    reports: dict[tuple[str, int], dict[str, Any]] = {}
    for split, rows in source.splits.items():
        (out / split).mkdir(exist_ok=True)
        for k, start in enumerate(range(0, len(rows), shard_size)):
            tar = out / split / f"shard-{k:06d}.tar"
            report = out / split / f"shard-{k:06d}.json"
            chunk = rows[start : start + shard_size]
            done = _shard_done(tar, report)
            if done is not None and done.get("rows") == len(chunk):
                reports[(split, k)] = done
            else:
                tasks.append((split, k, chunk, str(tar), str(report)))
    resumed = len(reports)
    total_rows = sum(len(t[2]) for t in tasks)
    bar = None
    if progress and tasks:
        from tqdm import tqdm

        bar = tqdm(total=total_rows, unit="structures", desc=f"build {source.name}")
    if workers <= 1:
        from threadpoolctl import threadpool_limits

        _init_worker(source.joins, options)
        with threadpool_limits(1):
            for t in tasks:
                reports[(t[0], t[1])] = _run_shard(t)
                if bar:
                    bar.update(len(t[2]))
    elif tasks:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_init_pool_worker, initargs=(source.joins, options)
        ) as ex:
            futs = {ex.submit(_run_shard, t): t for t in tasks}
            for fut in as_completed(futs):
                t = futs[fut]
                reports[(t[0], t[1])] = fut.result()
                if bar:
                    bar.update(len(t[2]))
    if bar:
        bar.close()
    # remove shards of an earlier build with more rows per split than now
    for split in source.splits:
        n_expected = -(-len(source.splits[split]) // shard_size)
        for stale in sorted((out / split).glob("shard-*.tar")):
            k = int(stale.stem.split("-")[1])
            if k >= n_expected:
                stale.unlink()
                stale.with_suffix(".json").unlink(missing_ok=True)
    wall = time.perf_counter() - t0
    manifest = _manifest(source, out, reports, options, shard_size, wall, total_rows, resumed, command)
    manifest["text_pairs"] = text_pairs
    write_manifest(out, manifest)
    return manifest


def _manifest(
    source: SourceData,
    out: Path,
    reports: dict[tuple[str, int], dict[str, Any]],
    options: BuildOptions,
    shard_size: int,
    wall: float,
    rows_built: int,
    resumed: int,
    command: str,
) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    failures: list[dict[str, str]] = []
    for split in source.splits:
        reps = [reports[k] for k in sorted(reports) if k[0] == split]
        cov: Counter[str] = Counter()
        for r in reps:
            cov.update(r["coverage"])
            failures.extend({"split": split, "shard": r["shard"], **f} for f in r["failures"])
        splits[split] = {
            "rows": sum(r["rows"] for r in reps),
            "samples": sum(r["samples"] for r in reps),
            "failures": sum(len(r["failures"]) for r in reps),
            "texts_clipped": sum(r.get("texts_clipped", 0) for r in reps),
            "text_pairs_dropped_cross_split": sum(r.get("texts_dropped_cross_split", 0) for r in reps),
            "coverage": dict(sorted(cov.items())),
            "shards": [
                {"path": f"{split}/{r['shard']}", "samples": r["samples"], "bytes": r["bytes"], "sha256": r["sha256"]}
                for r in reps
            ],
        }
    reasons = Counter(f["reason"].split(" (")[0] for f in failures)
    return {
        "manifest_version": MANIFEST_VERSION,
        "source": source.name,
        "source_info": source.info,
        "property_columns": source.property_columns,
        "splits": splits,
        "total_samples": sum(s["samples"] for s in splits.values()),
        "total_failures": len(failures),
        "failure_reasons": dict(reasons.most_common()),
        "failures": failures,
        "options": asdict(options),
        "shard_size": shard_size,
        "build": {
            "wall_seconds": round(wall, 2),
            "rows_built_now": rows_built,
            "shards_resumed": resumed,
            "structures_per_s": round(rows_built / wall, 2) if rows_built and wall > 0 else None,
            "command": command,
            "host_cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "versions": _versions(),
    }

