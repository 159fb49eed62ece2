"""The judge of generated crystals, timed: batched relaxers compared, and the full staged report of de novo samples.

Four modes.

``relaxers``: the same perturbed mp20p-like crystals relaxed (at most ``--steps`` FIRE steps, fmax 0.05 eV/Å)
three ways: one by one with ASE's ``FIRE(UnitCellFilter)`` and the MLIP's ASE calculator, batched by
:func:`mmmat.evaluation.relax.batched_relax` (one MLIP call per step for every running structure; for SevenNet
also with the per-structure ASE neighbour lists instead of the batch's on the device), and batched
by torch-sim-atomistic (``torch_sim.optimize`` with ``unit_cell_fire`` and torch-sim's SevenNet model; 0.3 has
no CHGNet model, and its SevenNet model fails with sevenn 0.13: the error is recorded). Wall time and the
largest energy difference to the one-by-one run are reported::

    python benchmarks/judge.py relaxers --n 8 --steps 40 --device cpu

``report``: the full staged report (validity, coverage, distribution, uniqueness, novelty, stability with CHGNet
and SevenNet-0 against the hull of every mp20p split) of a folder of generated samples, after
``mmmat evaluate prepare`` has cached the reference work (timed too, cold). Writes or updates
``benchmarks/results/generate_denovo_eval.json``: ``report_seconds_gpu`` (device cuda) or
``report_seconds_cpu_<steps>_steps`` (device cpu), the S.U.N. rates with both MLIPs agreeing and with CHGNet
alone, and each stage's seconds beside those of the report the file held before (``before``)::

    python benchmarks/judge.py report --generated DENOVO --shards shards/mp20p --cache CACHE --steps 500 \\
        --device cuda

On a GPU node without registry access, two calls: the first builds what is
cached once (elemental table, fingerprints and hull energies: carry them back), the second times the report::

    # 1: python -m mmmat.evaluation.elemental --device cuda --out $OUT/elemental_references.json
    #    mmmat evaluate prepare --reference SHARDS --out $OUT/cache --device cuda
    # 2: cp elemental_references.json mmmat/evaluation/data/
    #    python benchmarks/judge.py report --generated DENOVO --shards SHARDS --cache cache --skip-prepare \
    #        --steps 500 --device cuda --result $OUT/generate_denovo_eval.json

``rescore``: the stability rule re-applied to a saved report's per-sample energies above hull (no relaxation
re-run), e.g. with another lower bound ``--min-e-hull`` (default -0.2 eV/atom: deeper is counted apart, as
an MLIP artefact, not as stable); updates the S.U.N. rates of that run in the result file::

    python benchmarks/judge.py rescore --report benchmarks/results/profiles/judge_gpu_500_steps_h200_report.json.gz

``hulls``: the stability stage's hull work on a saved report's samples (no MLIP runs), timed for the
linear-programme hull the judge uses and for pymatgen's ``PhaseDiagram``, both checked against the report::

    python benchmarks/judge.py hulls --report REPORT.json.gz --generated DENOVO --shards SHARDS --cache CACHE

Numbers on mp20p are not MP-20 numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, card, command, write_result  # noqa: E402


def _crystals(n: int, seed: int = 0):
    """``n`` small crystals (rock salt, CsCl, diamond, fluorite, perovskite types), perturbed by 0.1 Å."""
    from pymatgen.core import Lattice, Structure

    protos = [
        lambda: Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.7), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]]),
        lambda: Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]]),
        lambda: Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.5), ["Si"], [[0, 0, 0]]),
        lambda: Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.5), ["Ca", "F"], [[0, 0, 0], [.25, .25, .25]]),
        lambda: Structure(Lattice.cubic(3.95), ["Sr", "Ti", "O", "O", "O"],
                          [[0, 0, 0], [.5, .5, .5], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]]),
        lambda: Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.3), ["Mg", "O"], [[0, 0, 0], [.5, .5, .5]]),
    ]
    out = []
    for i in range(n):
        s = protos[i % len(protos)]()
        s.perturb(0.1, seed=seed + i)
        s.scale_lattice(s.volume * (1.0 + 0.05 * ((i % 3) - 1)))
        out.append(s)
    return out


def relaxers(args) -> None:
    """Time ASE one-by-one, the batched loop, and torch-sim on the same crystals."""
    import torch

    from mmmat.design.oracle import _calculator
    from mmmat.evaluation.relax import batched_relax, load_potential

    if args.threads:
        torch.set_num_threads(args.threads)
    ss = _crystals(args.n)
    metrics: dict = {"n_structures": len(ss), "n_atoms": int(sum(len(s) for s in ss)), "steps": args.steps,
                     "fmax_eV_per_A": args.fmax}
    for name in args.mlips:
        from ase.filters import UnitCellFilter
        from ase.optimize import FIRE
        from pymatgen.io.ase import AseAtomsAdaptor

        if args.only_torch_sim and name != "sevennet":
            continue
        res = None
        if not args.only_torch_sim:
            pot = load_potential(name, args.device)
            pot.compute(ss[:1])  # warm-up
            t0 = time.perf_counter()
            res = batched_relax(pot, ss, steps=args.steps, fmax=args.fmax)
            metrics[f"{name}_batched_s"] = time.perf_counter() - t0
            if name == "sevennet":  # the same loop with one ASE neighbour list per structure and call
                from mmmat.evaluation.relax import SevenNetBatch

                old = SevenNetBatch(args.device, device_graphs=False)
                old.compute(ss[:1])
                t0 = time.perf_counter()
                batched_relax(old, ss, steps=args.steps, fmax=args.fmax)
                metrics["sevennet_batched_ase_graphs_s"] = time.perf_counter() - t0
                metrics.update(_graph_cost(pot, old, ss))
        calc = _calculator(name, args.device)
        t0 = time.perf_counter()
        e_ase = []
        for s in ss:
            atoms = AseAtomsAdaptor.get_atoms(s)
            atoms.calc = calc
            FIRE(UnitCellFilter(atoms), logfile=None).run(fmax=args.fmax, steps=args.steps)
            e_ase.append(atoms.get_potential_energy() / len(atoms))
        metrics[f"{name}_ase_one_by_one_s"] = time.perf_counter() - t0
        if res is not None:
            metrics[f"{name}_batched_vs_ase_max_abs_dE_eV_per_atom"] = float(
                np.nanmax(np.abs(res.energy_per_atom - np.array(e_ase)))
            )
            metrics[f"{name}_batched_calls"] = res.calls
        if name == "sevennet" and not args.no_torch_sim:
            metrics.update(_torch_sim(ss, args, np.array(e_ase)))
    name = "judge_relaxers_torch_sim" if args.only_torch_sim else "judge_relaxers"
    write_result(name, metrics, {"what": "batched FIRE relaxers vs ASE one by one (see the docstring)"},
                 out=args.result)


def _graph_cost(device_pot, ase_pot, ss, repeats: int = 20) -> dict:
    """Milliseconds per structure to build SevenNet's batch: on the device at once, or per structure with ASE."""
    from mmmat.evaluation.relax import _tensors

    out = {}
    tensors = _tensors(ss, device_pot.device)
    for key, build in (("device_batch", lambda: device_pot._device_batch(*tensors)),
                       ("ase_graphs", lambda: ase_pot._ase_batch(ss))):
        build()
        t0 = time.perf_counter()
        for _ in range(repeats):
            build()
        out[f"sevennet_graph_ms_per_structure_{key}"] = (time.perf_counter() - t0) / repeats / len(ss) * 1e3
    return out


def _torch_sim(ss, args, e_ase) -> dict:
    try:
        import torch_sim as ts
        from sevenn.util import load_checkpoint
        from torch_sim.models.sevennet import SevenNetModel  # torch-sim's own (sevenn's needs torch-sim >= 0.6)
    except ImportError as exc:
        return {"torch_sim_error": f"not importable: {exc}"}
    import torch
    from pymatgen.io.ase import AseAtomsAdaptor

    cp = load_checkpoint("7net-0")
    model = SevenNetModel(model=cp.build_model(), modal=None, device=torch.device(args.device))
    atoms = [AseAtomsAdaptor.get_atoms(s) for s in ss]
    out: dict = {}
    try:
        t0 = time.perf_counter()
        final = ts.optimize(
            system=atoms, model=model, optimizer=ts.unit_cell_fire,
            convergence_fn=ts.generate_force_convergence_fn(force_tol=args.fmax, include_cell_forces=True),
            max_steps=args.steps,
        )
        out["sevennet_torch_sim_s"] = time.perf_counter() - t0
        res = model(final)
        n_at = final.system_idx.bincount().double().cpu().numpy()
        e = res["energy"].double().cpu().numpy() / n_at
        out["sevennet_torch_sim_vs_ase_max_abs_dE_eV_per_atom"] = float(np.nanmax(np.abs(e - e_ase)))
    except Exception as exc:  # noqa: BLE001 - report the API problem instead of dying
        out["torch_sim_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def report(args) -> None:
    """Cold prepare, then the full staged report; merge into generate_denovo_eval.json."""
    from mmmat.evaluation.report import evaluate_folder, prepare_reference
    from mmmat.progress import listening

    workers = args.workers or len(os.sched_getaffinity(0))
    cache = Path(args.cache)
    t0 = time.perf_counter()
    prep: dict = {"skipped": True}
    if not args.skip_prepare:
        prep = prepare_reference(args.shards, cache, mlips=args.mlips, workers=workers, device=args.device,
                                 limit_reference=args.limit_reference)
    prepare_s = time.perf_counter() - t0
    out = Path(args.out) / f"report_{args.device}_{args.steps}.json"
    t0 = time.perf_counter()
    with listening(None, lambda msg: print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)):
        rep = evaluate_folder(args.generated, args.shards, out, relax_steps=args.steps, workers=workers,
                              device=args.device, cache_dir=cache, mlips=args.mlips, stages=args.stages,
                              limit_reference=args.limit_reference, novelty_reference=args.novelty_reference)
    wall = time.perf_counter() - t0
    m = rep["metrics"]
    path = Path(args.result) if args.result else RESULTS / "generate_denovo_eval.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    doc = old if old.get("what", "").startswith("judge") else {"before": {
        "card": old.get("card"), "command": old.get("command"),
        "stage_seconds": {s["stage"]: s["wall_s"] for s in old.get("stages", [])},
        "metrics": {k: old.get("metrics", {}).get(k) for k in ("sun_rate", "stable_rate", "n_generated")},
    }}
    key = "report_seconds_gpu" if args.device.startswith("cuda") else f"report_seconds_cpu_{args.steps}_steps"
    metrics = dict(doc.get("metrics", {}))
    metrics.update({
        key: wall,
        "n_generated": m.get("n_generated"),
        "sun_rate_two_mlip": m.get("sun_rate_two_mlip"),
        "sun_rate_one_mlip": m.get("sun_rate_one_mlip"),
        "sun_one_mlip_name": m.get("sun_one_mlip_name"),
        "mlip_disagreement_rate": m.get("mlip_disagreement_rate"),
        **{k: m.get(k) for k in ("valid", "unique_rate", "novel_rate", "cov_recall", "cov_precision")},
    })
    runs = dict(doc.get("runs", {}))
    runs[f"{args.device}_{args.steps}_steps"] = {
        "card": card(), "command": command(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "report_seconds": wall, "prepare_seconds_cold": prepare_s, "prepare": prep,
        "stage_seconds": {s["stage"]: s["wall_s"] for s in rep["stages"]},
        "cost": rep["cost"], "settings": rep["settings"],
        "metrics": {k: v for k, v in m.items() if isinstance(v, int | float | str) or v is None},
    }
    extra = {"what": "judge: full staged report of de novo samples (benchmarks/judge.py report)",
             "before": doc.get("before"), "runs": runs}
    write_result("generate_denovo_eval", metrics, extra, out=path)


def _load_report(path: str) -> dict:
    """A report JSON written by ``evaluate_folder`` (gzip-compressed when the name ends in ``.gz``)."""
    import gzip

    raw = Path(path).read_bytes()
    return json.loads(gzip.decompress(raw) if path.endswith(".gz") else raw)


def rescore(args) -> None:
    """Re-apply the stability rule to a saved report's per-sample energies above hull (no relaxation re-run).

    S.U.N. = valid, unique, novel and stable (:func:`mmmat.evaluation.generation.mlip_stable`) over all samples.
    The figures go under the report's run in the result file (``runs[<device>_<steps>_steps]["rescored"]``) and
    replace its headline metrics, the bound stated beside them.
    """
    from mmmat.evaluation.generation import mlip_stable

    rep = _load_report(args.report)
    ps, st = rep["per_sample"], rep["settings"]
    n = rep["n_generated"]
    col = {k: np.array([np.nan if v is None else float(v) for v in ps[k]], dtype=np.float64)
           for k in ps if k.startswith("e_above_hull_")}
    mlips = [m for m in st["mlips"] if f"e_above_hull_{m}" in col]
    if not mlips:
        raise SystemExit(f"{args.report}: no per-sample energies above hull of {st['mlips']}")
    flags = mlip_stable({m: col[f"e_above_hull_{m}"] for m in mlips}, st["stable_threshold_eV_per_atom"],
                        None if args.min_e_hull == float("-inf") else args.min_e_hull)
    passed = np.array([all(ps[k][i] is True for k in ("valid", "unique", "novel")) for i in range(n)])
    out = {
        "report": args.report, "min_e_hull_eV_per_atom": args.min_e_hull,
        "stable_threshold_eV_per_atom": st["stable_threshold_eV_per_atom"], "mlips": mlips,
        "sun_rate_two_mlip": float((passed & flags["all"]).sum() / n),
        "sun_rate_one_mlip": float((passed & flags["one"]).sum() / n),
        "sun_rate_two_mlip_unguarded": float((passed & flags["all_unguarded"]).sum() / n),
        "sun_rate_one_mlip_unguarded": float((passed & flags["one_unguarded"]).sum() / n),
        "n_far_below_hull": int(flags["far"].sum()),
        "n_sun_far_below_hull": int((passed & flags["all_unguarded"] & flags["far"]).sum()),
        **{f"n_far_below_hull_{m}": int(flags[f"far_{m}"].sum()) for m in mlips},
        **{f"median_e_above_hull_{m}": float(np.nanmedian(col[f"e_above_hull_{m}"])) for m in mlips},
        "sun_one_mlip_name": mlips[0],
    }
    path = Path(args.result) if args.result else RESULTS / "generate_denovo_eval.json"
    doc = json.loads(path.read_text())
    key = f"{st['device'].split(':')[0]}_{st['relax_steps']}_steps"
    if key not in doc.get("runs", {}):
        raise SystemExit(f"{path} has no run {key!r} to rescore (runs: {sorted(doc.get('runs', {}))})")
    doc["runs"][key]["rescored"] = {**out, "command": command(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    m = doc["metrics"]
    m.update({k: out[k] for k in ("sun_rate_two_mlip", "sun_rate_one_mlip", "sun_rate_two_mlip_unguarded",
                                  "sun_rate_one_mlip_unguarded", "n_far_below_hull")})
    m["sun_rule"] = (f"valid, unique, novel vs train; E_hull in [{args.min_e_hull}, "
                     f"{st['stable_threshold_eV_per_atom']}] eV/atom under each MLIP against its hull of every "
                     f"mp20p phase (*_unguarded: no lower bound); from run {key}")
    path.write_text(json.dumps(doc, indent=1))
    print(json.dumps(out, indent=1))


def hulls(args) -> None:
    """Time the stability stage's hull work per MLIP on a saved report's samples, two ways, and check both.

    For the samples that reached stability in ``--report`` (with their saved MLIP energies, so no MLIP runs):
    the known phases' energies read from the cache (``MethodHull.ensure_many``), then each sample's energy
    above hull by the linear-programme hull (``HullReference.e_above_hull``, what the judge uses) and by
    pymatgen's ``PhaseDiagram`` of its chemical system (the judge's earlier route). Both must reproduce the
    report's E_hull.
    """
    from pymatgen.analysis.phase_diagram import PDEntry

    from mmmat.data.loader import load_records, split_shards
    from mmmat.design.oracle import KnownPhases, MethodHull, MLIPMethod
    from mmmat.evaluation.generation import ReferenceSet
    from mmmat.evaluation.report import read_generated

    rep = _load_report(args.report)
    ps = rep["per_sample"]
    structures, _ = read_generated(args.generated)
    idx = [i for i, v in enumerate(ps["novel"]) if v is True]  # the stability stage's input
    cur = [structures[i] for i in idx]
    t0 = time.perf_counter()
    recs = [r for s in ("train", "val", "test") for r in load_records(split_shards(args.shards, s))]
    ref = ReferenceSet.from_records(recs)
    known = KnownPhases(ref.structures, ref.ids)
    load_s = time.perf_counter() - t0
    systems = sorted({tuple(sorted(el.symbol for el in s.composition.elements)) for s in cur})
    out: dict = {"samples": len(cur), "chemical_systems": len(systems), "known_phases": len(known),
                 "reference_load_s": load_s}
    for name in rep["settings"]["mlips"]:
        e = np.array([np.nan if ps[f"energy_per_atom_{name}"][i] is None else ps[f"energy_per_atom_{name}"][i]
                      for i in idx])
        want = np.array([np.nan if ps[f"e_above_hull_{name}"][i] is None else ps[f"e_above_hull_{name}"][i]
                         for i in idx])
        t0 = time.perf_counter()
        mh = MethodHull(MLIPMethod(name, "cpu"), known, Path(args.cache) / "hull", steps=rep["settings"]["relax_steps"],
                        fmax=rep["settings"]["fmax_eV_per_A"])
        mh.ensure_many(systems)
        hull = mh.reference()
        t1 = time.perf_counter()
        lp = np.array([hull.e_above_hull(s.composition, v) for s, v in zip(cur, e)])
        t2 = time.perf_counter()
        pd = []
        for s, v in zip(cur, e):
            diagram = hull.phase_diagram(el.symbol for el in s.composition.elements) if np.isfinite(v) else None
            if diagram is None:
                pd.append(np.nan)
                continue
            pd.append(diagram.get_e_above_hull(PDEntry(s.composition, float(v) * s.composition.num_atoms),
                                               allow_negative=True))
        t3 = time.perf_counter()
        pd = np.array(pd)
        both = np.isfinite(want)
        out[name] = {
            "known_energies_s": t1 - t0, "e_above_hull_lp_s": t2 - t1, "e_above_hull_phase_diagram_s": t3 - t2,
            "computed": mh.computed, "samples_with_hull": int(both.sum()),
            "max_abs_diff_lp_vs_report": float(np.max(np.abs(lp[both] - want[both]))) if both.any() else None,
            "max_abs_diff_phase_diagram_vs_report": float(np.max(np.abs(pd[both] - want[both]))) if both.any()
            else None,
            "nan_agree": bool(np.array_equal(np.isnan(lp), np.isnan(want))),
        }
        print(name, out[name], flush=True)
    write_result("judge_hulls", out, {"report": args.report, "generated": args.generated, "cache": args.cache},
                 out=args.result)


def main() -> None:
    """Parse arguments and run a mode."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("relaxers")
    r.add_argument("--n", type=int, default=8)
    r.add_argument("--steps", type=int, default=40)
    r.add_argument("--fmax", type=float, default=0.05)
    r.add_argument("--device", default="cpu")
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--mlips", nargs="+", default=["chgnet", "sevennet"])
    r.add_argument("--no-torch-sim", action="store_true")
    r.add_argument("--only-torch-sim", action="store_true", help="SevenNet: ASE one by one and torch-sim only")
    r.add_argument("--result", default=None, help="result file (default benchmarks/results/judge_relaxers.json)")
    p = sub.add_parser("report")
    p.add_argument("--generated", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", default="runs/judge")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--device", default="cuda")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--mlips", nargs="+", default=["chgnet", "sevennet"])
    p.add_argument("--stages", nargs="+", default=None)
    p.add_argument("--limit-reference", type=int, default=None)
    p.add_argument("--novelty-reference", default="train")
    p.add_argument("--skip-prepare", action="store_true",
                   help="no cold prepare: the report computes the hull of the touched chemical systems itself")
    p.add_argument("--result", default=None, help="result file (default benchmarks/results/generate_denovo_eval.json)")
    q = sub.add_parser("rescore", help="re-apply the stability rule to a saved report (JSON, or .json.gz)")
    q.add_argument("--report", required=True)
    q.add_argument("--min-e-hull", type=float, default=-0.2, help="eV/atom; -inf: no lower bound")
    q.add_argument("--result", default=None, help="result file (default benchmarks/results/generate_denovo_eval.json)")
    h = sub.add_parser("hulls", help="time the hull work of a saved report's stability stage (no MLIP runs)")
    h.add_argument("--report", required=True)
    h.add_argument("--generated", required=True, help="the report's sample folder")
    h.add_argument("--shards", required=True)
    h.add_argument("--cache", required=True, help="the `mmmat evaluate prepare` cache the report used")
    h.add_argument("--result", default=None, help="result file (default benchmarks/results/judge_hulls.json)")
    args = ap.parse_args()
    {"relaxers": relaxers, "report": report, "rescore": rescore, "hulls": hulls}[args.mode](args)


if __name__ == "__main__":
    main()
