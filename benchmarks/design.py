"""Closed-loop design vs baselines at an equal oracle budget, three seeds.

Arms (same screen: validity, charge balance, dedup, novelty; same oracle; same hit definition):
- loop: configs/design/<task>.yaml as written (templates + mutations [+ generator], surrogate, acquisition, learning);
- template_random: template enumeration (substitution into mp20p train crystals) with random selection;
- generator_random: unconditioned generation with random selection (only with --generator).

A hit: E_hull <= 0.05 eV/atom by CHGNet and by SevenNet-0 (each vs the hull of every mp20p phase computed with
that MLIP), the two within guards.method_tolerance, novel against every mp20p phase, unique among the arm's hits,
band gap 1.5-2.5 eV by the surrogate (an MLP ensemble on composition/density features trained on the mp20p train
split), plus the reward-hacking guards. Numbers on mp20p are not MP-20 numbers.

    python benchmarks/design.py --data ../shared/data/mp_20 --budget 24 --per-round 8 --steps 30
    # a GPU machine (16 cores): --budget 2000 --per-round 100 --steps 200 --workers 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import card, write_result  # noqa: E402

NOTES = (
    "mp20p (not MP-20). MLIPs relax with FIRE (positions + cell) for at most oracle_steps steps; "
    "MLIPs not in relax_methods take single points of the relaxed cell (and of relaxed elemental "
    "prototypes); known phases are single points of their DFT structures. Band gap judged by the "
    "surrogate (MLP ensemble on composition + density features, mp20p train split), which the loop "
    "also selects with: its gap advantage is not verified by the oracle. Every arm's surrogate learns "
    "from the oracle's labels each round (e_hull: mean of the MLIPs, bounded to [guards.min_e_hull, 1] "
    "eV/atom). hits_ratio_vs_best_baseline is null when no baseline found a hit."
)


def arm_config(base: dict, arm: str, args, seed: int, out: Path, generator: str | None) -> dict:
    cfg = json.loads(json.dumps(base))
    cfg.update(seed=seed, budget=args.budget, rounds=math.ceil(args.budget / args.per_round) + 2,
               out=str(out / f"{arm}_seed{seed}"), name=f"{cfg['name']}_{arm}_seed{seed}")
    cfg["data"]["root"] = args.data
    cfg["select"]["per_round"] = args.per_round
    if args.methods:
        cfg["oracle"]["methods"] = args.methods
    cfg["oracle"].update(steps=args.steps, workers=args.workers, device=args.device, relax_methods=args.relax_methods,
                         cache=str(Path(args.cache) / "hull"), batch=args.oracle_batch)
    cfg["propose"]["templates"] = args.templates
    cfg["propose"]["mutations"] = args.mutations
    cfg["surrogate"]["epochs"] = args.epochs
    if generator:
        cfg["propose"]["generator"] = {"path": generator, "n": args.generator_n, "targets": {"band_gap": 2.0},
                                       "guidance": 2.0, "steps": 50, "reweight": 0.5}
    if arm == "template_random":
        cfg["propose"].update(mutations=0, generator={})
        cfg["select"]["strategy"] = "random"
    elif arm == "generator_random":
        cfg["propose"].update(templates=0, mutations=0)
        cfg["propose"]["generator"] = {"path": generator, "n": args.generator_n, "targets": {}, "guidance": 0.0,
                                       "steps": 50}
        cfg["select"]["strategy"] = "random"
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mp_20"))
    ap.add_argument("--task", default="stable_gap", help="configs/design/<task>.yaml")
    ap.add_argument("--budget", type=int, default=24, help="oracle calls per arm and seed")
    ap.add_argument("--per-round", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=30, help="most FIRE steps per relaxation")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=None,
                    help="MLIPs of the oracle (default: the config's, CHGNet and SevenNet-0)")
    ap.add_argument("--relax-methods", nargs="+", default=None,
                    help="MLIPs that relax (default: both); the others take single points of the relaxed cell")
    ap.add_argument("--device", default=None)
    ap.add_argument("--oracle-batch", type=int, default=None,
                    help="structures per oracle call (default: the oracle's choice; 0: a whole round)")
    ap.add_argument("--templates", type=int, default=200, help="template proposals per round")
    ap.add_argument("--mutations", type=int, default=60, help="mutations per round (loop only)")
    ap.add_argument("--epochs", type=int, default=30, help="surrogate training epochs")
    ap.add_argument("--generator", default=None, help="generator folder: adds the generator_random arm")
    ap.add_argument("--arms", nargs="+", default=None,
                    help="run only these arms (several processes can share one --out; --from-ledgers joins them)")
    ap.add_argument("--generator-n", type=int, default=200)
    ap.add_argument("--out", default="runs/bench_design", help="run folders (an existing one is resumed)")
    ap.add_argument("--cache", default="runs/bench_design_cache", help="parsed mp20p structures, MLIP hull energies")
    ap.add_argument("--result", default=None)
    ap.add_argument("--card", default=None,
                    help="with --from-ledgers: the machine the ledgers were written on (default: this one)")
    ap.add_argument("--setup", default=None, help="with --from-ledgers: how the runs were launched (free text)")
    ap.add_argument("--from-ledgers", action="store_true",
                    help="run nothing: summarise the run folders under --out from their ledgers (judged rounds only; "
                         "unfinished runs are marked partial)")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from mmmat.design import run
    from mmmat.design.config import load_config
    from mmmat.design.loop import load_reference
    from mmmat.design.surrogate import crystal_features

    if args.from_ledgers:
        _from_ledgers(args)
        return
    root = Path(__file__).resolve().parents[1]
    base = yaml.safe_load((root / "configs" / "design" / f"{args.task}.yaml").read_text())
    base["data"]["root"] = args.data
    base["data"]["cache"] = str(Path(args.cache) / "structures")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ref = load_reference(load_config(base).data)
    ref["train_features"] = crystal_features([s for s, _, _ in ref["train"]])
    t_ref = time.perf_counter() - t0
    arms = ["loop", "template_random"] + (["generator_random"] if args.generator else [])
    if args.arms:
        unknown = sorted(set(args.arms) - set(arms))
        if unknown:
            raise SystemExit(f"unknown or unavailable arms {unknown} (available: {arms})")
        arms = [a for a in arms if a in args.arms]
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for seed in args.seeds:
        for arm in arms:
            cfg = arm_config(base, arm, args, seed, out, args.generator)
            folder = Path(cfg["out"])
            resume = (folder / "ledger.sqlite").exists()
            t = time.perf_counter()
            doc = run(cfg, resume=resume, reference=ref)
            wall = time.perf_counter() - t
            calls = doc["rounds"][-1]["cumulative_oracle_calls"] if doc["rounds"] else 0
            hits = len(doc["hits"])
            sec: dict[str, float] = {}
            for r in doc["rounds"]:
                for k, v in r["seconds"].items():
                    sec[k] = sec.get(k, 0.0) + v
            runs[arm].append({
                "seed": seed, "oracle_calls": calls, "hits": hits,
                "hits_per_1000_calls": 1000.0 * hits / calls if calls else 0.0,
                "unique_compositions": doc["rounds"][-1]["unique_compositions"] if doc["rounds"] else 0,
                "wall_s": wall, "seconds": sec, "rounds": len(doc["rounds"]),
                "seconds_per_round": {k: v / max(1, len(doc["rounds"])) for k, v in sec.items()},
                "oracle_structures_per_s": doc["oracle"].get("structures_per_s"),
                "guards": {k: sum(r["guards"].get(k, 0) for r in doc["rounds"]) for k in doc["rounds"][0]["guards"]}
                if doc["rounds"] else {},
                "surrogate_mae_per_round": [r["surrogate_mae"] for r in doc["rounds"]],
                "ood_share_per_round": [r["ood_share"] for r in doc["rounds"]],
            })
            print(f"{arm} seed {seed}: {hits} hits / {calls} calls in {wall:.0f} s", flush=True)
        _write(args, runs, t_ref, out)


def _write(args, runs: dict, t_ref: float, out: Path) -> None:
    """Write the result for the seeds finished so far (rewritten after every seed)."""
    done = [a for a, v in runs.items() if v]
    mean = {a: float(np.mean([r["hits_per_1000_calls"] for r in runs[a]])) for a in done}
    base_best = max((v for a, v in mean.items() if a != "loop"), default=0.0)
    sps = [r["oracle_structures_per_s"] for v in runs.values() for r in v if r["oracle_structures_per_s"]]
    metrics = {
        "hits_per_1000_calls": mean.get("loop"),
        "hits_per_1000_calls_best_baseline": base_best,
        "hits_ratio_vs_best_baseline": mean["loop"] / base_best if base_best > 0 and "loop" in mean else None,
        "hits_per_1000_calls_by_arm": mean,
        "oracle_calls_per_arm_and_seed": args.budget,
        "seeds_done": sorted({r["seed"] for v in runs.values() for r in v}),
        "reference_load_s": t_ref,
        "oracle_structures_per_s": float(np.mean(sps)) if sps else None,
        "oracle_steps": args.steps,
        "methods": args.methods or ["chgnet", "sevennet"],
        "relax_methods": args.relax_methods or args.methods or ["chgnet", "sevennet"],
    }
    _plot(out, args.task)
    write_result("design", metrics, {
        "task": args.task,
        "runs": runs,
        "notes": NOTES,
    }, out=args.result)


def _from_ledgers(args) -> None:
    """Result from the ledgers of the run folders under ``--out`` (what a stopped benchmark got done)."""
    import sqlite3

    out = Path(args.out)
    runs: dict[str, list[dict]] = {}
    for db in sorted(out.glob("*_seed*/ledger.sqlite")):
        arm, seed = db.parent.name.rsplit("_seed", 1)
        con = sqlite3.connect(db)
        done = [r[0] for r in con.execute("SELECT round FROM rounds WHERE phase = 'done'")]
        stats = [json.loads(r[0]) for r in con.execute("SELECT stats FROM rounds WHERE phase = 'done' ORDER BY round")]
        calls = sum(s["oracle_calls"] for s in stats)
        hits = con.execute("SELECT COUNT(*) FROM candidates WHERE is_hit = 1").fetchone()[0]
        verified = con.execute("SELECT COUNT(*) FROM candidates WHERE status = 'verified'").fetchone()[0]
        osec = [json.loads(r[0]).get("seconds") for r in con.execute(
            "SELECT oracle FROM candidates WHERE status = 'verified'")]
        con.close()
        sec: dict[str, float] = {}
        for s in stats:
            for k, v in s["seconds"].items():
                sec[k] = sec.get(k, 0.0) + v
        runs.setdefault(arm, []).append({
            "seed": int(seed), "oracle_calls": calls, "hits": hits, "verified_including_unjudged": verified,
            "hits_per_1000_calls": 1000.0 * hits / calls if calls else None, "rounds_done": len(done),
            "partial": calls < args.budget, "seconds": sec,
            "seconds_per_round": {k: v / max(1, len(stats)) for k, v in sec.items()},
            "oracle_seconds_per_structure_mean": float(np.mean([s for s in osec if s])) if osec else None,
            "guards": {k: sum(s["guards"].get(k, 0) for s in stats) for k in (stats[0]["guards"] if stats else {})},
            "surrogate_mae_per_round": [s["surrogate_mae"] for s in stats],
            "ood_share_per_round": [s["ood_share"] for s in stats],
            "unique_compositions": stats[-1]["unique_compositions"] if stats else 0,
        })
    mean = {a: float(np.mean([r["hits_per_1000_calls"] for r in v if r["hits_per_1000_calls"] is not None]))
            for a, v in runs.items() if any(r["hits_per_1000_calls"] is not None for r in v)}
    base_best = max((v for a, v in mean.items() if a != "loop"), default=0.0)
    metrics = {
        "hits_per_1000_calls": mean.get("loop"),
        "hits_per_1000_calls_best_baseline": base_best,
        "hits_ratio_vs_best_baseline": mean["loop"] / base_best if base_best > 0 and "loop" in mean else None,
        "hits_per_1000_calls_by_arm": mean,
        "oracle_calls_per_arm_and_seed_planned": args.budget,
        "oracle_calls_by_arm": {a: sum(r["oracle_calls"] for r in v) for a, v in runs.items()},
        "seeds_done": sorted({r["seed"] for v in runs.values() for r in v if not r["partial"]}),
        # true while any run has fewer oracle calls than planned: the figures above are then interim
        "partial": any(r["partial"] for v in runs.values() for r in v),
        "oracle_seconds_per_structure": float(np.mean([r["oracle_seconds_per_structure_mean"] for v in runs.values()
                                                       for r in v if r["oracle_seconds_per_structure_mean"]])),
        "oracle_steps": args.steps,
        "methods": args.methods or ["chgnet", "sevennet"],
    }
    _plot(out, args.task)
    extra = {"task": args.task, "runs": runs, "summarised_from_ledgers": str(out), "notes": NOTES}
    if args.card:
        extra.update(card=args.card, summarised_on=card())
    if args.setup:
        extra["setup"] = args.setup
    write_result("design", metrics, extra, out=args.result)


def _plot(out: Path, task: str) -> None:
    import sqlite3

    from mmmat.design.report import plot_hits_vs_calls

    curves = {}
    for db in sorted(out.glob("*_seed*/ledger.sqlite")):
        con = sqlite3.connect(db)
        rows = con.execute("SELECT is_hit FROM candidates WHERE status = 'verified' "
                           "ORDER BY round, pick_order").fetchall()
        con.close()
        pts, n = [(0, 0)], 0
        for k, (h,) in enumerate(rows, 1):
            n += h
            pts.append((k, n))
        curves[db.parent.name] = pts
    plot_hits_vs_calls(curves, out / "hits_vs_calls.png", f"{task}: hits vs oracle calls")


if __name__ == "__main__":
    main()
