"""Template consensus for CSP: re-rank the k best substitution templates by how many of them agree.

    python benchmarks/csp_rerank.py --shards /work/shards/mp20p --k 10 --n-train 3000 --workers 2

The no-learning baseline (benchmarks/csp_substitution.py) takes the single template of lowest substitution
cost. Often several of the k cheapest templates are the same structure type (they match each other once the
target's elements are substituted), while the cheapest one is an outlier. Template consensus
(:func:`mmmat.generative.templates.consensus_rank`) groups the k candidates with StructureMatcher and picks the
group of largest summed weight exp(-(cost - lowest cost) / tau), then that group's cheapest member; tau -> 0 is
the baseline, large tau a plain majority vote.

tau is chosen on the mp20p validation split (every material with a template) and then applied once to the
test materials of the benchmark (``random.Random(0).sample(sorted(test ids), 1000)``, the same as
csp_substitution.py and generate.py). Matching: StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3) against the
true structure; ``*_match_rate`` counts a prediction failing the structural or SMACT validity check as unmatched
(CDVAE / DiffCSP convention), ``*_no_validity_check`` skips that check. The oracle rate (any of the k
candidates matches) bounds what any re-ranking of these candidates can reach.

A learned re-ranker goes further: a gradient-boosting classifier (scikit-learn HistGradientBoostingClassifier)
scores each candidate from features that need no truth (substitution cost and its gap to the best, rank,
the template's e_above_hull, its consensus group's weight and size, and the CHGNet single-point energy per
atom minus the lowest among the candidates), trained to predict "matches the true structure" on
``--n-train`` training materials whose candidates come from the rest of the training split (leave-one-out).
The candidate of highest score is the prediction. CHGNet was trained on Materials Project relaxations, which
include these materials: its energies carry knowledge of MP beyond the mp20p training split.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
import warnings
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_result  # noqa: E402

from mmmat.data.loader import load_records, split_shards  # noqa: E402
from mmmat.generative.csp import (  # noqa: E402
    FEATURES,
    MATCHER,
    CSPPipeline,
    TemplateRanker,
    candidate_features,
    chgnet_energy,
)
from mmmat.generative.templates import TemplateLibrary, consensus_rank  # noqa: E402

_LIB: TemplateLibrary | None = None
_K = 10


def _one(job):
    """Candidates, their structure groups, and which of them match the truth (rmse or None)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from mmmat.evaluation.generation import validity

    warnings.simplefilter("ignore")
    truth, own_id = job
    cands = CSPPipeline(_LIB, k=_K).templates(truth, exclude=(own_id,) if own_id else ())
    if not cands:
        return {"costs": [], "groups": [], "rmse": [], "struct_valid": [], "comp_valid": None, "structures": []}
    structs = [c.structure for c in cands]
    sm = StructureMatcher(**MATCHER)
    rmse = []
    for s in structs:
        try:
            r = sm.get_rms_dist(s, truth)
        except Exception:  # noqa: BLE001 - a failed comparison is no match
            r = None
        rmse.append(None if r is None else float(r[0]))
    val = validity(structs)
    return {
        "costs": [c.cost for c in cands],
        "ids": [c.template_id for c in cands],
        "e_hull": [c.e_above_hull for c in cands],
        "n_templates": cands[0].n_templates,
        "structures": structs,
        "groups": [c.group for c in cands],
        "rmse": rmse,
        "struct_valid": [bool(v) for v in val["struct_valid"]],
        "comp_valid": bool(val["comp_valid"][0]),
    }


def collect(lib: TemplateLibrary, truths: list, k: int, workers: int, own_ids: list | None = None) -> list[dict]:
    """Per material: the candidates' costs, groups, matches and validity (own_ids: leave those out)."""
    global _LIB, _K
    _LIB, _K = lib, k
    jobs = list(zip(truths, own_ids or [None] * len(truths)))
    if workers <= 1:
        return [_one(j) for j in jobs]
    with get_context("fork").Pool(workers) as pool:
        return pool.map(_one, jobs, chunksize=8)


def _energies(structures: list) -> list[float]:
    return list(chgnet_energy("cpu", batch_size=32, threads=1)(structures))


def add_energies(rows: list[dict], workers: int, chunk: int = 500) -> None:
    """CHGNet single-point energy per atom of every candidate, in place (NaN where CHGNet fails).

    Each chunk runs in a fresh worker process: memory held by CHGNet in one process grows with the number of
    structures it has seen, and tens of thousands of them outgrow 24 GB.
    """
    flat = [s for r in rows for s in r["structures"]]
    parts = [flat[i : i + chunk] for i in range(0, len(flat), chunk)]
    with get_context("fork").Pool(max(1, workers), maxtasksperchild=1) as pool:
        e = [x for part in pool.map(_energies, parts, chunksize=1) for x in part]
    it = iter(e)
    for r in rows:
        r["energy"] = [next(it) for _ in r["structures"]]
        r.pop("structures")


def features(r: dict, tau: float = 0.5) -> np.ndarray:
    """(k, F) candidate features of one material (:func:`mmmat.generative.csp.candidate_features`)."""
    return candidate_features(r["costs"], r["groups"], r["e_hull"], r["energy"], r["n_templates"], tau)


def fit_ranker(rows: list[dict], seed: int = 0) -> TemplateRanker:
    """The library's learned re-ranker fitted on (candidate features -> matches the truth)."""
    done = [r for r in rows if r["costs"]]
    return TemplateRanker(seed).fit([features(r) for r in done], [[x is not None for x in r["rmse"]] for r in done])


def choose(r: dict, how: str, tau: float = 0.0, ranker=None) -> int:
    """Index of the chosen candidate: by consensus at ``tau``, lowest CHGNet energy, or the learned ranker."""
    if how == "consensus":
        return consensus_rank(r["costs"], r["groups"], tau)[0]
    if how == "energy":
        e = np.asarray(r["energy"], dtype=float)
        return int(np.nanargmin(e)) if np.isfinite(e).any() else 0
    return int(np.argmax(ranker.score(features(r))))


def rates(rows: list[dict], tau: float = 0.0, how: str = "consensus", ranker=None) -> dict:
    """Match rates (with and without the validity check) and RMSE of one way of choosing a candidate."""
    hit, hit_nv, rm, rm_nv = 0, 0, [], []
    for r in rows:
        if not r["costs"]:
            continue
        j = choose(r, how, tau, ranker)
        if r["rmse"][j] is not None:
            hit_nv += 1
            rm_nv.append(r["rmse"][j])
            if r["struct_valid"][j] and r["comp_valid"]:
                hit += 1
                rm.append(r["rmse"][j])
    n = len(rows)
    return {
        "match_rate": hit / n,
        "rmse": float(np.mean(rm)) if rm else math.nan,
        "match_rate_no_validity_check": hit_nv / n,
        "rmse_no_validity_check": float(np.mean(rm_nv)) if rm_nv else math.nan,
    }


def oracle(rows: list[dict]) -> float:
    """Share of materials where some candidate matches (no validity check)."""
    return sum(any(x is not None for x in r["rmse"]) for r in rows) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="/work/shards/mp20p")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--n-train", type=int, default=3000, help="training materials the re-ranker learns from")
    ap.add_argument("--taus", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
                                                              5.0, 1e9])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--result", default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    t_all = time.perf_counter()
    train = load_records(split_shards(args.shards, "train"))
    val = load_records(split_shards(args.shards, "val"))
    test = load_records(split_shards(args.shards, "test"))
    lib = TemplateLibrary.from_records(train)
    by_id = {r.material_id: r for r in test}
    ids = random.Random(args.seed).sample(sorted(by_id), min(args.n, len(by_id)))

    t0 = time.perf_counter()
    sub = random.Random(args.seed + 1).sample(range(len(train)), min(args.n_train, len(train)))
    train_rows = collect(lib, [train[i].to_structure() for i in sub], args.k, args.workers,
                         [train[i].material_id for i in sub])
    add_energies(train_rows, args.workers)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    val_rows = collect(lib, [r.to_structure() for r in val], args.k, args.workers)
    add_energies(val_rows, args.workers)
    t_val = time.perf_counter() - t0
    per_tau = {f"{t:g}": rates(val_rows, t)["match_rate_no_validity_check"] for t in args.taus}
    best = max(args.taus, key=lambda t: (per_tau[f"{t:g}"], -t))
    print("validation", per_tau, "-> tau", best, flush=True)

    t0 = time.perf_counter()
    ranker = fit_ranker(train_rows, args.seed)
    t_fit = time.perf_counter() - t0
    val_learned = rates(val_rows, how="learned", ranker=ranker)
    print("validation learned", val_learned, flush=True)

    t0 = time.perf_counter()
    rows = collect(lib, [by_id[i].to_structure() for i in ids], args.k, args.workers)
    add_energies(rows, args.workers)
    t_test = time.perf_counter() - t0
    base = rates(rows, 0.0)
    chosen = rates(rows, best)
    energy = rates(rows, how="energy")
    learned = rates(rows, how="learned", ranker=ranker)
    metrics = {
        "n_materials": len(ids),
        "n_with_template": sum(bool(r["costs"]) for r in rows),
        "k": args.k,
        "tau": best,
        "template_match_rate": base["match_rate"],
        "template_rmse": base["rmse"],
        "template_match_rate_no_validity_check": base["match_rate_no_validity_check"],
        "template_rmse_no_validity_check": base["rmse_no_validity_check"],
        "consensus_match_rate": chosen["match_rate"],
        "consensus_rmse": chosen["rmse"],
        "consensus_match_rate_no_validity_check": chosen["match_rate_no_validity_check"],
        "consensus_rmse_no_validity_check": chosen["rmse_no_validity_check"],
        "chgnet_lowest_match_rate": energy["match_rate"],
        "chgnet_lowest_match_rate_no_validity_check": energy["match_rate_no_validity_check"],
        "learned_match_rate": learned["match_rate"],
        "learned_rmse": learned["rmse"],
        "learned_match_rate_no_validity_check": learned["match_rate_no_validity_check"],
        "learned_rmse_no_validity_check": learned["rmse_no_validity_check"],
        "oracle_top_k_no_validity_check": oracle(rows),
        "train_materials": len(train_rows),
        "train_oracle_top_k_no_validity_check": oracle(train_rows),
        "val_learned_match_rate_no_validity_check": val_learned["match_rate_no_validity_check"],
        "val_chgnet_lowest_match_rate_no_validity_check": rates(val_rows, how="energy")[
            "match_rate_no_validity_check"],
        "val_materials": len(val_rows),
        "val_match_rate_no_validity_check_by_tau": per_tau,
        "val_oracle_top_k_no_validity_check": oracle(val_rows),
        "test_match_rate_no_validity_check_by_tau": {
            f"{t:g}": rates(rows, t)["match_rate_no_validity_check"] for t in args.taus
        },
        "train_rows_seconds": round(t_train, 1),
        "ranker_fit_seconds": round(t_fit, 1),
        "val_seconds": round(t_val, 1),
        "test_seconds": round(t_test, 1),
        "seconds_per_material": round(t_test / len(ids), 3),
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    write_result(
        "csp_rerank", metrics,
        {"sample": "random.Random(0).sample(sorted(mp20p test ids), 1000)", "matcher": MATCHER,
         "tau_selection": "highest validation match rate without the validity check (ties: smaller tau)",
         "ranker": {"model": "HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, max_leaf_nodes=15, "
                             "l2_regularization=1.0)", "features": FEATURES, "consensus_tau_in_features": 0.5,
                    "energies": "CHGNet 0.4 single point per candidate, CPU"},
         "workers": args.workers},
        args.result,
    )


if __name__ == "__main__":
    main()
