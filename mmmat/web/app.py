"""The Dash app behind ``mmmat serve``: Search, Identify, Generate, Design runs and Model pages.

Dash serves its own and Plotly's JavaScript from the installed packages (``serve_locally``), so the pages
work with no internet. Uploads go through :class:`~mmmat.web.uploads.UploadStore`; every error a user can
cause is shown on the page (ids ending in ``-status``) and the server keeps serving.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmmat.io import (
    IMAGE_SUFFIXES,
    PATTERN_SUFFIXES,
    STRUCTURE_SUFFIXES,
    InputError,
    Pattern,
    read_pattern,
    read_structure,
)
from mmmat.web.context import ServeContext, index_vectors, model_summary, run_file
from mmmat.web.uploads import DEFAULT_MAX_UPLOAD_MB, UploadError

#: Errors a user's input can cause; shown on the page.
USER_ERRORS = (InputError, UploadError, ValueError, FileNotFoundError)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 0 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: .6em 0 .2em; }
.hint { color: #666; font-size: .9em; }
.error { color: #b00020; font-weight: 600; }
.ok { color: #1b5e20; }
.upload { border: 2px dashed #999; border-radius: 6px; padding: 1.2em; text-align: center; margin: .5em 0;
          cursor: pointer; }
.row { display: flex; gap: 1.5em; flex-wrap: wrap; align-items: flex-start; }
.col { flex: 1 1 520px; min-width: 420px; }
label { margin-right: .4em; }
input[type=text], input[type=number] { padding: .25em; margin-right: 1em; }
button { padding: .3em .9em; margin: .3em .4em .3em 0; }
table.kv td { padding: .15em .8em .15em 0; vertical-align: top; }
"""


def _status(message: str, ok: bool = False) -> Any:
    from dash import html

    return html.Span(message, className="ok" if ok else "error")


def _table(id_: str, **kw: Any) -> Any:
    from dash import dash_table

    return dash_table.DataTable(
        id=id_, data=[], columns=[], row_selectable="single", selected_rows=[], sort_action="native",
        page_size=15, style_table={"overflowX": "auto"},
        style_cell={"fontFamily": "system-ui, sans-serif", "fontSize": 13, "padding": "3px 8px"},
        style_header={"fontWeight": "600"}, **kw,
    )


def _columns(df: pd.DataFrame) -> list[dict[str, Any]]:
    from mmmat.plots import unit_of

    cols = []
    for c in df.columns:
        unit = "cosine" if c == "similarity" else unit_of(str(c))
        col: dict[str, Any] = {"name": f"{c} ({unit})" if unit else str(c), "id": str(c)}
        if pd.api.types.is_float_dtype(df[c]):
            col.update(type="numeric", format={"specifier": ".4~g"})
        cols.append(col)
    return cols


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(df.to_json(orient="records"))


def _upload(id_: str, what: str, max_bytes: int) -> Any:
    from dash import dcc, html

    return dcc.Upload(
        id=id_, max_size=max_bytes, multiple=False, className="upload",
        children=html.Div([f"Drop {what} here or ", html.A("choose a file")]),
    )


def _cif_zip(items: list[tuple[str, Any]]) -> bytes:
    from pymatgen.io.cif import CifWriter

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, s in items:
            if s is not None:
                z.writestr(f"{name}.cif", str(CifWriter(s)))
    return buf.getvalue()


def _safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s))[:80] or "structure"


# ====================================================================== layout
def _layout(ctx: ServeContext) -> Any:
    from dash import dcc, html

    mb = ctx.uploads.max_bytes
    limit = f"at most {mb / 1e6:.0f} MB"
    s_suf, p_suf = STRUCTURE_SUFFIXES, PATTERN_SUFFIXES
    search = html.Div([
        html.P(f"Drop a crystal ({', '.join(s_suf)}), a powder pattern ({', '.join(p_suf)}) or an image "
               f"(png, tif, npy), {limit}, or type a sentence. Hits come from {ctx.index_dir} "
               f"({len(ctx.index)} crystals).", className="hint"),
        _upload("search-upload", "a CIF, a pattern or an image", mb),
        html.Div([
            dcc.Input(id="search-text", type="text", placeholder="a sentence, e.g. 'a wide-gap nitride'",
                      debounce=True, style={"width": "32em"}),
            html.Button("Search text", id="search-text-go"),
            html.Label("hits"), dcc.Input(id="search-k", type="number", value=10, min=1, max=200, step=1,
                                          style={"width": "5em"}),
            html.Label("wavelength Å (if the file has none)"),
            dcc.Input(id="search-wavelength", type="number", min=0.1, max=5, step="any", style={"width": "7em"}),
        ]),
        html.Div(id="search-status", className="status"),
        dcc.Loading(_table("search-hits")),
        html.Div([html.Button("Download hits (CSV)", id="search-dl-csv"),
                  html.Button("Download hits (CIF, zip)", id="search-dl-cif")]),
        dcc.Download(id="search-download"),
        dcc.Store(id="search-query"),
        html.Div(className="row", children=[
            html.Div(dcc.Graph(id="search-structure"), className="col"),
            html.Div(dcc.Graph(id="search-pattern"), className="col", id="search-pattern-box"),
        ]),
    ])
    if ctx.identify_available():
        ident_note = f"Phases are searched in {ctx.index_dir}; the fit is a whole-pattern refinement of weights."
    else:
        ident_note = ("Phase identification needs mmmat.xrd.identify, which this installation does not have: "
                      "this page stays inactive until it is installed.")
    identify = html.Div([
        html.P(f"Drop a scan ({', '.join(p_suf)}), {limit}. {ident_note}", className="hint", id="identify-note"),
        _upload("identify-upload", "a scan", mb),
        html.Div([
            html.Label("elements (optional)"), dcc.Input(id="identify-elements", type="text",
                                                         placeholder="Fe, Y, O", style={"width": "14em"}),
            html.Label("most phases"), dcc.Input(id="identify-max", type="number", value=4, min=1, max=8, step=1,
                                                 style={"width": "4em"}),
            html.Label("wavelength Å (if the file has none)"),
            dcc.Input(id="identify-wavelength", type="number", min=0.1, max=5, step="any", style={"width": "7em"}),
            html.Button("Identify", id="identify-go"),
        ]),
        html.Div(id="identify-status", className="status"),
        dcc.Loading(_table("identify-phases")),
        html.Button("Download phases (CSV)", id="identify-dl-csv"),
        dcc.Download(id="identify-download"),
        dcc.Store(id="identify-file"),
        dcc.Graph(id="identify-fit"),
    ])
    gen_note = (f"Generator: {ctx.generator_dir}." if ctx.generator_dir is not None else
                "This server has no generator: start it with --generator DIR (a folder written by "
                "train.py fit --config configs/generate/...).")
    generate = html.Div([
        html.P(f"{gen_note} Give a cell composition for structure prediction, or leave it empty for de novo "
               "samples; optionally a property target or a sentence to steer them.", className="hint",
               id="generate-note"),
        html.Div([
            html.Label("composition"), dcc.Input(id="generate-composition", type="text", placeholder="Na4Cl4",
                                                 style={"width": "9em"}),
            html.Label("samples"), dcc.Input(id="generate-n", type="number", value=8, min=1, max=512, step=1,
                                             style={"width": "5em"}),
            html.Label("steps"), dcc.Input(id="generate-steps", type="number", value=50, min=2, max=1000, step=1,
                                           style={"width": "5em"}),
            html.Label("seed"), dcc.Input(id="generate-seed", type="number", value=0, step=1,
                                          style={"width": "5em"}),
        ]),
        html.Div([
            html.Label("target NAME=VALUE"), dcc.Input(id="generate-target", type="text",
                                                       placeholder="formation_energy_per_atom=-2.0",
                                                       style={"width": "18em"}),
            html.Label("sentence"), dcc.Input(id="generate-text", type="text", style={"width": "20em"}),
        ]),
        _upload("generate-pattern", "a powder pattern to condition on (optional)", mb),
        html.Div(id="generate-pattern-name", className="hint"),
        html.Div([html.Button("Generate", id="generate-go"), html.Button("Cancel", id="generate-cancel"),
                  html.Progress(id="generate-progress", value="0", max="1", style={"width": "20em"})]),
        html.Div(id="generate-status", className="status"),
        dcc.Interval(id="generate-tick", interval=500, disabled=True),
        dcc.Store(id="generate-job"),
        dcc.Loading(_table("generate-candidates")),
        html.Button("Download candidates (CIF, zip)", id="generate-dl-cif"),
        dcc.Download(id="generate-download"),
        dcc.Graph(id="generate-structure"),
    ])
    runs = [p.name for p in ctx.design_run_folders()]
    design = html.Div([
        html.P(f"Run folders under {ctx.design_runs}." if ctx.design_runs is not None else
               "No design runs: start the server with --design-runs DIR (a run folder or a folder of them).",
               className="hint"),
        dcc.Dropdown(id="design-run", options=runs, value=runs[-1] if runs else None, clearable=False,
                     placeholder="pick a run", style={"width": "30em"}),
        html.Div(id="design-status", className="status"),
        html.H3("Rounds"), _table("design-rounds"),
        html.Div(className="row", children=[
            html.Div(dcc.Graph(id="design-hits-plot"), className="col"),
            html.Div(dcc.Graph(id="design-guards-plot"), className="col"),
        ]),
        html.H3("Pareto front of the ledger"),
        html.Div([html.Label("x (lower is better)"), dcc.Dropdown(id="design-x", style={"width": "18em"}),
                  html.Label("y (higher is better)"), dcc.Dropdown(id="design-y", style={"width": "18em"})],
                 className="row"),
        dcc.Graph(id="design-pareto"),
        html.H3("Hits"), _table("design-hits"),
        dcc.Graph(id="design-structure"),
    ])
    props = ctx.property_columns()
    model = html.Div([
        html.Div(id="model-info"),
        html.Div([html.Label("colour by"), dcc.Dropdown(id="model-color", options=props,
                                                        value=props[0] if props else None,
                                                        style={"width": "24em"})]),
        dcc.Loading(dcc.Graph(id="model-map")),
    ])
    tabs = [("search", "Search", search), ("identify", "Identify", identify), ("generate", "Generate", generate),
            ("design", "Design runs", design), ("model", "Model", model)]
    return html.Div([
        html.H1("mmmat"),
        dcc.Tabs(id="tabs", value="search", children=[
            dcc.Tab(label=label, value=value, id=f"tab-{value}", children=html.Div(body, id=f"page-{value}"))
            for value, label, body in tabs
        ]),
    ])


# ====================================================================== app
def create_app(
    index: str | Path,
    model: str | Path | None = None,
    design_runs: str | Path | None = None,
    generator: str | Path | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    upload_root: str | Path | None = None,
) -> Any:
    """Build the Dash app (its Flask server is ``app.server``; the shared state is ``app.mmmat``).

    Args:
        index: Index folder written by ``mmmat index build``.
        model: Model folder (default: the one the index records).
        design_runs: A design run folder or a folder of them.
        generator: A generator folder for the Generate page.
        max_upload_mb: Largest upload, MB; larger requests are refused by the browser component and by the
            server (HTTP 413).
        upload_root: Parent of the private temporary upload folder (default: the system's temporary folder).

    """
    import dash
    from dash import Input, Output, State, dcc, html, no_update
    from dash import ctx as cbctx

    from mmmat.web import figures as F

    sctx = ServeContext(index, model, design_runs, generator, max_upload_mb, upload_root)
    app = dash.Dash(__name__, serve_locally=True, title="mmmat", update_title=None,
                    suppress_callback_exceptions=False, assets_ignore=".*")
    app.server.config["MAX_CONTENT_LENGTH"] = int(sctx.uploads.max_bytes * 4 / 3) + 1_000_000
    app.index_string = app.index_string.replace("{%css%}", "{%css%}<style>" + _CSS + "</style>")
    app.layout = _layout(sctx)
    app.mmmat = sctx

    # ------------------------------------------------------------------ search
    @app.callback(
        Output("search-status", "children"), Output("search-hits", "data"), Output("search-hits", "columns"),
        Output("search-hits", "selected_rows"), Output("search-query", "data"),
        Input("search-upload", "contents"), Input("search-text-go", "n_clicks"), Input("search-text", "n_submit"),
        State("search-upload", "filename"), State("search-text", "value"), State("search-k", "value"),
        State("search-wavelength", "value"),
        prevent_initial_call=True,
    )
    def run_search(contents, _clicks, _submit, filename, text, k, wavelength):
        import time

        t0 = time.perf_counter()
        try:
            k = int(k or 10)
            if not 1 <= k <= 200:
                raise ValueError(f"hits must be 1 to 200, got {k}")
            if cbctx.triggered_id == "search-upload":
                path = sctx.uploads.save(filename, contents)
                low = path.name.lower()
                if low.endswith(PATTERN_SUFFIXES) and not low.endswith(STRUCTURE_SUFFIXES):
                    pattern = _read_upload_pattern(path, wavelength)
                    table = sctx.search("xrd", pattern, k)
                    query = {"kind": "xrd", "name": path.name, "two_theta": pattern.two_theta.tolist(),
                             "intensity": pattern.intensity.tolist(), "wavelength": pattern.wavelength}
                elif low.endswith(STRUCTURE_SUFFIXES):
                    structure = _read_crystal_or_powder(path, wavelength)
                    if isinstance(structure, tuple):  # a powder CIF: a pattern, not a crystal
                        pattern = structure[1]
                        table = sctx.search("xrd", pattern, k)
                        query = {"kind": "xrd", "name": path.name, "two_theta": pattern.two_theta.tolist(),
                                 "intensity": pattern.intensity.tolist(), "wavelength": pattern.wavelength}
                    else:
                        table = sctx.search("crystal", structure, k)
                        query = {"kind": "crystal", "name": path.name}
                elif low.endswith(IMAGE_SUFFIXES):
                    table = sctx.search("image", path, k)
                    query = {"kind": "image", "name": path.name}
                else:
                    raise InputError(f"{path.name}: unknown kind of file (crystal, pattern or image expected)")
            else:
                if not text or not str(text).strip():
                    raise ValueError("type a sentence first")
                table = sctx.search("text", str(text), k)
                query = {"kind": "text", "name": str(text)[:200]}
        except USER_ERRORS as exc:
            return _status(f"error: {exc}"), [], [], [], None
        dt = time.perf_counter() - t0
        msg = f"{len(table)} hits for {query['kind']} query {query['name']} in {dt:.2f} s"
        return _status(msg, ok=True), _records(table), _columns(table), [0] if len(table) else [], query

    @app.callback(
        Output("search-structure", "figure"), Output("search-pattern", "figure"),
        Output("search-pattern-box", "style"),
        Input("search-hits", "selected_rows"), Input("search-hits", "derived_virtual_data"),
        State("search-query", "data"),
    )
    def show_hit(selected, data, query):
        if not data or not selected or selected[0] >= len(data):
            return F.empty_figure("select a hit"), F.empty_figure(""), {"display": "none"}
        row = data[selected[0]]
        s = sctx.structure_of(row["material_id"])
        title = f"{row['formula']} ({row['material_id']}) {row.get('spacegroup', '')}"
        sfig = F.structure_figure(s, title) if s is not None else F.empty_figure(
            f"{row['material_id']}: the index's shard folder is not readable here, no structure to show")
        if query and query.get("kind") == "xrd" and s is not None:
            pat = Pattern(np.asarray(query["two_theta"]), np.asarray(query["intensity"]), query["wavelength"],
                          source=query["name"])
            return sfig, F.pattern_overlay_figure(pat, s, row["formula"]), {}
        return sfig, F.empty_figure(""), {"display": "none"}

    @app.callback(
        Output("search-download", "data"),
        Input("search-dl-csv", "n_clicks"), Input("search-dl-cif", "n_clicks"),
        State("search-hits", "data"), prevent_initial_call=True,
    )
    def download_hits(_a, _b, data):
        if not data:
            return no_update
        df = pd.DataFrame(data)
        if cbctx.triggered_id == "search-dl-csv":
            return dcc.send_data_frame(df.to_csv, "hits.csv", index=False)
        items = [(f"{r['rank']:03d}_{_safe_name(r['material_id'])}", sctx.structure_of(r["material_id"]))
                 for r in data]
        return dcc.send_bytes(_cif_zip(items), "hits_cif.zip")

    # ------------------------------------------------------------------ identify
    @app.callback(
        Output("identify-status", "children"), Output("identify-phases", "data"),
        Output("identify-phases", "columns"), Output("identify-fit", "figure"), Output("identify-file", "data"),
        Input("identify-upload", "contents"), Input("identify-go", "n_clicks"),
        State("identify-upload", "filename"), State("identify-elements", "value"), State("identify-max", "value"),
        State("identify-wavelength", "value"), State("identify-file", "data"),
        prevent_initial_call=True,
    )
    def run_identify(contents, _go, filename, elements, max_phases, wavelength, stored):
        import time

        empty = F.empty_figure("")
        if not sctx.identify_available():
            return (_status("error: phase identification needs mmmat.xrd.identify, which this installation "
                            "does not have"), [], [], empty, None)
        t0 = time.perf_counter()
        try:
            if cbctx.triggered_id == "identify-upload" or not stored:
                if not contents:
                    raise ValueError("drop a scan first")
                path = sctx.uploads.save(filename, contents, PATTERN_SUFFIXES)
            else:
                path = Path(stored)
                if sctx.uploads.root not in path.resolve().parents:
                    raise ValueError("drop the scan again")
            els = [e.strip() for e in (elements or "").replace(";", ",").replace(" ", ",").split(",") if e.strip()]
            from pymatgen.core import Element

            bad = [e for e in els if not Element.is_valid_symbol(e)]
            if bad:
                raise ValueError(f"unknown element symbols: {', '.join(bad)}")
            n = int(max_phases or 4)
            if not 1 <= n <= 8:
                raise ValueError(f"most phases must be 1 to 8, got {n}")
            pattern: Any = path
            if wavelength:
                pattern = _io_pattern(path, float(wavelength))
            result = sctx.identify(pattern, els, n)
            d = result.to_dict()
            table = result.to_frame()
        except USER_ERRORS as exc:
            return _status(f"error: {exc}"), [], [], empty, None
        dt = time.perf_counter() - t0
        msg = f"{len(table)} phases, Rwp {d.get('rwp', float('nan')):.2f} % ({path.name}, {dt:.1f} s)"
        return _status(msg, ok=True), _records(table), _columns(table), F.fit_figure(d), str(path)

    @app.callback(
        Output("identify-download", "data"), Input("identify-dl-csv", "n_clicks"),
        State("identify-phases", "data"), prevent_initial_call=True,
    )
    def download_phases(_n, data):
        if not data:
            return no_update
        return dcc.send_data_frame(pd.DataFrame(data).to_csv, "phases.csv", index=False)

    # ------------------------------------------------------------------ generate
    @app.callback(
        Output("generate-status", "children"), Output("generate-job", "data"),
        Output("generate-tick", "disabled"),
        Input("generate-go", "n_clicks"),
        State("generate-composition", "value"), State("generate-n", "value"), State("generate-steps", "value"),
        State("generate-seed", "value"), State("generate-target", "value"), State("generate-text", "value"),
        State("generate-pattern", "contents"), State("generate-pattern", "filename"),
        prevent_initial_call=True,
    )
    def start_generate(_n, composition, n, steps, seed, target, text, pattern, pattern_name):
        try:
            if sctx.generator_dir is None:
                raise ValueError("this server has no generator (start it with --generator DIR)")
            n, steps, seed = int(n or 0), int(steps or 0), int(seed or 0)
            if not 1 <= n <= 512:
                raise ValueError(f"samples must be 1 to 512, got {n}")
            if not 2 <= steps <= 1000:
                raise ValueError(f"steps must be 2 to 1000, got {steps}")
            targets = {}
            for part in (target or "").split(","):
                if not part.strip():
                    continue
                name, sep, value = part.partition("=")
                try:
                    targets[name.strip()] = float(value)
                except ValueError:
                    raise ValueError(f"target {part.strip()!r} must be NAME=VALUE with a number") from None
                if not sep or not name.strip():
                    raise ValueError(f"target {part.strip()!r} must be NAME=VALUE")
            comp = (composition or "").strip() or None
            if comp is not None:
                from mmmat.generative.api import parse_composition

                parse_composition(comp)
            xrd = None
            if pattern:
                xrd = str(sctx.uploads.save(pattern_name, pattern, PATTERN_SUFFIXES))
            jid = sctx.start_generation(n, steps, seed, comp, (text or "").strip() or None, xrd, targets)
        except USER_ERRORS as exc:
            return _status(f"error: {exc}"), None, True
        return _status(f"sampling {n} crystals...", ok=True), jid, False

    @app.callback(Output("generate-pattern-name", "children"), Input("generate-pattern", "filename"),
                  prevent_initial_call=True)
    def show_pattern_name(name):
        return f"conditioning pattern: {name}" if name else ""

    @app.callback(
        Output("generate-status", "children", allow_duplicate=True), Input("generate-cancel", "n_clicks"),
        State("generate-job", "data"), prevent_initial_call=True,
    )
    def cancel_generate(_n, jid):
        job = sctx.jobs.get(jid or "")
        if job is None or job.finished is not None:
            return _status("nothing to cancel")
        job.cancel.set()
        return _status("cancelling after the current batch...")

    @app.callback(
        Output("generate-status", "children", allow_duplicate=True), Output("generate-progress", "value"),
        Output("generate-progress", "max"), Output("generate-tick", "disabled", allow_duplicate=True),
        Output("generate-candidates", "data"), Output("generate-candidates", "columns"),
        Output("generate-candidates", "selected_rows"),
        Input("generate-tick", "n_intervals"), State("generate-job", "data"), prevent_initial_call=True,
    )
    def poll_generate(_tick, jid):
        job = sctx.jobs.get(jid or "")
        if job is None:
            return no_update, "0", "1", True, no_update, no_update, no_update
        if job.state == "running":
            eta = job.eta_s()
            msg = f"{job.done}/{job.total} samples" + (f", about {eta:.0f} s left" if eta is not None else "")
            return _status(msg, ok=True), str(job.done), str(job.total), False, no_update, no_update, no_update
        if job.state != "done":
            return _status(f"generation {job.state}: {job.error}"), str(job.done), str(job.total), True, [], [], []
        structures, info, table = job.result
        wall = info["generation"]["wall_s"]
        msg = (f"{sum(s is not None for s in structures)}/{job.total} samples in {wall:.1f} s ({info['mode']}); "
               f"{int(table['valid'].sum())} valid, {int(table['unique'].sum())} valid and unique")
        return (_status(msg, ok=True), str(job.total), str(job.total), True, _records(table), _columns(table),
                [0])

    @app.callback(
        Output("generate-structure", "figure"), Input("generate-candidates", "selected_rows"),
        Input("generate-candidates", "derived_virtual_data"), State("generate-job", "data"),
    )
    def show_candidate(selected, data, jid):
        job = sctx.jobs.get(jid or "")
        if not data or not selected or job is None or job.result is None or selected[0] >= len(data):
            return F.empty_figure("select a candidate")
        i = int(data[selected[0]]["sample"])
        s = job.result[0][i]
        return F.structure_figure(s, f"sample {i}: {s.composition.reduced_formula}") if s is not None else \
            F.empty_figure(f"sample {i} could not be built")

    @app.callback(
        Output("generate-download", "data"), Input("generate-dl-cif", "n_clicks"), State("generate-job", "data"),
        prevent_initial_call=True,
    )
    def download_candidates(_n, jid):
        job = sctx.jobs.get(jid or "")
        if job is None or job.result is None:
            return no_update
        items = [(f"sample_{i:05d}", s) for i, s in enumerate(job.result[0])]
        return dcc.send_bytes(_cif_zip(items), "candidates_cif.zip")

    # ------------------------------------------------------------------ design runs
    @app.callback(
        Output("design-status", "children"), Output("design-rounds", "data"), Output("design-rounds", "columns"),
        Output("design-hits-plot", "figure"), Output("design-guards-plot", "figure"),
        Output("design-hits", "data"), Output("design-hits", "columns"), Output("design-x", "options"),
        Output("design-x", "value"), Output("design-y", "options"), Output("design-y", "value"),
        Input("design-run", "value"),
    )
    def show_run(name):
        import plotly.graph_objects as go

        empty = F.empty_figure("")
        if not name:
            return "", [], [], empty, empty, [], [], [], None, [], None
        try:
            run = sctx.design_run(name)
        except USER_ERRORS as exc:
            return _status(f"error: {exc}"), [], [], empty, empty, [], [], [], None, [], None
        rounds = run["rounds"]
        hp = go.Figure()
        if {"cumulative_oracle_calls", "cumulative_hits"} <= set(rounds.columns):
            hp.add_trace(go.Scatter(x=rounds["cumulative_oracle_calls"], y=rounds["cumulative_hits"],
                                    mode="lines+markers", name=run["strategy"] or name))
        hp.update_layout(title="hits vs oracle calls", xaxis_title="oracle calls (cumulative)",
                         yaxis_title="hits (cumulative)", height=340, margin={"t": 40})
        g = run["guards"]
        gp = go.Figure(go.Bar(x=list(g.index), y=list(g.values))) if len(g) else F.empty_figure("no guard counts")
        gp.update_layout(title="guard counts (all rounds)", height=340, margin={"t": 40})
        ledger = run["ledger"]
        num = [c for c in ledger.columns if pd.api.types.is_numeric_dtype(ledger[c]) and c not in ("round",)
               and ledger[c].notna().any()]
        xdef = next((c for c in num if "hull" in c), num[0] if num else None)
        ydef = next((c for c in num if c != xdef and c not in ("is_hit",)), None)
        hits = run["hits"]
        msg = (f"{name}: {len(rounds)} rounds, {len(hits)} hits, {len(ledger)} candidates in the ledger"
               + (f", strategy {run['strategy']}" if run["strategy"] else ""))
        return (_status(msg, ok=True), _records(rounds), _columns(rounds), hp, gp, _records(hits), _columns(hits),
                num, xdef, num, ydef)

    @app.callback(
        Output("design-pareto", "figure"), Input("design-x", "value"), Input("design-y", "value"),
        State("design-run", "value"),
    )
    def show_pareto(x, y, name):
        import plotly.graph_objects as go

        if not name or not x or not y:
            return F.empty_figure("pick two ledger columns")
        try:
            ledger = sctx.design_run(name)["ledger"]
        except USER_ERRORS as exc:
            return F.empty_figure(str(exc))
        front = F.pareto_mask(ledger[x], ledger[y])
        label = ledger["formula"] if "formula" in ledger else None
        on = ledger[front].sort_values(x)
        fig = go.Figure([
            go.Scatter(x=ledger[x], y=ledger[y], mode="markers", name="candidates", text=label,
                       marker={"size": 5, "color": "#9e9e9e"}),
            go.Scatter(x=on[x], y=on[y], mode="markers+lines", name="Pareto front",
                       text=on["formula"] if "formula" in on else None, marker={"size": 8, "color": "crimson"}),
        ])
        fig.update_layout(xaxis_title=x, yaxis_title=y, height=380, margin={"t": 30})
        return fig

    @app.callback(
        Output("design-structure", "figure"), Input("design-hits", "selected_rows"),
        Input("design-hits", "derived_virtual_data"), State("design-run", "value"),
    )
    def show_design_hit(selected, data, name):
        if not data or not selected or not name or selected[0] >= len(data):
            return F.empty_figure("select a hit")
        row = data[selected[0]]
        try:
            run = {p.name: p for p in sctx.design_run_folders()}[name]
            s = read_structure(run_file(run, str(row.get("cif") or "")), ordered=True)
        except (KeyError, *USER_ERRORS) as exc:
            return F.empty_figure(f"no structure: {exc}")
        return F.structure_figure(s, f"{row.get('formula', '')} ({row.get('id', '')})")

    # ------------------------------------------------------------------ model
    @app.callback(Output("model-info", "children"), Input("tabs", "value"))
    def show_model_info(tab):
        if tab != "model":
            return no_update
        info = model_summary(sctx)
        return html.Table([html.Tr([html.Td(k), html.Td(str(v))]) for k, v in info.items()], className="kv")

    @app.callback(Output("model-map", "figure"), Input("model-color", "value"), Input("tabs", "value"))
    def show_map(color, tab):
        if tab != "model":
            return no_update
        try:
            vec, meta = index_vectors(sctx)
        except USER_ERRORS as exc:
            return F.empty_figure(str(exc))
        fig = F.latent_map_figure(F.pca_2d(vec), meta, color)
        fig.update_layout(title=f"{len(meta)} indexed crystals, first two principal components of the embeddings")
        return fig

    return app


def _read_upload_pattern(path: Path, wavelength: float | None) -> Pattern:
    """An uploaded pattern (:func:`mmmat.io.read_pattern`), named by its file name."""
    pattern = read_pattern(path, wavelength=wavelength)
    pattern.source = path.name
    return pattern


def _read_crystal_or_powder(path: Path, wavelength: float | None) -> Any:
    """A ``.cif`` upload: a crystal, or, when it holds a powder pattern and no crystal, ``("xrd", pattern)``."""
    try:
        return read_structure(path, ordered=True)
    except InputError as first:
        if path.suffix.lower() != ".cif":
            raise
        try:
            return ("xrd", _read_upload_pattern(path, wavelength))
        except InputError:
            raise first from None


def _io_pattern(path: Path, wavelength: float) -> Any:
    """The scan through :func:`mmmat.io.read_pattern` with a wavelength the file lacks."""
    from mmmat import io as mio

    return mio.read_pattern(path, wavelength=wavelength)


def serve(
    index: str | Path,
    model: str | Path | None = None,
    design_runs: str | Path | None = None,
    generator: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8050,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    debug: bool = False,
) -> None:
    """Run the app with Flask's threaded server on ``host:port`` until interrupted."""
    app = create_app(index, model, design_runs, generator, max_upload_mb)
    _ = app.mmmat.model  # load the model and the indexed crystals now, not on the first query
    app.mmmat.records()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app.run(host=host, port=port, debug=debug, use_reloader=False, dev_tools_ui=debug, dev_tools_props_check=debug)


__all__ = ["USER_ERRORS", "create_app", "serve"]
