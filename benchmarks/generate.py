"""Generator benchmark on mp20p: CSP (generator alone, the library's CSP pipeline), conditioned sampling, de novo.

    python benchmarks/generate.py --model runs/generate_mp20p/model --shards shards/mp20p \
        --predictor runs/finetune/model --denovo-out runs/generate_mp20p/denovo \
        --result benchmarks/results/generate.json

Test materials: ``random.Random(seed).sample(sorted(mp20p test ids), n)`` (seed 0, n 1000), the same ones as
benchmarks/csp_substitution.py.  Matching: StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3), RMSE normalised
by (V/n)^(1/3); ``*_match_rate`` counts a prediction that fails the structural or SMACT validity check as
unmatched (CDVAE / DiffCSP convention), ``*_match_rate_no_validity_check`` skips the SMACT (composition) part of
that check; structurally invalid samples (atoms closer than 0.5 Å, cell under 0.1 Å³) are unmatched in both.

0. With several ``--coord-anneal`` values, the one whose flow CSP match rate (no validity check) is highest on
   ``--n-val`` random validation compositions is used for every sample below.
1. ``csp_match_rate_generator``: one sample per composition from the generator alone (no condition, no template).
2. The CSP pipeline of the library (:class:`mmmat.generative.csp.CSPPipeline`, what ``mmmat generate
   --composition`` runs): the ``--k`` best substitution templates, each refined by the generator from ``--t-start``,
   ranked by ``--rank`` (CHGNet energy, template consensus, or the learned re-ranker fitted on ``--n-ranker-train``
   training materials with leave-one-out candidates); compositions without a template get a flow sample.
   ``csp_match_rate`` is its match rate; ``template_match_rate`` the best template alone (the no-learning
   baseline); ``template_refined_match_rate`` that template refined; ``csp_match_rate_on_template_failures`` the
   pipeline's rate on the compositions whose best template fails.  Without ``--model`` the pipeline has no
   generator (templates ranked only).  A retrieval-augmented generator (``template_k > 0``) is also measured
   from noise with its templates as context (``rag_from_noise``), refining the best template with them as context
   (``rag_refined``) and without (``template_refined_no_context``).
3. XRD-conditioned CSP on the first ``--n-xrd`` of the materials: the condition is the shared-latent embedding of
   the material's computed pattern, at each guidance scale, against the unconditioned flow on the same ones.
4. Property-conditioned de novo sampling: ``--n-prop`` samples with ``--target NAME=VALUE``, against as many
   unconditioned ones; the share of valid samples whose property predicted by ``--predictor`` lies within
   ``--tolerance`` of the target.
5. De novo: ``--n-denovo`` unconditioned samples written to ``--denovo-out`` for ``mmmat evaluate``; sampling
   throughput (structures/s) is timed on this batch after a warm-up batch.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_result  # noqa: E402

from mmmat.data.loader import load_records, split_shards  # noqa: E402
from mmmat.evaluation.generation import csp_match_details, validity  # noqa: E402
from mmmat.generative.api import condition_vectors, load_generator, sample_structures, write_samples  # noqa: E402
from mmmat.generative.csp import CSPPipeline, TemplateRanker, best, chgnet_energy  # noqa: E402
from mmmat.generative.templates import TemplateLibrary  # noqa: E402


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def match_metrics(preds: list, truths: list, workers: int, prefix: str) -> tuple[dict, list]:
    """Match rate (with and without the validity check) and RMSE of predictions against true structures."""
    ok = [p for p in preds if p is not None]
    v = validity(ok) if ok else {"valid": np.zeros(0, bool), "struct_valid": np.zeros(0, bool)}
    flags, sflags = iter(v["valid"].tolist()), iter(v["struct_valid"].tolist())
    valid, svalid = [], []
    for p in preds:
        valid.append(bool(next(flags)) if p is not None else False)
        svalid.append(bool(next(sflags)) if p is not None else False)
    # structurally invalid samples (atoms < 0.5 Å apart, cell < 0.1 Å^3) count as unmatched in both rates
    rms = csp_match_details([p if s else None for p, s in zip(preds, svalid)], truths, check_validity=False,
                            workers=workers)
    hits = [r for r, v in zip(rms, valid) if r is not None and v]
    hits_nv = [r for r in rms if r is not None]
    n = max(len(preds), 1)
    return {
        f"{prefix}_match_rate": len(hits) / n,
        f"{prefix}_rmse": float(np.mean(hits)) if hits else math.nan,
        f"{prefix}_match_rate_no_validity_check": len(hits_nv) / n,
        f"{prefix}_rmse_no_validity_check": float(np.mean(hits_nv)) if hits_nv else math.nan,
    }, [r is not None and v for r, v in zip(rms, valid)]


def species_order(structs: list) -> tuple[list[int], list[int]]:
    """Atom counts and flat atomic numbers of structures, in site order."""
    return [len(s) for s in structs], [int(z) for s in structs for z in s.atomic_numbers]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="generator folder (without it: the template parts alone)")
    ap.add_argument("--shards", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--coord-anneal", type=float, nargs="+", default=[0.0],
                    help="coordinate velocity scaling (1 + a t); with several values, the one of the best flow CSP "
                         "match rate on --n-val validation compositions is used for everything else")
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--k", type=int, default=5, help="templates refined and ranked per composition")
    ap.add_argument("--t-start", type=float, default=0.8, help="flow time at which a template enters")
    ap.add_argument("--rank", default="energy", choices=["energy", "consensus", "learned"],
                    help="ranking of the pipeline's candidates: CHGNet energy, template consensus, learned re-ranker")
    ap.add_argument("--tau", type=float, default=0.0, help="consensus temperature (--rank consensus)")
    ap.add_argument("--n-ranker-train", type=int, default=3000,
                    help="training materials (leave-one-out candidates) the learned re-ranker learns from")
    ap.add_argument("--n-xrd", type=int, default=200)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--n-prop", type=int, default=500)
    ap.add_argument("--target", default="formation_energy_per_atom=-2.5")
    ap.add_argument("--tolerance", type=float, default=0.25)
    ap.add_argument("--predictor", default=None, help="fine-tuned property model folder for the target")
    ap.add_argument("--n-denovo", type=int, default=1000)
    ap.add_argument("--denovo-out", default=None)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--device", default=None)
    ap.add_argument("--skip", nargs="*", default=[], help="parts to skip: templates xrd property denovo")
    ap.add_argument("--result", default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    t_all = time.perf_counter()
    gen = load_generator(args.model, args.device) if args.model else None
    dev = gen.device if gen is not None else (args.device or "cpu")
    flow = gen.flow if gen is not None else None
    train = load_records(split_shards(args.shards, "train"))
    test = load_records(split_shards(args.shards, "test"))
    by_id = {r.material_id: r for r in test}
    ids = random.Random(args.seed).sample(sorted(by_id), min(args.n, len(by_id)))
    truths = [by_id[i].to_structure() for i in ids]
    counts, z = species_order(truths)
    metrics: dict = {"n_materials": len(ids), "n_train": len(train)}
    timing: dict = {}

    # 0. the sampler's coordinate anneal, chosen on validation compositions (never on the test ones)
    anneal = args.coord_anneal[0]
    if len(args.coord_anneal) > 1 and flow is not None:
        val = load_records(split_shards(args.shards, "val"))
        vids = random.Random(args.seed).sample(range(len(val)), min(args.n_val, len(val)))
        vtruth = [val[i].to_structure() for i in vids]
        vc, vz = species_order(vtruth)
        scores = {}
        for a in args.coord_anneal:
            preds = sample_structures(flow, vc, vz, None, seed=args.seed + 7, steps=args.steps, coord_anneal=a,
                                      batch_size=args.batch_size)
            m, _ = match_metrics(preds, vtruth, args.workers, "v")
            scores[a] = m["v_match_rate_no_validity_check"]
        anneal = max(scores, key=lambda a: (scores[a], -a))
        metrics["coord_anneal_val_match_rate"] = {f"{a:g}": v for a, v in scores.items()}
        metrics["n_val_materials"] = len(vids)
        print("coord anneal on validation:", scores, "->", anneal, flush=True)
    metrics["coord_anneal"] = anneal
    sample_kw = {"steps": args.steps, "coord_anneal": anneal, "batch_size": args.batch_size}

    # 1. the generator alone
    flow_preds: list = [None] * len(ids)
    flow_hit = [False] * len(ids)
    if flow is not None:
        _sync(dev)
        t0 = time.perf_counter()
        flow_preds = sample_structures(flow, counts, z, None, seed=args.seed, **sample_kw)
        _sync(dev)
        timing["csp_flow_sampling_s"] = time.perf_counter() - t0
        m, flow_hit = match_metrics(flow_preds, truths, args.workers, "csp_flow")
        metrics.update(m)
        metrics["csp_match_rate_generator"] = m["csp_flow_match_rate"]
        print({k: v for k, v in metrics.items() if "flow" in k}, flush=True)

    # 2. the CSP pipeline of the library (mmmat.generative.csp): templates, refinements, ranking
    if "templates" not in args.skip:
        t0 = time.perf_counter()
        lib = TemplateLibrary.from_records(train)
        energy = chgnet_energy(dev, threads=1 if dev == "cpu" else None) if args.rank in ("energy", "learned") else None
        pipe = CSPPipeline(lib, flow, k=args.k, t_start=args.t_start, steps=args.steps, coord_anneal=anneal,
                           energy=energy, tau=args.tau, batch_size=args.batch_size, workers=args.workers)
        cands = pipe.predict(truths, "pipeline", seed=args.seed + 1, ranked=False)
        timing["pipeline_candidates_s"] = time.perf_counter() - t0
        has = [any(c.source == "template" for c in p) for p in cands]
        metrics["n_with_template"] = int(sum(has))

        def pick(source: str, fallback: list) -> list:
            return [next((c.structure for c in p if c.source == source and c.rank == 0), fallback[i])
                    for i, p in enumerate(cands)]

        m, top1_hit = match_metrics(pick("template", [None] * len(ids)), truths, args.workers, "template")
        metrics.update(m)
        if flow is not None:
            m, _ = match_metrics(pick("refined", flow_preds), truths, args.workers, "template_refined")
            metrics.update(m)
        # the same candidates under the rankings that need no training (consensus at --tau, energy when computed)
        t0 = time.perf_counter()
        pipe.add_energies([c for p in cands for c in p])
        timing["pipeline_energies_s"] = time.perf_counter() - t0
        for label, ranker_energy in (("consensus", None), ("energy", pipe.energy)):
            if label == "energy" and ranker_energy is None:
                continue
            alt = CSPPipeline(lib, flow, k=args.k, energy=ranker_energy, tau=args.tau)
            m, _ = match_metrics(best([alt.rank(p) for p in cands]), truths, args.workers, f"pipeline_{label}")
            metrics.update(m)
        if args.rank == "learned":
            t0 = time.perf_counter()
            sub = random.Random(args.seed + 1).sample(range(len(train)), min(args.n_ranker_train, len(train)))
            tr_truth = [train[i].to_structure() for i in sub]
            tr = pipe.predict(tr_truth, "pipeline", seed=args.seed + 9, exclude=[(train[i].material_id,) for i in sub],
                              ranked=False)
            tr = [(p, t) for p, t in zip(tr, tr_truth) if p and p[0].source != "flow"]
            pipe.add_energies([c for p, _ in tr for c in p])
            rms = csp_match_details([c.structure for p, _ in tr for c in p], [t for p, t in tr for _ in p],
                                    check_validity=False, workers=args.workers)
            it = iter(rms)
            labels = [[next(it) is not None for _ in p] for p, _ in tr]
            pipe.ranker = TemplateRanker(args.seed).fit([pipe.features(p) for p, _ in tr], labels)
            timing["ranker_fit_s"] = time.perf_counter() - t0
            metrics["ranker_train_materials"] = len(tr)
        t0 = time.perf_counter()
        ranked = [pipe.rank(p) for p in cands]
        timing["pipeline_rank_s"] = time.perf_counter() - t0
        m, pipe_hit = match_metrics(best(ranked), truths, args.workers, "pipeline")
        metrics.update(m)
        metrics["csp_match_rate"] = m["pipeline_match_rate"]
        metrics["csp_rmse"] = m["pipeline_rmse"]
        metrics["csp_match_rate_no_validity_check"] = m["pipeline_match_rate_no_validity_check"]
        metrics["pipeline_chosen_source"] = {
            src: sum(bool(p) and p[0].source == src for p in ranked) for src in ("template", "refined", "flow")}
        fails = [i for i in range(len(ids)) if has[i] and not top1_hit[i]]
        no_tpl = [i for i in range(len(ids)) if not has[i]]
        metrics["n_best_template_fails"] = len(fails)
        metrics["csp_match_rate_on_template_failures"] = float(np.mean([pipe_hit[i] for i in fails])) if fails \
            else math.nan
        metrics["csp_match_rate_without_template"] = float(np.mean([pipe_hit[i] for i in no_tpl])) if no_tpl \
            else math.nan
        if flow is not None:
            metrics["generator_rate_on_template_failures"] = float(np.mean([flow_hit[i] for i in fails])) \
                if fails else math.nan
        # retrieval-augmented generation against plain template refinement
        if flow is not None and flow.template_k:
            ctx = [[c.structure for c in p if c.source == "template"] for p in cands]
            rag = sample_structures(flow, counts, z, None, seed=args.seed + 10, context=ctx, **sample_kw)
            m, _ = match_metrics(rag, truths, args.workers, "rag_from_noise")
            metrics.update(m)
            top = pick("template", [None] * len(ids))
            rows = [i for i in range(len(ids)) if top[i] is not None]
            starts = [top[i].get_reduced_structure() for i in rows]
            rc, rz = species_order(starts)
            kw = dict(sample_kw, steps=max(1, round(args.steps * (1 - args.t_start))))
            for label, context in (("rag_refined", [ctx[i] for i in rows]), ("template_refined_no_context", None)):
                out = sample_structures(flow, rc, rz, None, seed=args.seed + 11, start=starts, t_start=args.t_start,
                                        context=context, **kw)
                full = list(flow_preds)
                for i, s in zip(rows, out):
                    full[i] = s
                m, _ = match_metrics(full, truths, args.workers, label)
                metrics.update(m)
        print({k: v for k, v in metrics.items() if "template" in k or "pipeline" in k or "csp" in k}, flush=True)

    # 3. XRD-conditioned CSP
    if ("xrd" not in args.skip and gen is not None and gen.condition_model is not None
            and "xrd" in gen.condition_modalities):
        sub = list(range(min(args.n_xrd, len(ids))))
        prof = np.stack([by_id[ids[i]].xrd for i in sub]).astype(np.float32)
        emb = gen.condition_model.embed("xrd", prof).float()
        cond = condition_vectors(gen, len(sub), emb)
        sc, sz = species_order([truths[i] for i in sub])
        m, _ = match_metrics(
            [flow_preds[i] for i in sub], [truths[i] for i in sub], args.workers, "xrd_uncond"
        )
        metrics.update(m)
        for g in args.guidance:
            preds = sample_structures(flow, sc, sz, cond, seed=args.seed + 2, guidance=g, **sample_kw)
            m, _ = match_metrics(preds, [truths[i] for i in sub], args.workers, f"xrd_cond_g{g:g}")
            metrics.update(m)
        metrics["n_xrd_queries"] = len(sub)
        print({k: v for k, v in metrics.items() if k.startswith("xrd")}, flush=True)

    # 4. property-conditioned de novo
    if "property" not in args.skip and args.predictor and flow is not None and flow.properties:
        from mmmat.data.schema import as_records
        from mmmat.heads.property import PropertyModel

        name, value = args.target.split("=")
        value = float(value)
        pm = PropertyModel.from_pretrained(args.predictor).to(dev).eval()
        g = torch.Generator().manual_seed(args.seed + 3)
        pc = flow.sample_atom_counts(args.n_prop, generator=g).tolist()
        out = {}
        for label, cond in (
            ("uncond", None),
            ("cond", condition_vectors(gen, args.n_prop, None, {name: value})),
        ):
            structs = sample_structures(flow, pc, None, cond, seed=args.seed + 4, **sample_kw)
            ok = [s for s in structs if s is not None]
            val = validity(ok)["valid"] if ok else np.zeros(0, bool)
            good = [s for s, v in zip(ok, val) if v]
            pred = pm.predict_records(as_records(good))[name] if good else np.zeros(0)
            pred = np.asarray(pred, dtype=float)
            within = float(np.mean(np.abs(pred - value) <= args.tolerance)) if len(pred) else math.nan
            out[label] = {
                "n_valid": len(good),
                "share_within": within,
                "pred_mean": float(np.mean(pred)) if len(pred) else math.nan,
            }
            metrics[f"property_{label}_share_within_tolerance"] = within
            metrics[f"property_{label}_n_valid"] = len(good)
            metrics[f"property_{label}_pred_mean"] = out[label]["pred_mean"]
        metrics["property_target"] = f"{name}={value}"
        metrics["property_tolerance"] = args.tolerance
        print(out, flush=True)

    # 5. de novo samples and throughput
    if "denovo" not in args.skip and flow is not None:
        g = torch.Generator().manual_seed(args.seed + 5)
        dc = flow.sample_atom_counts(args.n_denovo, generator=g).tolist()
        sample_structures(flow, dc[: min(len(dc), 256)], None, None, seed=99, **sample_kw)  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        structs = sample_structures(flow, dc, None, None, seed=args.seed + 6, **sample_kw)
        _sync(dev)
        wall = time.perf_counter() - t0
        metrics["structures_per_s"] = args.n_denovo / wall
        metrics["denovo_sampling_s"] = wall
        if args.denovo_out:
            info = {
                "mode": "de_novo",
                "model": args.model,
                "seed": args.seed + 6,
                "steps": args.steps,
                "guidance": 1.0,
                "coord_anneal": anneal,
                "composition": None,
                "condition": {},
                "generation": {
                    "wall_s": wall,
                    "gpu_s": wall if dev.startswith("cuda") else 0.0,
                    "device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
                    "structures_per_s": args.n_denovo / wall,
                },
            }
            write_samples(structs, args.denovo_out, info)
    metrics.update({f"time_{k}": v for k, v in timing.items()})
    metrics["wall_s"] = time.perf_counter() - t_all
    extra = {
        "sample": f"random.Random({args.seed}).sample(sorted(mp20p test ids), {args.n})",
        "matcher": {"stol": 0.5, "angle_tol": 10, "ltol": 0.3},
        "sampling": {
            "steps": args.steps,
            "coord_anneal": anneal,
            "k": args.k,
            "rank": args.rank,
            "t_start": args.t_start,
            "guidance": args.guidance,
            "batch_size": args.batch_size,
        },
        "model": args.model,
        "note": "mp20p split: comparable to published MP-20 numbers only as a trend",
    }
    write_result("generate", metrics, extra, args.result)


if __name__ == "__main__":
    main()
