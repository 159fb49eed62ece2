"""Phase identification (``mmmat.xrd.identify``): synthetic mixtures, measured IUCr profiles, real XRDML scans.

Writes ``benchmarks/results/identify.json``.

Index: the 17,259 mp20p crystals (train, val and test of ``../shared/data/mp_20``) plus the 15 structures of the
IUCr Rietveld CIFs, as peak tables (``phases.npz``, built once into ``--index`` when missing).  Without a
``--model`` the index is structure-only and the learned route is not measured.

(a) Synthetic mixtures of 2 or 3 (even odds) distinct mp20p **test** crystals (``--split val``: val crystals, the
    mixtures every identify setting is tuned on), weight fractions Dirichlet(1)
    rescaled so every phase has at least 0.1, each phase's cell scaled isotropically by 1 ± 1 % (uniform),
    rendered by :mod:`mmmat.xrd.instrument` with the settings of :data:`BENCH_RANGES`, every one outside the
    pretraining ranges (:class:`mmmat.xrd.instrument.InstrumentRanges` defaults): Caglioti U 0.01-0.03
    (training 0-0.01) and W 0.008-0.015 (0.001-0.008), crystallites 15-30 nm (30-300), axial asymmetry
    0.15-0.3 (0-0.15), sample displacement 0.1-0.2 mm either way (±0.1), zero shift 0.05-0.1° either way
    (±0.05), amorphous hump 0.1-0.2 of the strongest peak (0-0.1), 500-2,000 counts at the strongest peak
    (2,000-100,000), Kα2/Kα1 0.5 at Cu; 2θ from 8-12° to 80-100° in steps of 0.01-0.02°.  No preferred
    orientation (the peak tables keep no hkl).  For each pattern: ``identify`` with the true elements and
    without; the classical route is the candidate list of the same call ranked by its screening score.  A
    crystal of the same reduced formula and space group as a true phase counts as that phase (mp20p holds
    some compounds more than once, under other ids).
    "All phases in the top 5": every true phase among the first five of the route's ranking (for
    ``identify``: the phases it keeps, then the other candidates).  Weight-fraction MAE: over the true
    phases, 0 for a phase not found.
(b) The 15 IUCr profiles: ``identify`` with the elements of the true structure and without; rank of the true
    structure (``iucr-<file>``, or an mp20p crystal of the same reduced formula and space group: the same
    phase indexed twice) among mp20p + the 15.
(c) The 20 A-Lab XRDML scans: ``identify`` with the precursors' elements (from the file name); phases, Rwp,
    seconds; a JSON and a PNG per scan in ``--plots``.

    python benchmarks/identify.py --n 1000 --workers 14
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
import tarfile
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: Instrument settings of the synthetic scans, outside the pretraining ranges (module docstring).
BENCH_RANGES = {
    "U": (0.01, 0.03), "W": (0.008, 0.015), "size_nm": (15.0, 30.0), "asymmetry": (0.15, 0.3),
    "displacement_mm": (0.1, 0.2), "zero_shift": (0.05, 0.1), "hump_height": (0.1, 0.2),
    "counts": (500.0, 2000.0), "two_theta_min": (8.0, 12.0), "two_theta_max": (80.0, 100.0),
    "step": (0.01, 0.02),
}


def build_index(index: Path, data: Path) -> None:
    """mp20p crystals plus the IUCr structures as peak tables in ``index``."""
    from mmmat.xrd.phases import PhaseTable, add_crystals, crystal_from_structure, crystals_from_source

    if not (index / "phases.npz").is_file():
        crystals, problems = crystals_from_source("mp20", data / "mp_20")
        print(f"mp20p: {len(crystals)} crystals, {len(problems)} skipped", flush=True)
        add_crystals(index, crystals, info={"source": "mp20p (train, val, test)"})
    if not any(m.startswith("iucr-") for m in PhaseTable.load(index).material_id):
        iucr = [crystal_from_structure(s, f"iucr-{name}", source="iucr") for name, s, _, _ in iucr_items(data)
                if s is not None]
        add_crystals(index, iucr, info={"source": "mp20p (train, val, test) + IUCr structures"})


def ensure_embeddings(index: Path, model: Path, shards: Path | None, data: Path) -> None:
    """Crystal embeddings of the index's crystals by ``model`` beside the peak tables (learned route)."""
    if (index / "index.json").is_file():
        return
    if shards is None:
        raise SystemExit(f"{index} holds no embeddings: pass --shards (mp20p shards of `mmmat data build`)")
    from mmmat.retrieval import build_index as embed_shards_index
    from mmmat.retrieval.api import add_structures_to_index

    embed_shards_index(model, shards, index)
    iucr = [(f"iucr-{name}", s) for name, s, _, _ in iucr_items(data) if s is not None] if \
        (data / "xrd_measured").is_dir() else []
    if iucr:
        add_structures_to_index(index, iucr, model, skip_duplicates=True)


def learned_ranking(res) -> list[str]:
    """The learned route's ranking: candidates by their rank in the model's latent space."""
    hits = [c for c in res.candidates if c.get("learned_rank")]
    return [c["material_id"] for c in sorted(hits, key=lambda c: c["learned_rank"])]


def modulated(cif: Path) -> bool:
    """Whether a CIF describes an incommensurately modulated structure (a superspace group).

    pymatgen reads only its basic cell: positions, occupancies and satellite reflections of the modulation are
    lost, so the peak table computed from it is not that of the measured phase.
    """
    text = cif.read_text(errors="replace")
    dim = re.search(r"^_cell_modulation_dimension\s+(\d+)", text, re.MULTILINE)
    return bool(dim and int(dim.group(1)) > 0) or re.search(r"^_space_group_ssg_name\b", text, re.MULTILINE) is not None


def iucr_items(data: Path) -> list[tuple[str, object, object, bool]]:
    """(file stem, structure or None, pattern or error text, :func:`modulated`) of the IUCr Rietveld CIFs."""
    from pymatgen.io.cif import CifParser

    from mmmat.io import InputError, read_pattern

    tmp = tempfile.mkdtemp()
    with tarfile.open(data / "xrd_measured/iucr_rietveld_cifs_cdvae_xrd/cif_files.tar.xz") as t:
        t.extractall(tmp, filter="data")
    out = []
    for f in sorted(Path(tmp).rglob("*.cif")):
        try:
            pat: object = read_pattern(f)
        except InputError as exc:
            pat = str(exc)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = CifParser(str(f)).parse_structures(primitive=False)[0]
        except Exception:  # pymatgen raises many types on these files
            s = None
        out.append((f.stem, s, pat, modulated(f)))
    return out


# ---------------------------------------------------------------------- synthetic mixtures
_STATE: dict = {}


def _init(index: str, model: str | None = None, split: str = "test") -> None:
    import torch

    from mmmat.xrd.identify import load_table

    torch.set_num_threads(1)
    table = load_table(index)
    _STATE["index"] = index
    _STATE["model"] = model
    _STATE["table"] = table
    _STATE["test"] = np.flatnonzero(np.char.startswith(table.source.astype(str), f"mp20:{split}"))
    # the same phase indexed twice (mp20p holds some compounds more than once): same formula and space group
    _STATE["key"] = {m: f"{f}|{g}" for m, f, g in zip(table.material_id.tolist(), table.formula.tolist(),
                                                        table.spacegroup.tolist())}


def _uniform(rng: np.random.Generator, name: str, signed: bool = False) -> float:
    lo, hi = BENCH_RANGES[name]
    v = rng.uniform(lo, hi)
    return float(v * (1 if not signed or rng.random() < 0.5 else -1))


def synthetic_case(seed: int) -> dict:
    """Render one mixture and identify it with and without the element list."""
    import torch

    from mmmat.xrd.identify import identify
    from mmmat.xrd.instrument import InstrumentParams, uniform_grid
    from mmmat.xrd.mixtures import as_pattern, render_mixtures

    table, test = _STATE["table"], _STATE["test"]
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 4))
    while True:
        rows = rng.choice(test, k, replace=False)
        if len(set(table.formula[rows])) == k:
            break
    w = rng.dirichlet(np.ones(k)) * (1 - 0.1 * k) + 0.1
    scales = 1 + rng.uniform(-0.01, 0.01, k)
    p = InstrumentParams.fixed(
        1, dtype=torch.float64, ka2_ratio=0.5, U=_uniform(rng, "U"), W=_uniform(rng, "W"),
        size_nm=_uniform(rng, "size_nm"), asymmetry=_uniform(rng, "asymmetry"),
        displacement_mm=_uniform(rng, "displacement_mm", True), zero_shift=_uniform(rng, "zero_shift", True),
        hump_height=_uniform(rng, "hump_height"), hump_center=float(rng.uniform(18, 30)),
        hump_fwhm=float(rng.uniform(6, 14)), counts=float(np.exp(rng.uniform(*np.log(BENCH_RANGES["counts"])))),
        background=[[float(rng.uniform(0.02, 0.1)), float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.02, 0.02))]],
    )
    grid = uniform_grid(_uniform(rng, "two_theta_min"), _uniform(rng, "two_theta_max"), _uniform(rng, "step"),
                        dtype=torch.float64)
    y = render_mixtures(table, [(rows, w, scales)], p, grid, torch.Generator().manual_seed(seed))
    pat = as_pattern(grid, y, p, 0, f"synthetic-{seed}")
    truth = {str(table.material_id[r]): float(wi) for r, wi in zip(rows, w)}
    elements = sorted(set(" ".join(table.elements[rows]).split()))
    out = {"seed": seed, "truth": truth, "formulas": [str(f) for f in table.formula[rows]]}
    for tag, els in (("elements", elements), ("none", None)):
        t0, c0 = time.perf_counter(), time.process_time()
        res = identify(pat, _STATE["index"], elements=els, max_phases=4, model=_STATE["model"],
                       learned=_STATE["model"] is not None)
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
        classical = [c["material_id"] for c in sorted(res.candidates, key=lambda c: -(c["classical_score"] or -1))]
        key = _STATE["key"]
        found: dict[str, float] = {}
        for p in res.phases:
            found[key[p.material_id]] = found.get(key[p.material_id], 0.0) + p.weight_fraction
        true_keys = {key[m]: wt for m, wt in truth.items()}
        top_id = {key[m] for m in res.ranking()[:5]}
        top_cl = {key[m] for m in classical[:5]}
        top_le = {key[m] for m in learned_ranking(res)[:5]}
        out[tag] = {
            "seconds": sec,
            "cpu_seconds": cpu,
            "rwp": res.rwp,
            "found": found,
            "top5": res.ranking()[:5],
            "top5_identify": all(k in top_id for k in true_keys),
            "top5_classical": all(k in top_cl for k in true_keys),
            "top5_learned": all(k in top_le for k in true_keys) if _STATE["model"] else None,
            "exact": set(found) == set(true_keys),
            "wf_abs_err": [abs(found.get(k, 0.0) - wt) for k, wt in true_keys.items()],
            "false_phases": len(set(found) - set(true_keys)),
        }
    return out


def synthetic(args: argparse.Namespace) -> tuple[dict, dict]:
    """Part (a)."""
    seeds = [args.seed * 100_000 + i for i in range(args.first, args.n)]
    cases = []
    t0 = time.perf_counter()
    if args.workers > 1:
        # spawned workers: a process forked after the parent ran torch (the embeddings) can hang in its thread pools
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init,
                                 initargs=(str(args.index), args.model, args.split)) as ex:
            futures = [ex.submit(synthetic_case, s) for s in seeds]
            for fut in futures:  # in seed order: a time limit keeps the first patterns, not the easiest
                left = args.max_seconds - (time.perf_counter() - t0) if args.max_seconds else None
                try:
                    cases.append(fut.result(timeout=None if left is None else max(left, 0.0)))
                except TimeoutError:
                    print(f"stopping after {len(cases)} patterns: --max-seconds {args.max_seconds}", flush=True)
                    break
                if len(cases) % 50 == 0:
                    print(f"synthetic {len(cases)}/{args.n} in {time.perf_counter() - t0:.0f} s", flush=True)
            ex.shutdown(wait=False, cancel_futures=True)
    else:
        _init(str(args.index), args.model, args.split)
        for s in seeds:
            cases.append(synthetic_case(s))
            if len(cases) % 10 == 0:
                print(f"synthetic {len(cases)}/{args.n} in {time.perf_counter() - t0:.0f} s", flush=True)
            if args.max_seconds and time.perf_counter() - t0 > args.max_seconds:
                print(f"stopping after {len(cases)} patterns: --max-seconds {args.max_seconds}", flush=True)
                break

    def frac(tag: str, key: str) -> float:
        return round(float(np.mean([c[tag][key] for c in cases])), 4)

    sec = np.array([c["elements"]["seconds"] for c in cases])
    sec_none = np.array([c["none"]["seconds"] for c in cases])
    metrics = {
        "synthetic_patterns": len(cases),
        "synthetic_all_phases_top5_elements": frac("elements", "top5_identify"),
        "synthetic_all_phases_top5": frac("none", "top5_identify"),
        "synthetic_classical_all_phases_top5_elements": frac("elements", "top5_classical"),
        "synthetic_classical_all_phases_top5": frac("none", "top5_classical"),
        "synthetic_exact_phase_set_elements": frac("elements", "exact"),
        "synthetic_exact_phase_set": frac("none", "exact"),
        "synthetic_weight_fraction_mae": round(
            float(np.mean([e for c in cases for e in c["elements"]["wf_abs_err"]])), 4),
        "synthetic_weight_fraction_mae_no_elements": round(
            float(np.mean([e for c in cases for e in c["none"]["wf_abs_err"]])), 4),
        "synthetic_false_phases_per_pattern_elements": frac("elements", "false_phases"),
        "synthetic_false_phases_per_pattern": frac("none", "false_phases"),
        "synthetic_median_rwp_elements": round(float(np.median([c["elements"]["rwp"] for c in cases])), 3),
        "seconds_per_scan": round(float(np.median(sec)), 3),
        "seconds_per_scan_mean": round(float(np.mean(sec)), 3),
        "seconds_per_scan_p90": round(float(np.percentile(sec, 90)), 3),
        "seconds_per_scan_no_elements": round(float(np.median(sec_none)), 3),
        "cpu_seconds_per_scan": round(float(np.median([c["elements"]["cpu_seconds"] for c in cases])), 3),
        "cpu_seconds_per_scan_no_elements": round(float(np.median([c["none"]["cpu_seconds"] for c in cases])), 3),
        "synthetic_learned_all_phases_top5_elements": frac("elements", "top5_learned") if args.model else None,
        "synthetic_learned_all_phases_top5": frac("none", "top5_learned") if args.model else None,
    }
    by_k = {}
    for k in (2, 3):
        sub = [c for c in cases if len(c["truth"]) == k]
        if sub:
            by_k[f"{k}_phases"] = {
                "patterns": len(sub),
                "all_top5_elements": round(float(np.mean([c["elements"]["top5_identify"] for c in sub])), 4),
                "all_top5": round(float(np.mean([c["none"]["top5_identify"] for c in sub])), 4),
                "classical_all_top5_elements": round(float(np.mean([c["elements"]["top5_classical"] for c in sub])), 4),
            }
    if args.cases:  # every pattern, one JSON object per line: two runs can be compared pattern by pattern
        Path(args.cases).parent.mkdir(parents=True, exist_ok=True)
        with open(args.cases, "w") as fh:
            for c in cases:
                fh.write(json.dumps(c, default=float) + "\n")
    return metrics, {"synthetic_by_phase_count": by_k, "synthetic_cases_head": cases[:20]}


# ---------------------------------------------------------------------- IUCr profiles
def iucr(args: argparse.Namespace) -> tuple[dict, dict]:
    """Part (b)."""
    from mmmat.io import InputError, Pattern
    from mmmat.xrd.identify import identify, load_table

    table = load_table(args.index)
    id_row = {m: i for i, m in enumerate(table.material_id.tolist())}
    rows = []
    items = iucr_items(args.data)
    if args.iucr_slice:
        a, b = (int(x) if x else None for x in args.iucr_slice.split(":"))
        items = items[a:b]
    for name, s, pat, mod in items:
        row: dict = {"file": name, "modulated": mod}
        if s is None or not isinstance(pat, Pattern):
            row["error"] = pat if isinstance(pat, str) else "structure not parsed"
            rows.append(row)
            continue
        true_id = f"iucr-{name}"
        r0 = id_row[true_id]
        same = (table.formula == table.formula[r0]) & (table.spacegroup == table.spacegroup[r0])
        true_ids = set(table.material_id[same].tolist()) | {true_id}  # the same phase indexed again (mp20p)
        row.update(formula=s.composition.reduced_formula, wavelength=pat.wavelength, same_phase=sorted(true_ids))
        for tag, els in (("elements", sorted({e.symbol for e in s.composition.elements})), ("none", None)):
            try:
                t0 = time.perf_counter()
                res = identify(pat, args.index, elements=els, max_phases=4, model=args.model,
                               learned=args.model is not None)
            except InputError as exc:
                row["error"] = str(exc)
                break
            ranking = res.ranking()
            classical = [c["material_id"] for c in sorted(res.candidates, key=lambda c: -(c["classical_score"] or -1))]
            learned = learned_ranking(res)
            row[tag] = {
                "rank_learned": next((i + 1 for i, m in enumerate(learned) if m in true_ids), None)
                if args.model else None,
                "rank_identify": next((i + 1 for i, m in enumerate(ranking) if m in true_ids), None),
                "rank_classical": next((i + 1 for i, m in enumerate(classical) if m in true_ids), None),
                "top3_identify": ranking[:3],
                "phases": [(p.material_id, p.formula, round(p.weight_fraction, 3)) for p in res.phases],
                "rwp": round(res.rwp, 2),
                "seconds": round(time.perf_counter() - t0, 2),
            }
        rows.append(row)
        print(name, {k: row.get(k, {}).get("rank_identify") if isinstance(row.get(k), dict) else None
                     for k in ("elements", "none")}, row.get("error", ""), flush=True)
    return iucr_metrics(rows, args.model is not None), {"iucr": rows}


def iucr_metrics(rows: list[dict], learned: bool) -> dict:
    """Counts over the IUCr rows (also used to merge rows measured by several processes)."""
    ok = [r for r in rows if "elements" in r and "none" in r]
    periodic = [r for r in ok if not r.get("modulated")]
    metrics = {
        "iucr_profiles": len(rows),
        "iucr_readable": len(ok),
        "iucr_rank1_identify": sum(r["elements"]["rank_identify"] == 1 for r in ok),
        "iucr_rank1_identify_no_elements": sum(r["none"]["rank_identify"] == 1 for r in ok),
        "iucr_rank1_classical": sum(r["elements"]["rank_classical"] == 1 for r in ok),
        "iucr_rank1_classical_no_elements": sum(r["none"]["rank_classical"] == 1 for r in ok),
        "iucr_top10_classical_no_elements": sum((r["none"]["rank_classical"] or 99) <= 10 for r in ok),
        # incommensurately modulated structures: their basic cell's computed pattern is not the phase's
        "iucr_modulated": sum(bool(r.get("modulated")) for r in ok),
        "iucr_rank1_identify_periodic": sum(r["elements"]["rank_identify"] == 1 for r in periodic),
        "iucr_rank1_classical_periodic": sum(r["elements"]["rank_classical"] == 1 for r in periodic),
    }
    for tag, suffix in (("elements", "_elements"), ("none", "")):
        ranks = [r[tag]["rank_learned"] for r in ok]
        metrics[f"iucr_learned_rank1{suffix}"] = sum(x == 1 for x in ranks) if learned else None
        metrics[f"iucr_learned_top10{suffix}"] = sum((x or 99) <= 10 for x in ranks) if learned else None
        metrics[f"iucr_learned_median_rank{suffix}"] = (
            float(np.median([x or 99 for x in ranks])) if learned and ranks else None)
        cl = [r[tag]["rank_classical"] for r in ok]
        metrics[f"iucr_classical_top10{suffix}"] = sum((x or 99) <= 10 for x in cl)
        metrics[f"iucr_classical_median_rank{suffix}"] = float(np.median([x or 99 for x in cl])) if cl else None
    return metrics



# ---------------------------------------------------------------------- real scans
def _precursor_elements(stem: str) -> list[str]:
    from pymatgen.core import Composition

    els: set[str] = set()
    for part in stem.split("_")[0].split("-"):
        formula = re.sub(r"^\d+", "", part)
        els |= {e.symbol for e in Composition(formula).elements}
    return sorted(els)


def scans(args: argparse.Namespace) -> tuple[dict, dict]:
    """Part (c)."""
    import subprocess

    from mmmat.xrd.identify import identify

    tmp = tempfile.mkdtemp()
    with tarfile.open(args.data / "xrd_measured/alab_binary_reactions/binary_reactions_xrdml.tar.xz") as t:
        t.extractall(tmp, filter="data")
    files = sorted(Path(tmp).rglob("*.xrdml"))
    if args.scan_slice:
        a, b = (int(x) if x else None for x in args.scan_slice.split(":"))
        files = files[a:b]
    plots = Path(args.plots)
    plots.mkdir(parents=True, exist_ok=True)
    rows = []
    for f in files:
        els = _precursor_elements(f.stem)
        t0 = time.perf_counter()
        res = identify(f, args.index, elements=els, max_phases=4)
        sec = time.perf_counter() - t0
        res.plot(plots / f"{f.stem}.png")
        (plots / f"{f.stem}.json").write_text(json.dumps(res.to_dict()))
        rows.append({"scan": f.name, "elements": els, "rwp": round(res.rwp, 2), "seconds": round(sec, 2),
                     "phases": [{"material_id": p.material_id, "formula": p.formula, "spacegroup": p.spacegroup,
                                 "weight_fraction": round(p.weight_fraction, 3),
                                 "lattice_scale": round(p.lattice_scale, 4)} for p in res.phases]})
        print(f.name, rows[-1]["rwp"], rows[-1]["seconds"], [(p["formula"], p["weight_fraction"])
                                                            for p in rows[-1]["phases"]], flush=True)
    # one scan through the command line, in a fresh process (imports included)
    f = files[0]
    cmd = [sys.executable, "-m", "mmmat.cli", "identify", str(f), "--index", str(args.index), "--elements",
           ",".join(_precursor_elements(f.stem)), "--png", str(plots / "cli.png"), "--json", str(plots / "cli.json")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    cli_sec = time.perf_counter() - t0
    metrics = {
        "real_scans": len(rows),
        "real_scans_seconds_per_scan": round(float(np.median([r["seconds"] for r in rows])), 3),
        "real_scans_median_rwp": round(float(np.median([r["rwp"] for r in rows])), 2),
        "cli_identify_wall_seconds": round(cli_sec, 2),
        "cli_identify_exit_code": proc.returncode,
    }
    return metrics, {"real_scans": rows, "plots": str(plots)}


def merge_pieces(files: list[str], out: str | None) -> None:
    """Pool the synthetic metrics of pieces of one run (disjoint pattern ranges) into one result.

    Fractions and per-pattern counts are weighted by patterns, the weight-fraction MAE by true phases (from
    the 2- and 3-phase counts); a median or percentile cannot be pooled: those keys hold the pattern-weighted
    mean of the pieces' values, and each piece's ``seconds_per_scan`` median is kept in ``synthetic_pieces``.
    """

    docs = [json.loads(Path(f).read_text()) for f in files]
    n = np.array([d["metrics"]["synthetic_patterns"] for d in docs], dtype=float)
    phases = np.array([sum(int(k[0]) * v["patterns"] for k, v in d["synthetic_by_phase_count"].items())
                       for d in docs], dtype=float)
    metrics: dict = {}
    for key in docs[0]["metrics"]:
        vals = [d["metrics"].get(key) for d in docs]
        if key == "synthetic_patterns":
            metrics[key] = int(n.sum())
        elif any(v is None for v in vals) or not key.startswith(("synthetic", "seconds", "cpu_seconds")):
            metrics[key] = vals[0] if len(set(map(str, vals))) == 1 else None
        else:
            w = phases if "_mae" in key else n
            metrics[key] = round(float(np.dot(vals, w) / w.sum()), 4)
    by_k: dict = {}
    for k in ("2_phases", "3_phases"):
        parts = [d["synthetic_by_phase_count"].get(k) for d in docs if k in d["synthetic_by_phase_count"]]
        if parts:
            m = np.array([p["patterns"] for p in parts], dtype=float)
            by_k[k] = {"patterns": int(m.sum()), **{f: round(float(np.dot([p[f] for p in parts], m) / m.sum()), 4)
                                                    for f in parts[0] if f != "patterns"}}
    extra = {key: docs[0][key] for key in docs[0] if key not in ("card", "date", "command", "metrics")}
    extra["synthetic_by_phase_count"] = by_k
    extra["synthetic_pieces"] = [{"command": d["command"], "date": d["date"],
                                  "patterns": d["metrics"]["synthetic_patterns"],
                                  "seconds_per_scan_median": d["metrics"]["seconds_per_scan"],
                                  "load_average_1min_at_end": d["metrics"].get("load_average_1min_at_end")}
                                 for d in docs]
    write_result("identify", metrics, extra, out=out)


def main() -> None:
    """Run the parts asked for and write results/identify.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--index", type=Path, default=ROOT / "runs" / "identify_index")
    ap.add_argument("--n", type=int, default=1000, help="Synthetic patterns.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first", type=int, default=0,
                    help="First synthetic pattern (a run in pieces: --first A --n B measures patterns A..B-1).")
    ap.add_argument("--merge", default=None,
                    help="Comma-separated result files of synthetic pieces of one run: pool them into --out.")
    ap.add_argument("--split", default="test", choices=("test", "val"),
                    help="mp20p split the synthetic mixtures are drawn from: val to tune settings, test to report.")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=0, help="Stop the synthetic part after this long.")
    ap.add_argument("--parts", default="synthetic,iucr,scans")
    ap.add_argument("--plots", default=str(ROOT / "runs" / "identify_scans"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--cases", default=None,
                    help="Write every synthetic pattern's outcome to this JSON-lines file (for paired comparisons).")
    ap.add_argument("--scan-slice", default=None, help="Only these XRDML scans (Python slice a:b of the sorted list).")
    ap.add_argument("--iucr-slice", default=None, help="Only these IUCr files (Python slice a:b of the sorted list).")
    ap.add_argument("--model", default=None, help="Model folder with an xrd encoder: measure the learned route.")
    ap.add_argument("--shards", type=Path, default=None,
                    help="mp20p shards (`mmmat data build`) to embed the index with --model when it has no embeddings.")
    args = ap.parse_args()
    if args.merge:
        merge_pieces(args.merge.split(","), args.out)
        return
    build_index(args.index, args.data)
    if args.model:
        ensure_embeddings(args.index, Path(args.model), args.shards, args.data)
    metrics: dict = {"index_crystals": None}
    extra: dict = {"bench_ranges": BENCH_RANGES}
    from mmmat.xrd.phases import PhaseTable

    metrics["index_crystals"] = len(PhaseTable.load(args.index))
    parts = args.parts.split(",")
    for name, fn in (("synthetic", synthetic), ("iucr", iucr), ("scans", scans)):
        if name in parts:
            m, e = fn(args)
            metrics.update(m)
            extra.update(e)
    metrics["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    extra["note"] = (f"learned route: model {args.model}" if args.model else
                     "learned route: not measured (no --model given); pass --model and --shards.")
    extra["synthetic_split"] = args.split
    if "synthetic" in parts:
        extra["note"] += (f" Synthetic mixtures drawn from the mp20p {args.split} split; the identify settings were "
                          "chosen on mixtures of val phases only (--split val), the test mixtures measured once.")
    write_result("identify", metrics, extra, out=args.out)


if __name__ == "__main__":
    main()
