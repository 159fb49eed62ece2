"""Does relaxing the CSP candidates with an MLIP rank them better than a single-point energy?

    python benchmarks/csp_relax_rank.py --shards shards/mp20p --first 40 --n 200 --k 10 --steps 100

On mp20p validation compositions (``random.Random(0).sample(range(len(val)), 300)[first:first + n]``, never the
test split) the ``--k`` cheapest substitution templates of each composition
(:class:`mmmat.generative.csp.CSPPipeline`, templates only) are scored four ways against the true structure:

* ``template``: the cheapest template (the no-learning baseline);
* ``energy_single_point``: the candidate of lowest single-point MLIP energy per atom (what ``--rank energy`` does);
* ``relaxed_rank``: every candidate relaxed (batched FIRE, cell included, ``--steps`` steps, fmax 0.1 eV/Å), the
  one of lowest relaxed energy per atom, output unrelaxed (``relaxed_rank``) or relaxed (``relaxed_rank_relaxed``);
* ``oracle`` / ``oracle_relaxed``: any candidate matches (the bound of every ranking of these candidates).

Matching: StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3), without the SMACT check (``*_no_validity_check``
in generate.json's terms).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--potential", default="chgnet")
    ap.add_argument("--device", default=None)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--result", default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    from mmmat.data.loader import load_records, split_shards
    from mmmat.evaluation.generation import csp_match_details
    from mmmat.evaluation.relax import batched_relax, load_potential, single_points
    from mmmat.generative.csp import CSPPipeline
    from mmmat.generative.templates import TemplateLibrary

    t_all = time.perf_counter()
    train = load_records(split_shards(args.shards, "train"))
    val = load_records(split_shards(args.shards, "val"))
    rows = random.Random(0).sample(range(len(val)), min(300, len(val)))[args.first:args.first + args.n]
    truths = [val[i].to_structure() for i in rows]
    pipe = CSPPipeline(TemplateLibrary.from_records(train), None, k=args.k, workers=args.workers)
    cands = pipe.predict(truths, "pipeline", ranked=False)
    flat = [c.structure for p in cands for c in p]
    owner = [i for i, p in enumerate(cands) for _ in p]

    def rate(preds: list) -> float:
        rms = csp_match_details(preds, truths, check_validity=False, workers=args.workers)
        return float(np.mean([r is not None for r in rms]))

    def oracle(structures: list) -> float:
        rms = csp_match_details(structures, [truths[i] for i in owner], check_validity=False, workers=args.workers)
        hit = np.zeros(len(truths), dtype=bool)
        for i, r in zip(owner, rms):
            hit[i] |= r is not None
        return float(hit.mean())

    pot = load_potential(args.potential, args.device)
    t0 = time.perf_counter()
    single = single_points(pot, flat)
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    relaxed = batched_relax(pot, flat, steps=args.steps, fmax=0.1)
    t_relax = time.perf_counter() - t0

    def lowest(energy: np.ndarray, structures: list) -> list:
        out, at = [], 0
        for p in cands:
            e = np.where(np.isfinite(energy[at:at + len(p)]), energy[at:at + len(p)], np.inf)
            out.append(structures[at + int(np.argmin(e))] if len(p) else None)
            at += len(p)
        return out

    metrics = {
        "n_materials": len(truths), "k": args.k, "relax_steps": args.steps, "potential": args.potential,
        "n_candidates": len(flat),
        "template_match_rate_no_validity_check": rate([min(p, key=lambda c: c.rank).structure if p else None
                                                       for p in cands]),
        "energy_single_point_match_rate_no_validity_check": rate(lowest(single, flat)),
        "relaxed_rank_match_rate_no_validity_check": rate(lowest(relaxed.energy_per_atom, flat)),
        "relaxed_rank_relaxed_match_rate_no_validity_check": rate(lowest(relaxed.energy_per_atom, relaxed.structures)),
        "oracle_no_validity_check": oracle(flat),
        "oracle_relaxed_no_validity_check": oracle(relaxed.structures),
        "relaxed_converged": float(np.mean(relaxed.converged)),
        "single_point_s": round(t_single, 1), "relax_s": round(t_relax, 1),
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    write_result("csp_relax_rank", metrics, {"split": "val", "materials": [val[i].material_id for i in rows]},
                 out=args.result)


if __name__ == "__main__":
    main()
