"""The ``mmmat`` command line."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------------- embedding lookup
index_app = typer.Typer(no_args_is_help=True, help="Build and extend FAISS indexes of crystal embeddings.")
app.add_typer(index_app, name="index")


def _retrieval_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a retrieval function; its input errors become a clear message and exit code 2."""
    from mmmat.retrieval import RetrievalError

    try:
        return fn(*args, **kwargs)
    except RetrievalError as exc:
        _fail(str(exc))


@app.command()
def embed(
    model: Path = typer.Option(..., help="Model folder (config.json + model.safetensors)."),
    shards: Path = typer.Option(..., help="Shard folder written by `mmmat data build`."),
    out: Path = typer.Option(..., help="Output parquet file (material table + embedding column)."),
    modality: str = typer.Option("crystal", help="crystal, xrd, image, literature_text or processing_text."),
    split: str | None = typer.Option(None, help="Split(s), comma-separated (default: every split)."),
    batch_size: int = typer.Option(128, help="Inputs per forward pass."),
) -> None:
    """Embed one modality of every material in a shard folder into a parquet file."""
    from mmmat.retrieval import embed_shards, load_model

    t0 = time.perf_counter()
    m = _retrieval_call(load_model, model)
    table = _retrieval_call(embed_shards, m, shards, modality, split, batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out, index=False)
    dim = len(table["embedding"].iloc[0]) if len(table) else 0
    typer.echo(f"{len(table)} {modality} embeddings (dim {dim}) -> {out} in {time.perf_counter() - t0:.1f} s")


@index_app.command("build")
def index_build(
    model: Path = typer.Option(..., help="Model folder (config.json + model.safetensors)."),
    shards: Path = typer.Option(..., help="Shard folder written by `mmmat data build`."),
    out: Path = typer.Option(..., help="Index folder to write (index.faiss, meta.parquet, index.json)."),
    split: str | None = typer.Option(None, help="Split(s), comma-separated (default: every split)."),
    exact: bool | None = typer.Option(
        None, "--exact/--approx", help="Exact (flat) or approximate (IVF) index; default: by size."
    ),
    nprobe: int = typer.Option(16, help="IVF lists scanned per query."),
    approx_threshold: int = typer.Option(200_000, help="Above this many vectors the default is IVF."),
    batch_size: int = typer.Option(128, help="Crystals per forward pass."),
) -> None:
    """Embed the crystals of a shard folder and write a FAISS index of them."""
    from mmmat.retrieval import build_index

    kind = "auto" if exact is None else ("exact" if exact else "ivf")
    t0 = time.perf_counter()
    idx = _retrieval_call(
        build_index, model, shards, out, split=split, kind=kind, nprobe=nprobe,
        approx_threshold=approx_threshold, batch_size=batch_size,
    )
    extra = f", {idx.nlist} lists, nprobe {idx.nprobe}" if idx.kind == "ivf" else ""
    typer.echo(
        f"{len(idx)} crystals indexed ({idx.kind}{extra}, dim {idx.dim}) -> {out} "
        f"in {time.perf_counter() - t0:.1f} s"
    )


@index_app.command("add")
def index_add(
    index: Path = typer.Option(..., help="Index folder (created when it does not exist and no model is needed)."),
    shards: Path | None = typer.Option(None, help="Shard folder to add (embedded with the index's model)."),
    cif: list[Path] | None = typer.Option(
        None, help="CIF (or POSCAR, extxyz, ...) files, folders of them, or CSV tables with a cif column; repeat."
    ),
    source: str | None = typer.Option(None, help="A data source of `mmmat data build` (mp20, ...) with --root."),
    root: Path | None = typer.Option(None, help="Raw data of --source (mp20: ../shared/data/mp_20)."),
    model: Path | None = typer.Option(None, help="Model folder (default: the one recorded in the index)."),
    split: str | None = typer.Option(None, help="Split(s), comma-separated (default: every split)."),
    skip_duplicates: bool = typer.Option(
        False, help="Skip materials already indexed (default: refuse the whole batch)."
    ),
    batch_size: int = typer.Option(128, help="Crystals per forward pass."),
) -> None:
    """Add crystals to an index: shards, CIF files/folders, or a data source, without rebuilding it.

    Every crystal also gets a peak table (phases.npz, for `mmmat identify`); when the folder holds a
    FAISS embedding index, crystals given as files or a source are embedded with its model as well.
    """
    from mmmat.io import InputError

    if shards is None and not cif and source is None:
        _fail("give --shards, --cif or --source (with --root)")
    if source is not None and root is None:
        _fail(f"--source {source} needs --root")
    t0 = time.perf_counter()
    splits = [x.strip() for x in split.split(",") if x.strip()] if split else None
    if shards is not None:
        from mmmat.retrieval import add_to_index

        added, skipped = _retrieval_call(
            add_to_index, index, shards, model, split=split, skip_duplicates=skip_duplicates,
            batch_size=batch_size,
        )
        typer.echo(f"{added} crystals added, {skipped} already indexed and skipped -> {index}")
        if (index / "phases.npz").is_file():
            from mmmat.retrieval.api import shard_records
            from mmmat.xrd.phases import add_crystals, crystal_from_record

            recs = _retrieval_call(shard_records, shards, split)
            n, _ = add_crystals(index, [crystal_from_record(r) for r in recs], skip_duplicates=True)
            typer.echo(f"{n} peak tables added")
    if cif or source is not None:
        from mmmat.xrd.phases import add_crystals, crystals_from_source, structures_from_paths

        try:
            crystals, problems = structures_from_paths(cif) if cif else ([], [])
            if source is not None:
                more, probs = crystals_from_source(source, root, splits)
                crystals, problems = crystals + more, problems + probs
            for msg in problems:
                typer.secho(f"skipped: {msg}", fg=typer.colors.YELLOW, err=True)
            if not crystals:
                _fail("no readable crystal to add")
            if (index / "index.json").is_file():
                from mmmat.retrieval.api import add_structures_to_index
                from mmmat.xrd.phases import ensure_table

                ensure_table(index)  # the peak tables of the crystals already embedded, first

                added, skipped = _retrieval_call(
                    add_structures_to_index, index, [(c["material_id"], c["structure"]) for c in crystals], model,
                    skip_duplicates=skip_duplicates, batch_size=batch_size,
                )
                typer.echo(f"{added} crystals embedded, {skipped} already indexed and skipped")
            what = [str(p) for p in (cif or [])] + ([source] if source else [])
            added, skipped = add_crystals(index, crystals, skip_duplicates=skip_duplicates,
                                          info={"last_added": what})
        except InputError as exc:
            _fail(str(exc))
        typer.echo(f"{added} crystals added ({skipped} skipped, {len(problems)} unreadable) -> {index} "
                   f"in {time.perf_counter() - t0:.1f} s")


@app.command()
def identify(
    scan: Path = typer.Argument(..., help="Measured pattern (.xrdml, .brml, .raw, .ras, .gsa, .xy, powder CIF)."),
    index: Path = typer.Option(..., help="Index folder with peak tables (`mmmat index add`)."),
    elements: str | None = typer.Option(None, help="Elements the sample may contain, comma-separated."),
    max_phases: int = typer.Option(4, help="Most phases reported."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the result (phases, curves) as JSON."),
    png: Path | None = typer.Option(None, help="Write a PNG of measured vs fitted, residual and each phase."),
    model: Path | None = typer.Option(None, help="Model for the learned route (default: the index's)."),
    wavelength: float | None = typer.Option(None, help="Kα1 wavelength in Å when the file gives none."),
    learned: bool | None = typer.Option(None, "--learned/--no-learned", help="Use the learned candidates."),
) -> None:
    """Identify the phases of a powder scan: weight fractions, lattice scales and Rwp (%)."""
    from mmmat.io import InputError
    from mmmat.xrd.identify import identify as run

    els = [e.strip() for e in elements.split(",")] if elements else None
    try:
        res = run(scan, index, elements=els, max_phases=max_phases, model=model, wavelength=wavelength,
                  learned=learned)
    except InputError as exc:
        _fail(str(exc))
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{scan.name}: Rwp {res.rwp:.2f} %, {res.seconds:.2f} s")
    for col in ("material_id", "formula", "space group", "wt %", "lattice scale", "ΔBIC"):
        t.add_column(col)
    for p in res.phases:
        t.add_row(p.material_id, p.formula, str(p.spacegroup), f"{100 * p.weight_fraction:.1f}",
                  f"{p.lattice_scale:.4f}", f"{p.score:.1f}")
    Console().print(t)
    if not res.phases:
        typer.echo("no phase improves the fit over the background alone")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res.to_dict()))
        typer.echo(f"result -> {json_out}")
    if png is not None:
        typer.echo(f"plot -> {res.plot(png)}")


@app.command()
def search(
    index: Path = typer.Option(..., help="Index folder written by `mmmat index build`."),
    model: Path | None = typer.Option(None, help="Model folder (default: the one recorded in the index)."),
    cif: Path | None = typer.Option(None, help="Query: a CIF file (embedded as a crystal)."),
    xrd: Path | None = typer.Option(None, help="Query: a measured powder pattern (xy, csv, powder CIF)."),
    image: Path | None = typer.Option(None, help="Query: an image (PNG, TIFF, ... or .npy)."),
    text: str | None = typer.Option(None, help="Query: a sentence."),
    text_modality: str = typer.Option("literature_text", help="literature_text or processing_text (--text)."),
    wavelength: float | None = typer.Option(None, help="X-ray wavelength of --xrd in Å (default: Cu Kα)."),
    k: int = typer.Option(10, "-k", "--k", help="Number of hits."),
    nprobe: int | None = typer.Option(None, help="IVF lists to scan (default: the index's)."),
    csv: Path | None = typer.Option(None, help="Also write the hits to this CSV file."),
) -> None:
    """Find the indexed crystals nearest to a CIF, a powder pattern, an image or a sentence."""
    from rich.console import Console
    from rich.table import Table

    from mmmat.retrieval import search as run_search

    options = (("--cif", cif), ("--xrd", xrd), ("--image", image), ("--text", text))
    given = [name for name, v in options if v is not None]
    if len(given) != 1:
        _fail(f"give exactly one query of --cif, --xrd, --image, --text (got {', '.join(given) or 'none'})")
    if k < 1:
        _fail(f"-k must be at least 1, got {k}")
    hits = _retrieval_call(
        run_search, index, model, cif=cif, xrd=xrd, image=image, text=text, text_modality=text_modality,
        k=k, nprobe=nprobe, wavelength=wavelength,
    )
    query = given[0] + " " + (repr(text) if text is not None else str(cif or xrd or image))
    t = Table(title=f"{query} -> {index}")
    for col, just in (("rank", "right"), ("material_id", "left"), ("formula", "left"),
                      ("space group", "left"), ("score", "right")):
        t.add_column(col, justify=just)
    for h in hits:
        t.add_row(str(h.rank), h.material_id, h.formula, h.spacegroup, f"{h.score:.4f}")
    Console().print(t)
    if csv is not None:
        import pandas as pd

        csv.parent.mkdir(parents=True, exist_ok=True)
        cols = ["rank", "material_id", "formula", "spacegroup", "score"]
        pd.DataFrame([h.to_dict() for h in hits], columns=cols).to_csv(csv, index=False)
        typer.echo(f"hits -> {csv}")


@app.command()
def predict(
    model: Path = typer.Option(..., help="A fine-tuned property model directory (config.json + model.safetensors)."),
    input: list[Path] = typer.Option(..., "--input", help="CIF files or folders of CIFs."),
    csv: Path | None = typer.Option(None, help="Also write the table to this CSV file."),
) -> None:
    """Predict the model's properties (with uncertainty) for CIF files and print a table."""
    from rich.console import Console
    from rich.table import Table

    from mmmat.data.schema import RecordError
    from mmmat.heads.predict import predict_files

    if not (model / "config.json").exists():
        _fail(f"{model}: not a model directory (no config.json)")
    missing = [str(p) for p in input if not p.exists()]
    if missing:
        _fail(f"input not found: {', '.join(missing)}")
    try:
        df = predict_files(str(model), [str(p) for p in input], csv=str(csv) if csv else None)
    except (RecordError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    t = Table()
    for col in df.columns:
        t.add_column(str(col), justify="right" if df[col].dtype.kind in "fi" else "left")
    for row in df.itertuples(index=False):
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    Console().print(t)


@app.command()
def generate(
    model: Path = typer.Option(..., help="A generator folder written by train.py fit (configs/generate/)."),
    n: int = typer.Option(16, "-n", "--n", help="Number of samples."),
    out: Path = typer.Option(..., help="Output folder: one CIF per sample, samples.extxyz, manifest.json."),
    composition: str | None = typer.Option(None, help="Cell formula for structure prediction (Na4Cl4 = 8 atoms)."),
    xrd: Path | None = typer.Option(None, help="Condition on a powder pattern (two-column xy/csv or powder CIF)."),
    wavelength: float | None = typer.Option(None, help="Wavelength of --xrd in Å when the file does not say."),
    text: str | None = typer.Option(None, help="Condition on a sentence."),
    image: Path | None = typer.Option(None, help="Condition on an image (PNG, TIFF, .npy)."),
    like: Path | None = typer.Option(None, help="Condition on the embedding of a crystal (CIF)."),
    target: list[str] = typer.Option([], help="Property target NAME=VALUE (repeatable)."),
    seed: int = typer.Option(0, help="Seed: the same seed, device and batch size give the same samples."),
    steps: int = typer.Option(100, help="Integration steps."),
    guidance: float = typer.Option(1.0, help="Classifier-free guidance scale (1: conditional, 0: unconditional)."),
    coord_anneal: float = typer.Option(0.0, help="Coordinate velocity scaling 1 + a*t."),
    batch_size: int = typer.Option(1024, help="Samples per batch."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
) -> None:
    """Generate crystals (de novo or for a composition), optionally conditioned on a pattern, text, image, targets."""
    from rich.progress import Progress

    from mmmat.generative.api import GenerationError, load_generator, write_samples
    from mmmat.generative.api import generate as run_generate

    if n < 1:
        _fail("-n must be at least 1")
    for name, path in (("--xrd", xrd), ("--image", image), ("--like", like)):
        if path is not None and not path.exists():
            _fail(f"{name} file {path} not found")
    targets: dict[str, float] = {}
    for t in target:
        name, sep, value = t.partition("=")
        try:
            targets[name.strip()] = float(value)
        except ValueError:
            _fail(f"--target {t!r} must be NAME=VALUE with a number")
        if not sep or not name.strip():
            _fail(f"--target {t!r} must be NAME=VALUE")
    try:
        gen = load_generator(model, device)
        with Progress(transient=True) as bar:
            task = bar.add_task("sampling", total=n)
            structures, info = run_generate(
                gen, n, composition=composition, xrd=str(xrd) if xrd else None, text=text,
                image=str(image) if image else None, crystal=str(like) if like else None, targets=targets or None,
                seed=seed, steps=steps, guidance=guidance, coord_anneal=coord_anneal, batch_size=batch_size,
                wavelength=wavelength, progress=lambda k: bar.update(task, completed=k),
            )
    except (GenerationError, FileNotFoundError) as exc:
        _fail(str(exc))
    except Exception as exc:  # inputs the retrieval readers reject (RetrievalError) name the file
        if type(exc).__name__ == "RetrievalError":
            _fail(str(exc))
        raise
    write_samples(structures, out, info)
    built = sum(s is not None for s in structures)
    g = info["generation"]
    typer.echo(f"{built}/{n} samples ({info['mode']}) in {g['wall_s']:.2f} s on {g['device']} -> {out}")


@app.command()
def evaluate(
    generated: Path = typer.Option(..., help="Folder of generated samples (CIFs, samples.extxyz, manifest)."),
    reference: Path = typer.Option(..., help="Shard folder (train: novelty and hull; test: coverage)."),
    out: Path = typer.Option(..., help="JSON report (report.json); report.md and PNG plots go beside it."),
    stages: str | None = typer.Option(
        None,
        help="Comma-separated stages in order, from validity, uniqueness, novelty, coverage, distribution, "
        "stability (default: validity,coverage,distribution,uniqueness,novelty,stability).",
    ),
    hull: Path | None = typer.Option(None, help="CHGNet hull JSON (default: built from the reference)."),
    relax: bool = typer.Option(True, help="Relax samples with CHGNet in the stability stage."),
    relax_steps: int = typer.Option(500, help="Most FIRE steps per relaxation."),
    workers: int = typer.Option(1, help="Processes for matching, fingerprints and CHGNet relaxations."),
    device: str | None = typer.Option(None, help="CHGNet device: cpu or cuda (default: cuda if any)."),
    limit_reference: int | None = typer.Option(None, help="Use the first N reference crystals only."),
    cache_dir: Path | None = typer.Option(None, help="Cache for reference fingerprints and hull."),
) -> None:
    """Staged evaluation of generated crystals (validity, uniqueness, novelty, coverage, stability, CSP)."""
    from rich.console import Console
    from rich.table import Table

    from mmmat.evaluation.generation import DEFAULT_STAGES
    from mmmat.evaluation.report import EvaluationInputError, evaluate_folder

    if not generated.is_dir():
        _fail(f"generated folder {generated} not found")
    if not reference.is_dir():
        _fail(f"reference shard folder {reference} not found")
    if hull is not None and not hull.is_file():
        _fail(f"hull file {hull} not found")
    names = [s.strip() for s in stages.split(",") if s.strip()] if stages else list(DEFAULT_STAGES)
    unknown = [s for s in names if s not in DEFAULT_STAGES]
    if unknown or not names:
        _fail(f"unknown stages {', '.join(unknown) or '(none given)'}; known: {', '.join(DEFAULT_STAGES)}")
    if relax_steps < 0 or workers < 1:
        _fail("--relax-steps must be >= 0 and --workers >= 1")
    try:
        rep = evaluate_folder(
            generated, reference, out, stages=names, hull=hull, relax=relax, relax_steps=relax_steps,
            workers=workers, device=device, limit_reference=limit_reference, cache_dir=cache_dir,
        )
    except EvaluationInputError as exc:
        _fail(str(exc))

    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    n_bad = rep["n_read_failed"]
    t = Table(title=f"{generated} ({rep['mode']}, {rep['n_generated']} samples, {n_bad} unreadable)")
    for col in ("stage", "n_in", "n_out", "wall_s", "s/sample", "GPU-s/sample"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for s in rep["stages"]:
        t.add_row(s["stage"], str(s["n_in"]), str(s["n_out"]), fmt(s["wall_s"]), fmt(s["s_per_sample"]),
                  fmt(s["gpu_s_per_sample"]))
    c = Console()
    c.print(t)
    keys = (
        "valid", "unique_rate", "novel_rate", "cov_recall", "cov_precision", "wdist_density",
        "wdist_num_elems", "stable_rate", "metastable_rate", "sun_rate", "csp_match_rate", "csp_rmse",
        "csp_n",
    )
    shown = [f"{k} {fmt(rep['metrics'][k])}" for k in keys if k in rep["metrics"]]
    if shown:
        c.print("; ".join(shown))
    c.print(f"report -> {out} and {out.with_suffix('.md')}")


def main() -> None:
    """Entry point."""
    app()


if __name__ == "__main__":
    main()
