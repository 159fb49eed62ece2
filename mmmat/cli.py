"""The ``mmmat`` command line."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="mmmat: multimodal models for crystals.")
data_app = typer.Typer(no_args_is_help=True, help="Build and inspect webdataset shards.")
app.add_typer(data_app, name="data")


def quiet_warnings() -> None:
    """Silence library chatter a user cannot act on (deprecations inside dependencies, pymatgen's element notes).

    ``MMMAT_WARNINGS=1`` keeps every warning.
    """
    import os
    import warnings

    if os.environ.get("MMMAT_WARNINGS") == "1":
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*electronegativit.*")
    warnings.filterwarnings("ignore", message=".*[Oo]xidation state.*")
    warnings.filterwarnings("ignore", message=".*No Pauling.*")
    warnings.filterwarnings("ignore", message=".*CifParser.*")
    warnings.filterwarnings("ignore", message=".*Issues encountered while parsing CIF.*")
    os.environ.setdefault(  # the same for worker processes
        "PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning,ignore:No Pauling electronegativity"
    )


def _version(value: bool) -> None:
    if value:
        from mmmat import __version__

        typer.echo(f"mmmat {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """mmmat: multimodal models for crystals."""
    quiet_warnings()


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _console() -> Any:
    """A rich console as wide as the terminal, or 200 columns (``$COLUMNS``) when the output is not one."""
    import os
    import sys

    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    return Console(width=int(os.environ.get("COLUMNS", "200")))


def _print_summary(manifest: dict, out: Path) -> None:
    from rich.table import Table

    t = Table(title=f"{manifest['source']} -> {out}")
    from mmmat.modalities import specs

    # coverage of every stored modality beside the crystal, plus generated descriptions
    mods = [sp.name for sp in specs() if sp.members and sp.name != "crystal"] + ["generated_text"]
    for col in ["split", "rows", "samples", "failures", *mods, "shards"]:
        t.add_column(col, justify="right")
    for name, s in manifest["splits"].items():
        cov = s["coverage"]
        t.add_row(
            name, str(s["rows"]), str(s["samples"]), str(s["failures"]),
            *[str(cov.get(m, 0)) for m in mods], str(len(s["shards"])),
        )
    c = _console()
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
    from mmmat.data.manifest import load_manifest

    try:
        manifest = load_manifest(shards)
    except FileNotFoundError as exc:
        _fail(str(exc))
    _print_summary(manifest, shards)


# ---------------------------------------------------------------------- embedding lookup
index_app = typer.Typer(no_args_is_help=True, help="Build and extend FAISS indexes of crystal embeddings.")
app.add_typer(index_app, name="index")


def _retrieval_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a retrieval function; its input errors become a clear message and exit code 2."""
    from mmmat.io import InputError

    try:
        return fn(*args, **kwargs)
    except InputError as exc:
        _fail(str(exc))


def _check_index_dir(index: Path) -> None:
    if not index.is_dir():
        _fail(f"index directory {index} not found")
    if not (index / "index.json").is_file():
        _fail(f"{index}: not an index folder (no index.json); build one with `mmmat index build`")


def _check_model_dir(model: Path) -> None:
    if not model.is_dir():
        _fail(f"model directory {model} not found")
    if not (model / "config.json").is_file():
        _fail(f"{model}: not a model folder (no config.json)")


def _with_progress(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` with a progress bar (and time left) for every task it reports (:mod:`mmmat.progress`)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from mmmat.progress import listening

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("left"), TimeRemainingColumn(), console=_console()) as bar:
        tasks: dict[str, Any] = {}

        def on_progress(task: str, done: int, total: int) -> None:
            if task not in tasks:
                tasks[task] = bar.add_task(task, total=total)
            bar.update(tasks[task], completed=done, total=total)

        def on_note(message: str) -> None:
            bar.console.print(f"[cyan]{message}[/cyan]")

        with listening(on_progress, on_note):
            return fn(*args, **kwargs)


@app.command()
def embed(
    model: Path = typer.Option(..., help="Model folder (config.json + model.safetensors)."),
    shards: Path = typer.Option(..., help="Shard folder written by `mmmat data build`."),
    out: Path = typer.Option(..., help="Output parquet file (material table + embedding column)."),
    modality: str = typer.Option("crystal", help="A registered modality (crystal, xrd, image, literature_text, "
                                 "processing_text, ...)."),
    split: str | None = typer.Option(None, help="Split(s), comma-separated (default: every split)."),
    batch_size: int = typer.Option(128, help="Inputs per forward pass."),
) -> None:
    """Embed one modality of every material in a shard folder into a parquet file."""
    from mmmat.retrieval import embed_shards, load_model

    t0 = time.perf_counter()
    _check_model_dir(model)
    if not shards.is_dir():
        _fail(f"shard directory {shards} not found")
    if batch_size < 1:
        _fail(f"--batch-size must be at least 1, got {batch_size}")
    m = _retrieval_call(load_model, model)
    table = _with_progress(_retrieval_call, embed_shards, m, shards, modality, split, batch_size)
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
    _check_model_dir(model)
    if not shards.is_dir():
        _fail(f"shard directory {shards} not found")
    if batch_size < 1 or nprobe < 1:
        _fail("--batch-size and --nprobe must be at least 1")
    t0 = time.perf_counter()
    idx = _with_progress(
        _retrieval_call, build_index, model, shards, out, split=split, kind=kind, nprobe=nprobe,
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
    source: str | None = typer.Option(
        None, help="A reference set (mp20, perov5, carbon24, builtin) with --root; other sources of "
        "`mmmat data build`: add their shards."),
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

        _check_index_dir(index)
        if not shards.is_dir():
            _fail(f"shard directory {shards} not found")
        added, skipped = _with_progress(
            _retrieval_call, add_to_index, index, shards, model, split=split, skip_duplicates=skip_duplicates,
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
    include_molecular: bool = typer.Option(
        False, help="Also propose molecular/gas-phase solids (only H, N, O, F, Cl, noble gases, C: O2, CO2 ...)."
    ),
) -> None:
    """Identify the phases of a powder scan: weight fractions, lattice scales and Rwp (%)."""
    from mmmat.io import InputError
    from mmmat.xrd.identify import identify as run

    els = [e.strip() for e in elements.split(",")] if elements else None
    try:
        res = run(scan, index, elements=els, max_phases=max_phases, model=model, wavelength=wavelength,
                  learned=learned, include_molecular=include_molecular)
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


def _check_query(kind: str, value: Any, wavelength: float | None) -> None:
    """Read one query the way the search will, before any model loads (fails fast with the file named)."""
    from mmmat.modalities import get_modality
    from mmmat.retrieval.api import read_query
    from mmmat.retrieval.index import RetrievalError

    if kind == "text":
        if not str(value).strip():
            _fail("empty text: give a sentence to search with")
        return
    try:
        spec = get_modality(kind)
        if not spec.is_text:
            read_query(spec.name, value, None, wavelength)
    except KeyError as exc:
        _fail(str(exc.args[0]))
    except RetrievalError as exc:
        _fail(str(exc))


def _parse_query(query: str) -> tuple[str, str]:
    """``MODALITY=VALUE`` of ``--query`` (the modality a registered name or alias)."""
    from mmmat.modalities import get_modality

    name, sep, value = query.partition("=")
    if not sep or not name.strip() or not value.strip():
        _fail(f"--query takes MODALITY=FILE (e.g. xrd=scan.xy, structure=x.cif, neutron=scan.xy), got {query!r}")
    try:
        return get_modality(name.strip()).name, value.strip()
    except KeyError as exc:
        _fail(str(exc.args[0]))
    raise AssertionError  # unreachable: _fail exits


@app.command()
def search(
    index: Path = typer.Option(..., help="Index folder written by `mmmat index build`."),
    model: Path | None = typer.Option(None, help="Model folder (default: the one recorded in the index)."),
    cif: Path | None = typer.Option(None, help="Query: a CIF file (embedded as a crystal)."),
    xrd: Path | None = typer.Option(None, help="Query: a measured powder pattern (xy, csv, powder CIF)."),
    image: Path | None = typer.Option(None, help="Query: an image (PNG, TIFF, ... or .npy)."),
    text: str | None = typer.Option(None, help="Query: a sentence."),
    query: str | None = typer.Option(
        None, help="Query: MODALITY=FILE for any registered modality (xrd=scan.xy, structure=x.cif, "
        "neutron=scan.xy, image=img.png, literature_text='a sentence'); --cif/--xrd/--image/--text are aliases."
    ),
    queries: Path | None = typer.Option(
        None, help="Many queries, one model load: a folder of query files (by suffix: .cif, .xy/.csv/.dat, "
        ".png/.tif/.npy) or a list file with one path or 'text: a sentence' per line."
    ),
    text_modality: str = typer.Option("literature_text", help="literature_text or processing_text (--text)."),
    wavelength: float | None = typer.Option(
        None, help="Wavelength of a pattern query in Å when its file does not say (default: Cu Kα, 1.54184 Å)."
    ),
    k: int = typer.Option(10, "-k", "--k", help="Number of hits."),
    nprobe: int | None = typer.Option(None, help="IVF lists to scan (default: the index's)."),
    csv: Path | None = typer.Option(None, help="Also write the hits to this CSV file."),
) -> None:
    """Find the indexed crystals nearest to a CIF, a powder pattern, an image or a sentence (or many)."""
    from rich.table import Table

    options = (("--cif", cif), ("--xrd", xrd), ("--image", image), ("--text", text), ("--query", query),
               ("--queries", queries))
    given = [name for name, v in options if v is not None]
    if len(given) != 1:
        _fail("give exactly one query: --query, --cif, --xrd, --image, --text or --queries "
              f"(got {', '.join(given) or 'none'})")
    if k < 1:
        _fail(f"-k must be at least 1, got {k}")
    if wavelength is not None and not 0.1 <= wavelength <= 5.0:
        _fail(f"--wavelength is in Å (0.1 to 5), got {wavelength}")
    _check_index_dir(index)
    if model is not None:
        _check_model_dir(model)
    if queries is not None:
        return _search_many(index, model, queries, k, nprobe, wavelength, text_modality, csv)
    # every flag is an alias of --query MODALITY=VALUE
    aliases = {"--cif": ("crystal", cif), "--xrd": ("xrd", xrd), "--image": ("image", image),
               "--text": (text_modality, text)}
    kind, value = _parse_query(query) if query is not None else aliases[given[0]]
    _check_query("text" if given[0] == "--text" else kind, value, wavelength)

    from mmmat.retrieval import search as run_search

    t0 = time.perf_counter()
    hits = _retrieval_call(
        run_search, index, model, query=(kind, value), k=k, nprobe=nprobe, wavelength=wavelength,
    )
    from mmmat.modalities import get_modality

    query = f"{kind}=" + (repr(value) if get_modality(kind).is_text else str(value))
    t = Table(title=f"{query} -> {index} ({time.perf_counter() - t0:.1f} s)")
    for col, just in (("rank", "right"), ("material_id", "left"), ("formula", "left"),
                      ("space group", "left"), ("score", "right")):
        t.add_column(col, justify=just)
    for h in hits:
        t.add_row(str(h.rank), h.material_id, h.formula, h.spacegroup, f"{h.score:.4f}")
    _console().print(t)
    if csv is not None:
        import pandas as pd

        csv.parent.mkdir(parents=True, exist_ok=True)
        cols = ["rank", "material_id", "formula", "spacegroup", "score"]
        pd.DataFrame([h.to_dict() for h in hits], columns=cols).to_csv(csv, index=False)
        typer.echo(f"hits -> {csv}")


def _search_many(index: Path, model: Path | None, queries: Path, k: int, nprobe: int | None,
                 wavelength: float | None, text_modality: str, csv: Path | None) -> None:
    from rich.table import Table

    from mmmat.retrieval import collect_queries, search_queries

    if not queries.exists():
        _fail(f"--queries {queries} not found")
    found, skipped = _retrieval_call(collect_queries, queries)
    if not found:
        _fail(f"--queries {queries}: no usable query" + (f" ({len(skipped)} entries skipped)" if skipped else ""))
    t0 = time.perf_counter()
    table, failed = _retrieval_call(search_queries, index, found, model, k=k, nprobe=nprobe, wavelength=wavelength,
                                    text_modality=text_modality)
    dt = time.perf_counter() - t0
    top = table[table["rank"] == 1]
    t = Table(title=f"{len(found) - len(failed)} queries -> {index}: best hit each ({dt:.1f} s with the model load)")
    for col in ("query", "kind", "material_id", "formula", "space group", "score"):
        t.add_column(col, justify="right" if col == "score" else "left")
    for r in top.itertuples(index=False):
        t.add_row(str(r.query), r.kind, r.material_id, r.formula, r.spacegroup, f"{r.score:.4f}")
    c = _console()
    c.print(t)
    bad = skipped + failed
    if bad:
        c.print(f"[red]{len(bad)} queries skipped:[/red]")
        for q, why in bad:
            c.print(f"  {why}" if str(q) in why else f"  {q}: {why}")
    if csv is not None:
        csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(csv, index=False)
        typer.echo(f"{len(table)} hits ({k} per query) -> {csv}")


@app.command()
def predict(
    model: Path = typer.Option(..., help="A fine-tuned property model directory (config.json + model.safetensors)."),
    input: list[Path] = typer.Option(..., "--input", help="CIF files or folders of CIFs."),
    csv: Path | None = typer.Option(None, help="Also write the table to this CSV file."),
    labels: Path | None = typer.Option(
        None, help="CSV of true values (a 'file' or 'material_id' = file stem column, one column per target): "
        "writes a parity plot per target. Default: properties.csv inside an input folder, when there is one."
    ),
    plot_dir: Path | None = typer.Option(None, help="Folder for parity plots (default: beside --csv, else .)."),
    order: bool = typer.Option(
        False, help="Order disordered crystals (partial occupancies) with pymatgen instead of skipping them."
    ),
) -> None:
    """Predict the model's properties (with uncertainty) for CIF files; bad files are skipped and listed."""
    from rich.table import Table

    if not (model / "config.json").exists():
        _fail(f"{model}: not a model directory (no config.json)")
    missing = [str(p) for p in input if not p.exists()]
    if missing:
        _fail(f"input not found: {', '.join(missing)}")
    if labels is None:
        found = [p / "properties.csv" for p in input if p.is_dir() and (p / "properties.csv").is_file()]
        labels = found[0] if found else None
    elif not labels.is_file():
        _fail(f"--labels {labels} not found")
    from mmmat.data.schema import RecordError
    from mmmat.heads.predict import predict_files

    try:
        df = predict_files(str(model), [str(p) for p in input], csv=str(csv) if csv else None, on_error="skip",
                           order=order)
    except (RecordError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    t = Table()
    units = df.attrs.get("units", {})
    for col in df.columns:
        head = f"{col} ({units[col]})" if units.get(col) else str(col)
        t.add_column(head, justify="right" if df[col].dtype.kind in "fi" else "left")
    for row in df.itertuples(index=False):
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    c = _console()
    c.print(t)
    failures = df.attrs.get("failures", [])
    if failures:
        c.print(f"[red]{len(failures)} of {len(failures) + len(df)} files skipped:[/red]")
        for f, why in failures:
            c.print(f"  {f}: {why}")
    if labels is not None and len(df):
        _parity_plots(df, labels, plot_dir or (csv.parent if csv is not None else Path(".")))
    if not len(df):
        _fail("no file could be predicted")


def _parity_plots(df: Any, labels: Path, out: Path) -> None:
    """Join predictions to true values by file path or file stem; one parity + error plot per target."""
    import pandas as pd

    from mmmat.plots import parity_error_plot, unit_of

    try:
        lab = pd.read_csv(labels)
    except (OSError, ValueError) as exc:
        _fail(f"--labels {labels}: {exc}")
    if "file" in lab.columns:
        lab["_key"] = lab["file"].map(lambda f: Path(str(f)).stem)
    elif "material_id" in lab.columns:
        lab["_key"] = lab["material_id"].astype(str)
    else:
        _fail(f"--labels {labels}: needs a 'file' or 'material_id' column (found {', '.join(lab.columns)})")
    pred = df.assign(_key=df["file"].map(lambda f: Path(str(f)).stem))
    targets = [c for c in df.columns if c not in ("file", "formula") and not c.endswith(("_std", "_prob"))]
    shared = [t for t in targets if t in lab.columns]
    if not shared:
        typer.echo(f"{labels}: no column named like a target ({', '.join(targets)}): no parity plot")
        return
    joined = pred.merge(lab[["_key", *shared]], on="_key", how="inner", suffixes=("", "_true"))
    out.mkdir(parents=True, exist_ok=True)
    for t in shared:
        std = joined[f"{t}_std"] if f"{t}_std" in joined else None
        path = out / f"parity_{t}.png"
        m = parity_error_plot(joined[f"{t}_true"], joined[t], path, t, unit_of(t), std)
        u = unit_of(t)
        typer.echo(f"{t}: MAE {m['mae']:.4g} {u}, RMSE {m['rmse']:.4g} {u}, R² {m['r2']:.3f} "
                   f"over {m['n']} labelled files -> {path}")


plot_app = typer.Typer(no_args_is_help=True, help="PNG plots: latent map of an index, pattern overlay.")
app.add_typer(plot_app, name="plot")


@plot_app.command("latent")
def plot_latent(
    index: Path = typer.Option(..., help="Index folder written by `mmmat index build`."),
    out: Path = typer.Option(..., help="PNG file to write."),
    color: str | None = typer.Option(None, help="Property column to colour by (default: the first one)."),
    limit: int = typer.Option(20000, help="At most this many points (a fixed random subset above it)."),
) -> None:
    """A 2D map (first two principal components) of an index's embeddings, coloured by a property."""
    if not (index / "index.json").is_file():
        _fail(f"{index}: not an index folder (no index.json)")
    if limit < 2:
        _fail(f"--limit must be at least 2, got {limit}")
    import numpy as np
    import pandas as pd

    from mmmat.plots import latent_map_plot
    from mmmat.retrieval import open_index

    idx = _retrieval_call(open_index, index)
    m = idx.meta
    props = [c for c in m.columns if c not in ("material_id", "formula", "spacegroup_number", "spacegroup_symbol",
                                                  "split") and pd.api.types.is_numeric_dtype(m[c])]
    if color is not None and color not in props:
        _fail(f"--color {color!r} is not a numeric column of the index (has: {', '.join(props) or 'none'})")
    color = color or (props[0] if props else None)
    n = len(idx)
    rows = np.arange(n) if n <= limit else np.sort(np.random.default_rng(0).choice(n, limit, replace=False))
    vec = np.stack([idx.index.reconstruct(int(i)) for i in rows])
    values = m[color].to_numpy(dtype=float, na_value=np.nan)[rows] if color else None
    latent_map_plot(vec, out, values, color or "", f"{len(rows)} crystals of {index}")
    typer.echo(f"latent map of {len(rows)} crystals" + (f" coloured by {color}" if color else "") + f" -> {out}")


@plot_app.command("overlay")
def plot_overlay(
    pattern: Path = typer.Option(..., help="Measured pattern (xy/csv/dat, powder CIF; more with mmmat.io)."),
    cif: Path = typer.Option(..., help="Crystal whose computed pattern goes on top."),
    out: Path = typer.Option(..., help="PNG file to write."),
    wavelength: float | None = typer.Option(None, help="Wavelength in Å if the file has none (default: Cu Kα)."),
) -> None:
    """The measured pattern over a crystal's computed pattern at the measured wavelength."""
    for name, p in (("--pattern", pattern), ("--cif", cif)):
        if not p.is_file():
            _fail(f"{name} {p} not found")
    from mmmat.data.xrd import CU_KA
    from mmmat.io import InputError, read_pattern, read_structure
    from mmmat.plots import pattern_overlay_plot

    try:
        pat = read_pattern(pattern, wavelength)
        s = read_structure(cif, ordered=True)
    except InputError as exc:
        _fail(str(exc))
    lam = float(pat.wavelength or CU_KA)
    pattern_overlay_plot(pat.two_theta, pat.intensity, lam, s, out, s.composition.reduced_formula, pattern.name)
    typer.echo(f"{pattern.name} over computed {s.composition.reduced_formula} (λ {lam:.5f} Å) -> {out}")


@app.command()
def generate(
    model: Path | None = typer.Option(None, help="A generator folder written by train.py fit (configs/generate/)."),
    n: int = typer.Option(16, "-n", "--n", help="Number of samples."),
    out: Path = typer.Option(..., help="Output folder: one CIF per sample, samples.extxyz, manifest.json."),
    composition: str | None = typer.Option(None, help="Cell formula for structure prediction (Na4Cl4 = 8 atoms)."),
    xrd: Path | None = typer.Option(None, help="Condition on a powder pattern (two-column xy/csv or powder CIF)."),
    wavelength: float | None = typer.Option(None, help="Wavelength of --xrd in Å when the file does not say."),
    text: str | None = typer.Option(None, help="Condition on a sentence."),
    image: Path | None = typer.Option(None, help="Condition on an image (PNG, TIFF, .npy)."),
    like: Path | None = typer.Option(None, help="Condition on the embedding of a crystal (CIF)."),
    condition: str | None = typer.Option(
        None, help="Condition MODALITY=FILE for any registered modality the generator was trained with "
        "(xrd=scan.xy, neutron=scan.xy, structure=x.cif, ...); --xrd/--text/--image/--like are aliases."
    ),
    target: list[str] = typer.Option([], help="Property target NAME=VALUE (repeatable)."),
    seed: int = typer.Option(0, help="Seed: the same seed, device and batch size give the same samples."),
    steps: int = typer.Option(100, help="Integration steps."),
    guidance: float = typer.Option(1.0, help="Classifier-free guidance scale (1: conditional, 0: unconditional)."),
    coord_anneal: float = typer.Option(0.0, help="Coordinate velocity scaling 1 + a*t."),
    batch_size: int = typer.Option(1024, help="Samples per batch."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    method: str = typer.Option("pipeline", help="With --composition: pipeline (templates refined by the "
                               "generator, ranked), template (best substituted template) or flow (generator alone)."),
    templates: Path | None = typer.Option(None, help="Shard folder whose train split serves as templates "
                                          "(pipeline, template); without it the pipeline falls back to the flow."),
    k: int = typer.Option(5, help="Templates retrieved per composition (pipeline)."),
    t_start: float = typer.Option(0.8, help="Flow time at which a template enters its refinement."),
    rank: str = typer.Option("energy", help="Ranking of pipeline candidates: energy (CHGNet single point, "
                             "eV/atom) or consensus (template agreement, no MLIP)."),
    space_group: int | None = typer.Option(None, help="Constrain flow samples to this space group (1-230): "
                                           "Wyckoff positions from pyxtal, result projected onto the group."),
) -> None:
    """Generate crystals (de novo or for a composition), optionally conditioned on a pattern, text, image, targets.

    With --composition the default is the CSP pipeline: the --k best substituted templates from --templates,
    each refined by the generator, ranked by energy; --method template or flow runs one part alone.
    """
    from rich.progress import Progress

    from mmmat.generative.api import generate as run_generate
    from mmmat.generative.api import load_generator, write_samples
    from mmmat.io import InputError

    if n < 1:
        _fail("-n must be at least 1")
    cond = _parse_query(condition) if condition is not None else None
    if method not in ("pipeline", "template", "flow"):
        _fail(f"--method {method!r} must be pipeline, template or flow")
    if rank not in ("energy", "consensus"):
        _fail(f"--rank {rank!r} must be energy or consensus")
    if space_group is not None and composition is None:
        _fail("--space-group needs --composition")
    if templates is not None and not templates.is_dir():
        _fail(f"--templates folder {templates} not found")
    conditioned = any(x is not None for x in (xrd, text, image, like, cond)) or bool(target)
    if composition is not None and (method == "template" or (method == "pipeline" and templates is not None)
                                    or space_group is not None):
        if conditioned:
            _fail("latent and property conditions apply to --method flow (without --templates / --space-group)")
        if method != "template" and model is None:
            _fail(f"--method {method} needs --model")
        if method == "template" and templates is None:
            _fail("--method template needs --templates")
        _generate_csp(model, composition, n, out, method, templates, k, t_start, rank, space_group, seed, steps,
                      coord_anneal, batch_size, device)
        return
    if model is None:
        _fail("--model is needed (only --method template runs without a generator)")
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
                wavelength=wavelength, progress=lambda k: bar.update(task, completed=k), condition=cond,
            )
    except (InputError, FileNotFoundError) as exc:  # GenerationError and the readers' errors are InputErrors
        _fail(str(exc))
    if composition is not None:
        info["method"] = "flow"  # the generator alone: no --templates (or --method flow)
    write_samples(structures, out, info)
    built = sum(s is not None for s in structures)
    g = info["generation"]
    typer.echo(f"{built}/{n} samples ({info['mode']}) in {g['wall_s']:.2f} s on {g['device']} -> {out}")


def _generate_csp(model: Path | None, composition: str, n: int, out: Path, method: str, templates: Path | None,
                  k: int, t_start: float, rank: str, space_group: int | None, seed: int, steps: int,
                  coord_anneal: float, batch_size: int, device: str | None) -> None:
    """``mmmat generate --composition`` through :class:`mmmat.generative.csp.CSPPipeline`."""
    from mmmat.generative.api import GenerationError, load_generator, write_samples
    from mmmat.generative.csp import CSPPipeline, chgnet_energy

    try:
        gen = load_generator(model, device) if model is not None else None
        lib = None
        if templates is not None:
            from mmmat.data.loader import load_records, split_shards
            from mmmat.generative.templates import TemplateLibrary

            lib = TemplateLibrary.from_records(load_records(split_shards(templates, "train")))
        dev = gen.device if gen is not None else (device or "cpu")
        pipe = CSPPipeline(lib, None if gen is None else gen.flow, k=max(k, n if method == "template" else 1),
                           t_start=t_start, steps=steps, coord_anneal=coord_anneal, batch_size=batch_size,
                           energy=chgnet_energy(dev) if rank == "energy" and method == "pipeline" else None)
        t0 = time.perf_counter()
        if method == "template":
            cands = pipe.templates(composition)
        elif method == "flow":
            cands = [c for p in pipe.predict([composition] * n, "flow", seed, space_group=space_group) for c in p]
        else:
            cands = pipe.predict([composition], "pipeline", seed, space_group=space_group)[0]
        wall = time.perf_counter() - t0
    except (GenerationError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if not cands:
        _fail(f"no candidate for {composition}: no template of its formula type and no generator to fall back on")
    cands = cands[:n]
    info = {
        "mode": "csp", "method": method, "n": len(cands), "model": None if model is None else str(model),
        "templates": None if templates is None else str(templates), "k": k, "t_start": t_start,
        "rank": rank if method == "pipeline" else None, "space_group": space_group, "seed": seed, "steps": steps,
        "coord_anneal": coord_anneal, "composition": composition, "condition": {},
        "candidates": [{"source": c.source, "template_id": c.template_id,
                        "cost": c.cost if math.isfinite(c.cost) else None,
                        "energy_ev_per_atom": c.energy if math.isfinite(c.energy) else None} for c in cands],
        "generation": {"wall_s": wall, "device": str(dev)},
    }
    write_samples([c.structure for c in cands], out, info)
    typer.echo(f"{len(cands)} candidate(s) for {composition} ({method}) in {wall:.2f} s -> {out}")



evaluate_app = typer.Typer(help="Staged evaluation of generated crystals; `prepare` caches reference work.")
app.add_typer(evaluate_app, name="evaluate")


def _cores() -> int:
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _mlip_list(mlips: str) -> list[str]:
    from mmmat.evaluation.relax import POTENTIALS

    names = [m.strip() for m in mlips.split(",") if m.strip()]
    bad = [m for m in names if m not in POTENTIALS]
    if bad:
        _fail(f"--mlips: unknown {', '.join(bad)}; known: {', '.join(POTENTIALS)}")
    return names


@evaluate_app.command("prepare")
def evaluate_prepare(
    reference: Path = typer.Option(..., help="Shard folder written by `mmmat data build` (every split is used)."),
    out: Path = typer.Option(..., help="Cache folder; pass it to `mmmat evaluate --cache-dir`."),
    mlips: str = typer.Option("chgnet,sevennet", help="MLIPs whose hull energies are cached (comma-separated)."),
    workers: int = typer.Option(0, help="Processes for the fingerprints (0: the cores present)."),
    device: str | None = typer.Option(None, help="MLIP device: cpu or cuda (default: cuda if any)."),
    limit_reference: int | None = typer.Option(None, help="Use the first N crystals of each set only."),
    coverage: bool = typer.Option(True, help="Cache the coverage reference's CrystalNN/Magpie fingerprints."),
    hull: bool = typer.Option(True, help="Cache the MLIP single-point energies of every reference crystal."),
) -> None:
    """Compute reference fingerprints and hull energies once, cached under keys of their inputs."""
    if not reference.is_dir():
        _fail(f"reference shard folder {reference} not found")
    from mmmat.evaluation.report import prepare_reference

    info = _with_progress(
        prepare_reference, reference, out, mlips=_mlip_list(mlips) if hull else [], workers=workers or _cores(),
        device=device, limit_reference=limit_reference, coverage=coverage, hull=hull,
    )
    for k, v in info["seconds"].items():
        typer.echo(f"{k}: {v:.1f} s")
    typer.echo(f"cache ready in {out}")


@evaluate_app.callback(invoke_without_command=True)
def evaluate(
    ctx: typer.Context,
    generated: Path | None = typer.Option(None, help="Folder of generated samples (CIFs, samples.extxyz, manifest)."),
    reference: Path | None = typer.Option(
        None, help="Shard folder (train: novelty; test: coverage; every split: the MLIP hulls)."
    ),
    out: Path | None = typer.Option(None, help="JSON report (report.json); report.md and PNG plots go beside it."),
    stages: str | None = typer.Option(
        None,
        help="Comma-separated stages in order, from validity, uniqueness, novelty, coverage, distribution, "
        "stability (default: validity,coverage,distribution,uniqueness,novelty,stability; coverage and "
        "distribution are left out below 100 samples).",
    ),
    hull: Path | None = typer.Option(
        None, help="CHGNet hull JSON of the single-MLIP path (default: the MLIP hulls of every split)."
    ),
    relax: bool = typer.Option(True, help="Relax samples with each MLIP in the stability stage."),
    relax_steps: int = typer.Option(500, help="Most FIRE steps per relaxation."),
    workers: int = typer.Option(0, help="Processes for matching and fingerprints (0: the cores present)."),
    mlips: str = typer.Option(
        "chgnet,sevennet", help="MLIPs of the stability stage; stable only when all agree (comma-separated)."
    ),
    novelty_reference: str = typer.Option("train", help="Novelty reference: train, train+val or all."),
    min_e_hull: float = typer.Option(
        -0.2, help="A sample an MLIP puts deeper than this below its hull (eV/atom) is counted apart, not as "
        "stable (the rates without this bound are reported as *_unguarded); -inf: no bound."
    ),
    device: str | None = typer.Option(None, help="CHGNet device: cpu or cuda (default: cuda if any)."),
    limit_reference: int | None = typer.Option(None, help="Use the first N reference crystals only."),
    cache_dir: Path | None = typer.Option(None, help="Cache for reference fingerprints and hull."),
    endpoint_cache: Path | None = typer.Option(
        None, help="JSON file of CHGNet-relaxed elemental end points, reused by later evaluations (default: "
        "$MMMAT_CACHE/chgnet_endpoints.json, else ~/.cache/mmmat/chgnet_endpoints.json; --cache-dir puts it there)."
    ),
) -> None:
    """Staged evaluation of generated crystals (validity, uniqueness, novelty, coverage, stability, CSP)."""
    from rich.table import Table

    from mmmat.evaluation.generation import DEFAULT_STAGES
    from mmmat.evaluation.report import NOVELTY_REFERENCES

    if ctx.invoked_subcommand is not None:
        return
    if generated is None or reference is None or out is None:
        _fail("mmmat evaluate needs --generated, --reference and --out (or the subcommand prepare)")
    if novelty_reference not in NOVELTY_REFERENCES:
        _fail(f"--novelty-reference {novelty_reference!r}: use one of {', '.join(NOVELTY_REFERENCES)}")
    workers = workers or _cores()
    mlip_names = _mlip_list(mlips)
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
        _fail("--relax-steps must be >= 0 and --workers >= 0")
    if limit_reference is not None and limit_reference < 1:
        _fail(f"--limit-reference must be at least 1, got {limit_reference}")
    from mmmat.evaluation.report import EvaluationInputError, evaluate_folder

    if endpoint_cache is None and cache_dir is None:
        import os

        endpoint_cache = Path(os.environ.get("MMMAT_CACHE") or Path.home() / ".cache" / "mmmat") / \
            "chgnet_endpoints.json"
    c = _console()
    try:
        rep = _with_progress(
            evaluate_folder, generated, reference, out, stages=names if stages else None, hull=hull, relax=relax,
            relax_steps=relax_steps, workers=workers, device=device, limit_reference=limit_reference,
            cache_dir=cache_dir, endpoint_cache=endpoint_cache, novelty_reference=novelty_reference,
            mlips=mlip_names or None, min_e_hull=None if min_e_hull == float("-inf") else min_e_hull,
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
    c.print(t)
    keys = (
        "valid", "unique_rate", "novel_rate", "cov_recall", "cov_precision", "wdist_density",
        "wdist_num_elems", "stable_rate", "metastable_rate", "sun_rate", "sun_rate_two_mlip", "sun_rate_one_mlip",
        "sun_rate_unguarded", "n_far_below_hull", "stable_rate_all_mlips", "mlip_disagreement_rate",
        "csp_match_rate", "csp_rmse", "csp_n",
    )
    shown = [f"{k} {fmt(rep['metrics'][k])}" for k in keys if k in rep["metrics"]]
    if shown:
        c.print("; ".join(shown))
    c.print(f"report -> {out} and {out.with_suffix('.md')}")


@app.command()
def serve(
    index: Path = typer.Option(..., help="Index folder written by `mmmat index build`."),
    model: Path | None = typer.Option(None, help="Model folder (default: the one recorded in the index)."),
    design_runs: Path | None = typer.Option(None, help="A design run folder, or a folder of them."),
    generator: Path | None = typer.Option(None, help="A generator folder for the Generate page."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but 127.0.0.1 opens the app to others."),
    port: int = typer.Option(8050, help="TCP port."),
    max_upload_mb: float = typer.Option(20.0, help="Largest accepted upload in MB."),
) -> None:
    """A local web app: search, identify, generate, design runs and the model, in the browser."""
    if not (index / "index.json").is_file():
        _fail(f"{index}: not an index folder (no index.json); build one with `mmmat index build`")
    for name, path in (("--model", model), ("--design-runs", design_runs), ("--generator", generator)):
        if path is not None and not path.is_dir():
            _fail(f"{name} folder {path} not found")
    if not 0 < port < 65536:
        _fail(f"--port must be 1 to 65535, got {port}")
    if not 0 < max_upload_mb <= 2000:
        _fail(f"--max-upload-mb must be above 0 and at most 2000, got {max_upload_mb}")
    try:
        import dash  # noqa: F401
    except ImportError:
        _fail("`mmmat serve` needs Dash: pip install 'dash>=2.17'")
    from mmmat.io import InputError
    from mmmat.web.app import serve as run_server

    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: binding {host}: anyone who can reach this address can use the app", fg="yellow",
                    err=True)
    typer.echo(f"mmmat serve: http://{'[' + host + ']' if ':' in host else host}:{port}/ (Ctrl+C stops it); "
               f"uploads up to {max_upload_mb:g} MB go to a private temporary folder removed at exit")
    try:
        run_server(index, model, design_runs, generator, host=host, port=port, max_upload_mb=max_upload_mb)
    except InputError as exc:
        _fail(str(exc))


@app.command()
def design(
    config: Path = typer.Option(..., help="A design config (configs/design/NAME.yaml)."),
    resume: bool = typer.Option(False, help="Resume the run in the config's out folder from its ledger."),
    out: Path | None = typer.Option(None, help="Run folder (overrides the config's out)."),
) -> None:
    """Closed-loop inverse design: propose, screen, select, verify with the oracle, learn; ledger and report."""
    from mmmat.design import ConfigError, DesignError, load_config, run

    try:
        cfg = load_config(config, **({"out": str(out)} if out else {}))
        doc = run(cfg, resume=resume)
    except (ConfigError, DesignError, FileNotFoundError) as exc:
        _fail(str(exc))
    last = doc["rounds"][-1] if doc["rounds"] else {}
    typer.echo(
        f"{last.get('cumulative_oracle_calls', 0)} oracle calls, {len(doc['hits'])} hits, "
        f"{last.get('unique_compositions', 0)} unique compositions -> {cfg.out}/report.md"
    )


# ---------------------------------------------------------------------- plugins
#: Entry-point group of command-line plugins: each names a function ``register(app)`` that adds commands.
PLUGIN_GROUP = "mmmat.cli"
#: Environment variable naming more plugins, ``module:function`` comma-separated (for a checkout on
#: ``PYTHONPATH`` that is not installed, so has no entry points).
PLUGIN_ENV = "MMMAT_PLUGINS"
#: Commands that a plugin provides (group, command), and the plugin that provides them.
PLUGIN_COMMANDS: dict[tuple[str | None, str], str] = {("data", "build"): "data_pipelines.cli:register",
                                                     (None, "quickstart"): "data_pipelines.cli:register"}
#: Plugins that failed to load: entry-point name (or ``module:function``) -> what went wrong.
plugin_errors: dict[str, str] = {}


def load_plugins(target: typer.Typer) -> list[str]:
    """Call every plugin with ``target``; returns the plugins loaded (entry-point values, ``module:function``).

    The plugins are the entry points of group :data:`PLUGIN_GROUP`, then those named in ``$MMMAT_PLUGINS``
    (each one once). A plugin that fails to load is recorded in :data:`plugin_errors` and skipped, so the other
    commands keep working; a command it would have added says so when it is run.
    """
    import importlib
    import os
    from importlib.metadata import entry_points

    specs = [(ep.name, ep.value, ep.load) for ep in entry_points(group=PLUGIN_GROUP)]
    for value in os.environ.get(PLUGIN_ENV, "").split(","):
        module, _, attr = value.strip().partition(":")
        if module:
            specs.append((value.strip(), value.strip(),
                          lambda m=module, a=attr or "register": getattr(importlib.import_module(m), a)))
    loaded: list[str] = []
    for name, value, load in specs:
        if value in loaded:
            continue
        try:
            load()(target)
        except Exception as exc:  # a broken plugin must not take the whole command line down
            plugin_errors[name] = f"{value}: {type(exc).__name__}: {exc}"
            continue
        loaded.append(value)
    return loaded


def _command_names(typer_app: typer.Typer) -> set[str]:
    return {c.name or c.callback.__name__.replace("_", "-") for c in typer_app.registered_commands if c.callback}


def _not_installed(command: str, plugin: str) -> Any:
    package = plugin.split(".")[0]

    def run(ctx: typer.Context) -> None:
        why = "".join(f"; plugin {k} failed to load ({v})" for k, v in plugin_errors.items())
        _fail(
            f"`mmmat {command}` is provided by the {package} package through the {PLUGIN_GROUP!r} entry points, "
            f"and none provides it here{why}. Install the repository with `pip install -e .` in its root, or "
            f"run a checkout with {PLUGIN_ENV}={plugin}."
        )

    run.__doc__ = f"Not installed: provided by the {package} package (entry-point group {PLUGIN_GROUP!r})."
    return run


def _add_missing_commands() -> None:
    """A stand-in for every plugin command that no plugin added, failing with a message that names its package."""
    loose = {"allow_extra_args": True, "ignore_unknown_options": True}
    for (group, name), plugin in PLUGIN_COMMANDS.items():
        target = app if group is None else next((g.typer_instance for g in app.registered_groups
                                                 if g.name == group), None)
        if target is None or name in _command_names(target):
            continue
        full = f"{group} {name}" if group else name
        target.command(name, context_settings=loose, add_help_option=False)(_not_installed(full, plugin))


load_plugins(app)
_add_missing_commands()


def main() -> None:
    """Entry point."""
    app()


if __name__ == "__main__":
    main()
