"""The ``mmmat data build`` and ``mmmat quickstart`` commands, added to the ``mmmat`` command line as a plugin.

``pyproject.toml`` declares :func:`register` in the entry-point group ``mmmat.cli``; :mod:`mmmat.cli` loads
every entry point of that group when it is imported and calls it with its typer app. The library never
imports this package: shards are built here, on top of :mod:`mmmat`.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

import typer


def register(app: typer.Typer) -> None:
    """Add ``data build`` (to the app's ``data`` group, made when missing) and ``quickstart`` to ``app``."""
    data_app = next((g.typer_instance for g in app.registered_groups if g.name == "data"), None)
    if data_app is None:
        data_app = typer.Typer(no_args_is_help=True, help="Build and inspect webdataset shards.")
        app.add_typer(data_app, name="data")
    data_app.command("build")(data_build)
    app.command("quickstart")(quickstart)


def _fail(msg: str) -> None:
    from mmmat.cli import _fail

    _fail(msg)


def _print_summary(manifest: dict, out: Path) -> None:
    from mmmat.cli import _print_summary

    _print_summary(manifest, out)


def data_build(
    source: str = typer.Argument(
        ..., help="Source name: mp20, perov5, carbon24, generic, builtin, extxyz, asedb (.db), entries "
        "(ComputedStructureEntry .json/.json.gz/.json.bz2)."),
    root: Path | None = typer.Option(None, help="Raw data: a folder (mp20: ../shared/data/mp_20), CSV or file."),
    out: Path = typer.Option(..., help="Output folder for shards and manifest.json."),
    workers: int = typer.Option(1, help="Worker processes."),
    limit: int | None = typer.Option(None, help="At most this many rows in EACH split (train, val, test)."),
    shard_size: int = typer.Option(256, help="Rows per shard."),
    xrd: bool = typer.Option(True, help="Compute powder XRD patterns."),
    image: bool = typer.Option(True, help="Simulate Z-contrast images."),
    describe: bool = typer.Option(True, help="Generated descriptions where no literature text exists."),
    joins: bool | None = typer.Option(None, help="Join recipes and literature from folders beside --root."),
    max_atoms: int = typer.Option(0, help="Skip (and report) structures with more atoms (0 = no limit)."),
    prop: list[str] = typer.Option(
        [], "--property", help="extxyz/asedb/entries: NAME=FIELD, a property from a named (dotted) field of each "
        "record, e.g. band_gap=data.band_gap (repeatable)."),
    id_field: str | None = typer.Option(None, help="extxyz/asedb/entries: the field holding each record's id."),
) -> None:
    """Build webdataset shards (one sample per material) and manifest.json; resumable."""
    from data_pipelines.base import BuildOptions, get_source
    from data_pipelines.build import build_shards

    try:
        loader = get_source(source)
    except KeyError as exc:
        _fail(str(exc.args[0]))
    if root is None and source != "builtin":
        _fail(f"source {source!r} needs --root")
    if root is not None and not root.exists():
        _fail(f"--root {root} not found")
    if limit is not None and limit < 1:
        _fail(f"--limit must be at least 1 (rows per split; leave it out for every row), got {limit}")
    if workers < 1 or shard_size < 1 or max_atoms < 0:
        _fail("--workers and --shard-size must be at least 1, --max-atoms at least 0")
    kw: dict[str, Any] = {} if joins is None else {"joins": joins}
    fields: dict[str, str] = {}
    for item in prop:
        name, sep, field = item.partition("=")
        if not sep or not name.strip() or not field.strip():
            _fail(f"--property {item!r} must be NAME=FIELD")
        fields[name.strip()] = field.strip()
    import inspect

    accepts = inspect.signature(loader).parameters
    for flag, key, value in (("--property", "properties", fields), ("--id-field", "id_field", id_field)):
        if value:
            if key not in accepts:
                _fail(f"{flag} is for the extxyz, asedb and entries sources, not {source!r}")
            kw[key] = value
    try:
        data = loader(root, limit=limit, **kw)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if not sum(len(v) for v in data.splits.values()):
        _fail(f"{root if root is not None else source}: no rows to build (an empty folder or table?)")
    opts = BuildOptions(xrd=xrd, image=image, describe=describe, max_atoms=max_atoms)
    cmd = f"mmmat data build {source} --out {shlex.quote(str(out))} --workers {workers} --shard-size {shard_size}"
    cmd += f" --root {shlex.quote(str(root))}" if root is not None else ""
    cmd += f" --limit {limit}" if limit else ""
    cmd += "".join(f" --property {shlex.quote(f'{k}={v}')}" for k, v in fields.items())
    cmd += f" --id-field {shlex.quote(id_field)}" if id_field else ""
    cmd += "".join(f" --no-{k}" for k, v in (("xrd", xrd), ("image", image), ("describe", describe)) if not v)
    manifest = build_shards(data, out, workers=workers, shard_size=shard_size, options=opts, command=cmd)
    _print_summary(manifest, out)


def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), help="Working folder."),
    workers: int = typer.Option(2, help="Worker processes for the build and the loader."),
    batch_size: int = typer.Option(32, help="Batch size of the loader check."),
) -> None:
    """Offline end to end: build shards from the built-in crystals, then stream them into batches."""
    from data_pipelines.base import BuildOptions, get_source
    from data_pipelines.build import build_shards
    from mmmat.data.batch import Collator
    from mmmat.data.loader import shard_loader, split_shards

    data = get_source("builtin")(None)
    shard_dir = out / "shards"
    cmd = f"mmmat quickstart --out {shlex.quote(str(out))} --workers {workers}"
    manifest = build_shards(data, shard_dir, workers=workers, shard_size=32, options=BuildOptions(), command=cmd)
    _print_summary(manifest, shard_dir)
    urls = split_shards(shard_dir, "train")
    n = manifest["splits"]["train"]["samples"]
    nw = min(workers, len(urls))
    coll = Collator(property_names=manifest["property_columns"], cutoff=5.0, include_generated_text=True)
    loader = shard_loader(urls, coll, batch_size=batch_size, num_samples=n, num_workers=nw)
    t0 = time.perf_counter()
    seen, edges = 0, 0
    for batch in loader:
        seen += len(batch)
        edges += batch.crystal.edge_index.shape[1]
        first = batch
    dt = time.perf_counter() - t0
    summary = {
        "train_batches": loader.num_batches,
        "samples_seen": seen,
        "edges_per_crystal": round(edges / max(seen, 1), 1),
        "seconds": round(dt, 2),
        "batch_fields": {
            "crystal.z": list(first.crystal.z.shape),
            "crystal.edge_index": list(first.crystal.edge_index.shape),
            "xrd": list(first.inputs["xrd"]["profile"].shape),
            "image": list(first.inputs["image"].shape),
            "literature_ids": list(first.inputs["literature_text"]["ids"].shape),
            "properties": list(first.properties.shape),
        },
        "present": {k: int(v.sum()) for k, v in first.present.items()},
    }
    (out / "quickstart.json").write_text(json.dumps(summary, indent=1))
    typer.echo(json.dumps(summary, indent=1))


