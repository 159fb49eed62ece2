"""The ``mmmat`` command line."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="mmmat: multimodal models for crystals.")
data_app = typer.Typer(no_args_is_help=True, help="Build and inspect webdataset shards.")
app.add_typer(data_app, name="data")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@data_app.command("build")
def data_build(
    source: str = typer.Argument(..., help="Source name: mp20, perov5, carbon24, generic, builtin."),
    root: Path | None = typer.Option(None, help="Raw data: a folder (mp20: ../shared/data/mp_20) or CSV."),
    out: Path = typer.Option(..., help="Output folder for shards and manifest.json."),
    workers: int = typer.Option(1, help="Worker processes."),
    limit: int | None = typer.Option(None, help="At most this many rows per split."),
    shard_size: int = typer.Option(256, help="Rows per shard."),
    xrd: bool = typer.Option(True, help="Compute powder XRD patterns."),
    image: bool = typer.Option(True, help="Simulate Z-contrast images."),
    describe: bool = typer.Option(True, help="Generated descriptions where no literature text exists."),
    joins: bool | None = typer.Option(None, help="Join recipes and literature from folders beside --root."),
    max_atoms: int = typer.Option(0, help="Skip (and report) structures with more atoms (0 = no limit)."),
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
    kw = {} if joins is None else {"joins": joins}
    try:
        data = loader(root, limit=limit, **kw)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    opts = BuildOptions(xrd=xrd, image=image, describe=describe, max_atoms=max_atoms)
    cmd = f"mmmat data build {source} --out {shlex.quote(str(out))} --workers {workers} --shard-size {shard_size}"
    cmd += f" --root {shlex.quote(str(root))}" if root is not None else ""
    cmd += f" --limit {limit}" if limit else ""
    cmd += "".join(f" --no-{k}" for k, v in (("xrd", xrd), ("image", image), ("describe", describe)) if not v)
    manifest = build_shards(data, out, workers=workers, shard_size=shard_size, options=opts, command=cmd)
    _print_summary(manifest, out)


def _print_summary(manifest: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{manifest['source']} -> {out}")
    mods = ["xrd", "image", "processing_text", "literature_text", "generated_text"]
    for col in ["split", "rows", "samples", "failures", *mods, "shards"]:
        t.add_column(col, justify="right")
    for name, s in manifest["splits"].items():
        cov = s["coverage"]
        t.add_row(
            name, str(s["rows"]), str(s["samples"]), str(s["failures"]),
            *[str(cov.get(m, 0)) for m in mods], str(len(s["shards"])),
        )
    c = Console()
    c.print(t)
    b = manifest["build"]
    c.print(
        f"wall {b['wall_seconds']} s, {b['rows_built_now']} rows built now "
        f"({b['structures_per_s']} structures/s), {b['shards_resumed']} shards resumed; "
        f"failures: {manifest['failure_reasons'] or 'none'}"
    )


@data_app.command("info")
def data_info(shards: Path = typer.Argument(..., help="A folder written by `mmmat data build`.")) -> None:
    """Summarise a shard folder's manifest."""
    from data_pipelines.build import load_manifest

    try:
        manifest = load_manifest(shards)
    except FileNotFoundError as exc:
        _fail(str(exc))
    _print_summary(manifest, shards)


@app.command()
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
            "xrd": list(first.xrd.shape),
            "image": list(first.image.shape),
            "literature_ids": list(first.literature_ids.shape),
            "properties": list(first.properties.shape),
        },
        "present": {k: int(v.sum()) for k, v in first.present.items()},
    }
    (out / "quickstart.json").write_text(json.dumps(summary, indent=1))
    typer.echo(json.dumps(summary, indent=1))


def main() -> None:
    """Entry point."""
    app()


if __name__ == "__main__":
    main()
