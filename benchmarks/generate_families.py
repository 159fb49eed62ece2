"""Generator families compared at equal training time: flow_gnn (all-pairs message passing) against transformer.

Modes train and eval, each callable several times (a call fits a time limit; later calls resume where earlier
ones ended), and join:

    # train every family for the same training-time budget (seconds summed over calls), at most --call-seconds
    # of wall time per call; an unfinished family resumes from its checkpoint in the next call
    python benchmarks/generate_families.py train --workdir runs/families --seconds 240 --call-seconds 520 \
        --config configs/generate/mp20p.yaml -- --data.shards=shards/mp20p \
        --model.init_args.pretrained=runs/pretrain_mp20p/model --data.tokenizer=runs/pretrain_mp20p/model/tokenizer

    # evaluate every trained family the same way
    python benchmarks/generate_families.py eval --workdir runs/families --shards shards/mp20p \
        --result benchmarks/results/generate_families.json

    # or one family per GPU side by side (eval --families F --result part_F.json each), then join the parts
    python benchmarks/generate_families.py join part_flow_gnn.json part_transformer.json --merge

Training: each family runs ``train.py fit`` with the given config, ``model.init_args.family`` set (and the
family's overrides: configs/generate/transformer.yaml for the transformer unless ``--transformer-args``
says otherwise), a :class:`~mmmat.tasks.callbacks.TimeBudget`
of ``--seconds`` training seconds (its cosine schedule fitted to the budget, carried across calls in the
checkpoint) and a :class:`~mmmat.tasks.callbacks.StopAfter` that ends the sitting at an epoch end when the
call's time is spent; the next call resumes with ``--ckpt_path``. The learning curves of every sitting are
joined into ``<workdir>/<family>/learning_curve.csv``; ``<workdir>/<family>/status.json`` says whether the
family's budget is spent.

Evaluation (the same for every family, ``--families`` to do one per call): ``--n`` de novo samples (atom
counts from the training histogram, unconditioned), sampling throughput (structures/s end to end with pymatgen
structures, and the model's integration alone, after a warm-up batch), the staged evaluation of
:func:`mmmat.evaluation.report.evaluate_folder` (validity, uniqueness, novelty, coverage, stability, as
``--stages`` says) and, with ``--n-csp``, the CSP match rate of the generator alone on that many test
compositions (the ones of benchmarks/generate.py and benchmarks/csp_substitution.py, one sample each, validity
check included). ``--merge`` adds the figures to generate.json (``csp_match_rate_generator``: the best family,
unless the generator of benchmarks/generate.py matched more) and generate_denovo_eval.json (``families``) in the
results folder, leaving their other keys alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, card, command, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("flow_gnn", "transformer")
#: Family-specific train.py overrides used unless --<family>-args says otherwise.
DEFAULT_FAMILY_ARGS = {
    "flow_gnn": [],
    "transformer": ["--config", str(ROOT / "configs" / "generate" / "transformer.yaml")],
}
#: Wall seconds of a call kept free for start-up (imports, data, model) of one training sitting.
SITTING_OVERHEAD_S = 60.0


def _status(workdir: Path, family: str) -> dict[str, Any]:
    p = workdir / family / "status.json"
    return json.loads(p.read_text()) if p.exists() else {"done": False, "sittings": 0}


def join_curves(run: Path) -> Path:
    """Join the CSV learning curves of every sitting (``version_*/metrics.csv``) into ``learning_curve.csv``."""
    rows: dict[tuple[int, str], dict[str, str]] = {}
    fields: list[str] = []
    versions = sorted(run.glob("generate/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    for f in versions:
        with f.open() as fh:
            reader = csv.DictReader(fh)
            for name in reader.fieldnames or []:
                if name not in fields:
                    fields.append(name)
            for r in reader:  # a later sitting overwrites the rows of a step logged twice
                kind = "val" if any(k.startswith("val/") and v for k, v in r.items()) else "train"
                rows[(int(r.get("step") or 0), kind)] = r
    out = run / "learning_curve.csv"
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for key in sorted(rows):
            w.writerow(rows[key])
    return out


def train_family(family: str, args: argparse.Namespace, sitting_s: float) -> dict[str, Any]:
    """One sitting of one family: train until its budget or the sitting's time is spent; returns its status."""
    import train
    from mmmat.tasks.callbacks import StopAfter, TimeBudget

    run = Path(args.workdir) / family
    run.mkdir(parents=True, exist_ok=True)
    ckpt = run / "sitting.ckpt"
    status = _status(Path(args.workdir), family)
    fam_args = getattr(args, f"{family}_args")
    fam_args = DEFAULT_FAMILY_ARGS[family] if fam_args is None else fam_args.split()
    overlay = run / "overlay.yaml"
    overlay.write_text(json.dumps({
        "trainer": {
            "default_root_dir": str(run),
            "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                       "init_args": {"save_dir": str(run), "name": "generate"}},
            "callbacks": [
                {"class_path": "mmmat.tasks.callbacks.TimeBudget",
                 "init_args": {"seconds": args.seconds, "calibrate_steps": args.calibrate_steps}},
                {"class_path": "mmmat.tasks.callbacks.StopAfter",
                 "init_args": {"seconds": max(0.0, sitting_s), "checkpoint": str(ckpt)}},
                {"class_path": "mmmat.tasks.callbacks.Throughput"},
            ],
        },
        "model": {"init_args": {"family": family, "save_dir": str(run / "model")}},
    }))
    argv = ["fit", "--config", args.config, "--config", str(overlay), *fam_args, *args.train_args]
    if ckpt.exists():
        argv.append(f"--ckpt_path={ckpt}")
    t0 = time.perf_counter()
    cli = train.main(argv)
    trainer = cli.trainer
    budget = next(c for c in trainer.callbacks if isinstance(c, TimeBudget))
    stop = next(c for c in trainer.callbacks if isinstance(c, StopAfter))
    max_steps = trainer.fit_loop.epoch_loop.max_steps
    max_epochs = trainer.max_epochs
    done = (
        not stop.stopped_early
        or budget.elapsed() >= args.seconds
        or (max_steps is not None and 0 < max_steps <= trainer.global_step)
        or (max_epochs is not None and 0 < max_epochs <= trainer.current_epoch)
    )
    status = {
        "family": family,
        "done": bool(done),
        "sittings": int(status.get("sittings", 0)) + 1,
        "global_step": int(trainer.global_step),
        "planned_steps": budget.planned_steps,
        "train_seconds": budget.elapsed(),
        "budget_seconds": args.seconds,
        "last_sitting_wall_s": time.perf_counter() - t0,
        "params": sum(p.numel() for p in cli.model.flow.parameters()),
        "train_args": fam_args + list(args.train_args),
        "config": args.config,
    }
    (run / "status.json").write_text(json.dumps(status, indent=1))
    join_curves(run)
    return status


def cmd_train(args: argparse.Namespace) -> None:
    """Train every family for the same budget, resuming unfinished ones; stop before the call's time is up."""
    t_call = time.perf_counter()
    for family in args.families:
        if _status(Path(args.workdir), family)["done"]:
            print(f"{family}: budget already spent", flush=True)
            continue
        left = args.call_seconds - (time.perf_counter() - t_call) - SITTING_OVERHEAD_S
        if args.sitting is not None:
            left = min(left, args.sitting)
        if left < 0:
            print(f"{family}: no time left in this call; run it again to continue", flush=True)
            continue
        st = train_family(family, args, left)
        print(json.dumps(st), flush=True)


# ---------------------------------------------------------------------- evaluation
def _sync(dev: str) -> None:
    if str(dev).startswith("cuda"):
        torch.cuda.synchronize()


def _throughput(flow: Any, counts: list[int], args: argparse.Namespace, dev: str) -> tuple[list, dict]:
    """De novo samples and their throughput (structures/s), end to end and for the model's integration alone."""
    from mmmat.generative.api import sample_structures

    kw = {"steps": args.steps, "batch_size": args.batch_size}
    sample_structures(flow, counts[: min(len(counts), 256)], None, None, seed=99, **kw)  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    structs = sample_structures(flow, counts, None, None, seed=args.seed, **kw)
    _sync(dev)
    wall = time.perf_counter() - t0
    g = torch.Generator(device=flow.y_mean.device).manual_seed(args.seed)
    ct = torch.as_tensor(counts)
    _sync(dev)
    t0 = time.perf_counter()
    for lo in range(0, len(counts), args.batch_size):
        flow.sample(ct[lo : lo + args.batch_size], steps=args.steps, generator=g)
    _sync(dev)
    model_wall = time.perf_counter() - t0
    return structs, {
        "structures_per_s": len(counts) / wall,
        "sampling_wall_s": wall,
        "model_structures_per_s": len(counts) / model_wall,
        "n_samples": len(counts),
        "sampling_steps": args.steps,
    }


def _csp(flow: Any, args: argparse.Namespace) -> dict[str, Any]:
    """CSP match rate of the generator alone on ``--n-csp`` test compositions (one sample each)."""
    from generate import match_metrics, species_order

    from mmmat.data.loader import load_records, split_shards
    from mmmat.generative.api import sample_structures

    test = load_records(split_shards(args.shards, "test"))
    by_id = {r.material_id: r for r in test}
    ids = random.Random(args.csp_seed).sample(sorted(by_id), min(args.n_csp, len(by_id)))
    truths = [by_id[i].to_structure() for i in ids]
    counts, z = species_order(truths)
    preds = sample_structures(flow, counts, z, None, seed=args.csp_seed, steps=args.steps, batch_size=args.batch_size)
    m, _ = match_metrics(preds, truths, args.workers, "csp")
    m["n_csp_materials"] = len(ids)
    return m


def eval_family(family: str, args: argparse.Namespace) -> dict[str, Any]:
    """Sample, time and evaluate one trained family."""
    from mmmat.evaluation.report import evaluate_folder
    from mmmat.generative.api import load_generator, write_samples

    run = Path(args.workdir) / family
    if not (run / "model" / "config.json").exists():
        raise SystemExit(f"{run / 'model'}: no trained {family} generator; run the train mode first")
    status = _status(Path(args.workdir), family)
    gen = load_generator(run / "model", args.device)
    flow, dev = gen.flow, gen.device
    g = torch.Generator().manual_seed(args.seed + 5)
    counts = flow.sample_atom_counts(args.n, generator=g).tolist()
    structs, metrics = _throughput(flow, counts, args, dev)
    info = {"mode": "de_novo", "model": str(run / "model"), "seed": args.seed, "steps": args.steps,
            "guidance": 1.0, "composition": None, "condition": {},
            "generation": {"wall_s": metrics["sampling_wall_s"],
                           "gpu_s": metrics["sampling_wall_s"] if str(dev).startswith("cuda") else 0.0,
                           "device": torch.cuda.get_device_name() if str(dev).startswith("cuda") else "cpu",
                           "structures_per_s": metrics["structures_per_s"]}}
    out = write_samples(structs, run / "denovo", info)
    kwargs: dict[str, Any] = {"workers": args.workers, "relax_steps": args.relax_steps, "device": args.device}
    if args.stages:
        kwargs["stages"] = args.stages
    if args.cache_dir:
        kwargs["cache_dir"] = args.cache_dir
    if args.hull:
        kwargs["hull"] = args.hull
    kwargs.update(json.loads(args.eval_kwargs or "{}"))
    t0 = time.perf_counter()
    report = evaluate_folder(out, args.shards, run / "denovo_eval" / "report.json", **kwargs)
    metrics["staged_eval_wall_s"] = time.perf_counter() - t0
    metrics.update({k: v for k, v in report["metrics"].items() if isinstance(v, (int, float))})
    if args.n_csp:
        metrics.update(_csp(flow, args))
    metrics.update({
        "train_seconds": status.get("train_seconds"),
        "train_steps": status.get("global_step"),
        "train_budget_done": status.get("done"),
        "train_sittings": status.get("sittings"),
        "params": sum(p.numel() for p in flow.parameters()),
    })
    curve = run / "learning_curve.csv"
    if curve.exists() and args.curves_dir:
        dest = Path(args.curves_dir) / f"generate_families_{family}_train_metrics.csv"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(curve.read_text())
    return metrics


def _merge(path: Path, metrics: dict[str, Any], note: str) -> None:
    """Add ``metrics`` to the metrics of a results file (created if absent), leaving its other keys alone."""
    doc = json.loads(path.read_text()) if path.exists() else {
        "card": card(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command(), "metrics": {}}
    doc.setdefault("metrics", {}).update(metrics)
    doc["families_note"] = note
    path.write_text(json.dumps(doc, indent=1))


def _best(metrics: dict[str, Any]) -> dict[str, float]:
    """Each family's CSP match rate, where measured (``best_family_by_csp_match_rate`` is set from it)."""
    scored = {f: metrics[f].get("csp_match_rate", math.nan) for f in FAMILIES if f in metrics}
    scored = {f: v for f, v in scored.items() if isinstance(v, float) and not math.isnan(v)}
    if scored:
        metrics["best_family_by_csp_match_rate"] = max(scored, key=scored.get)
    return scored


def _merge_results(res_dir: Path, metrics: dict[str, Any], scored: dict[str, float], note: str) -> None:
    """Add the family figures to generate.json and generate_denovo_eval.json in ``res_dir``."""
    gen_keys: dict[str, Any] = {}
    for f in FAMILIES:
        if f in metrics and "csp_match_rate" in metrics[f]:
            gen_keys[f"csp_match_rate_generator_{f}"] = metrics[f]["csp_match_rate"]
    if scored:
        best = metrics["best_family_by_csp_match_rate"]
        gen_keys["csp_match_rate_generator"] = scored[best]
        gen_keys["csp_match_rate_generator_family"] = best
        # the best learned generator alone: benchmarks/generate.py's generator (csp_flow_match_rate, same test
        # compositions, one sample each) stays the figure when it matches more
        prev = json.loads((res_dir / "generate.json").read_text()).get("metrics", {}) \
            if (res_dir / "generate.json").exists() else {}
        flow = prev.get("csp_flow_match_rate")
        if isinstance(flow, float) and flow > scored[best]:
            gen_keys["csp_match_rate_generator"] = flow
            gen_keys["csp_match_rate_generator_family"] = "flow_gnn (benchmarks/generate.py: csp_flow_match_rate)"
    if gen_keys:
        _merge(res_dir / "generate.json", gen_keys, note)
    keep = ("valid", "struct_valid", "comp_valid", "unique_rate", "novel_rate", "cov_recall", "cov_precision",
            "stable_rate", "sun_rate", "structures_per_s", "model_structures_per_s", "train_seconds",
            "train_steps", "staged_eval_wall_s")
    fams = {f: {k: metrics[f][k] for k in keep if k in metrics[f]} for f in FAMILIES if f in metrics}
    _merge(res_dir / "generate_denovo_eval.json", {"families": fams}, note)


NOTE = ("mp20p split: comparable to published MP-20 numbers only as a trend; both families trained with the same "
        "config, data and training-time budget (train_seconds)")


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate each family; merge into the result file (earlier calls' families are kept)."""
    result = Path(args.result) if args.result else RESULTS / "generate_families.json"
    prev = json.loads(result.read_text())["metrics"] if result.exists() else {}
    metrics = {k: v for k, v in prev.items() if k in FAMILIES}
    for family in args.families:
        metrics[family] = eval_family(family, args)
        print(family, json.dumps(metrics[family], indent=1), flush=True)
    scored = _best(metrics)
    extra = {
        "settings": {"n": args.n, "n_csp": args.n_csp, "steps": args.steps, "stages": args.stages,
                     "relax_steps": args.relax_steps, "workdir": args.workdir},
        "note": NOTE,
    }
    write_result("generate_families", metrics, extra, result)
    if args.merge:
        _merge_results(result.parent, metrics, scored,
                       f"family figures from benchmarks/generate_families.py ({command()})")


def cmd_join(args: argparse.Namespace) -> None:
    """Join result files of single families (evaluated side by side, one per GPU) into one, keeping each part's
    card, date and command (``parts``); the joined file's card, date and command are the first part's."""
    docs = [json.loads(Path(p).read_text()) for p in args.parts]
    metrics: dict[str, Any] = {}
    parts = []
    for p, d in zip(args.parts, docs):
        fams = [f for f in FAMILIES if f in d.get("metrics", {})]
        if not fams:
            raise SystemExit(f"{p}: no family figures (keys {', '.join(FAMILIES)}) in its metrics")
        for f in fams:
            metrics[f] = d["metrics"][f]
        parts.append({"file": Path(p).name, "families": fams, "card": d.get("card"), "date": d.get("date"),
                      "command": d.get("command")})
    scored = _best(metrics)
    result = Path(args.result) if args.result else RESULTS / "generate_families.json"
    doc = {"card": docs[0].get("card"), "date": docs[0].get("date"),
           "command": " ; ".join(p["command"] or "" for p in parts), "metrics": metrics,
           "settings": docs[0].get("settings"), "note": NOTE, "parts": parts, "joined_by": command()}
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(doc, indent=1))
    if args.merge:
        _merge_results(result.parent, metrics, scored, f"family figures from benchmarks/generate_families.py "
                       f"({doc['command']})")


def main(argv: list[str] | None = None) -> None:
    """Parse the mode and run it."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    tr = sub.add_parser("train", help="train the families (resumable, several calls)")
    tr.add_argument("--workdir", required=True)
    tr.add_argument("--config", default="configs/generate/mp20p.yaml")
    tr.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    tr.add_argument("--seconds", type=float, required=True, help="training seconds per family (all calls)")
    tr.add_argument("--call-seconds", type=float, default=520.0, help="wall seconds this call may use")
    tr.add_argument("--sitting", type=float, default=None, help="at most this many training seconds per sitting")
    tr.add_argument("--calibrate-steps", type=int, default=200)
    tr.add_argument("--flow_gnn-args", dest="flow_gnn_args", default=None, help="train.py overrides, one string")
    tr.add_argument("--transformer-args", dest="transformer_args", default=None,
                    help="train.py overrides, one string (default: --config configs/generate/transformer.yaml)")
    tr.add_argument("train_args", nargs="*", help="after --: train.py overrides for every family")
    ev = sub.add_parser("eval", help="evaluate the trained families the same way")
    ev.add_argument("--workdir", required=True)
    ev.add_argument("--shards", required=True)
    ev.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ev.add_argument("--n", type=int, default=1000, help="de novo samples per family")
    ev.add_argument("--n-csp", type=int, default=1000, help="test compositions for the CSP match rate (0: none)")
    ev.add_argument("--csp-seed", type=int, default=0)
    ev.add_argument("--seed", type=int, default=6)
    ev.add_argument("--steps", type=int, default=100)
    ev.add_argument("--batch-size", type=int, default=1000)
    ev.add_argument("--stages", nargs="*", default=None, help="stages of the staged evaluation (default: all)")
    ev.add_argument("--relax-steps", type=int, default=500)
    ev.add_argument("--hull", default=None)
    ev.add_argument("--cache-dir", default=None)
    ev.add_argument("--eval-kwargs", default=None, help="JSON of more evaluate_folder keyword arguments")
    ev.add_argument("--workers", type=int, default=8)
    ev.add_argument("--device", default=None)
    ev.add_argument("--curves-dir", default=None, help="copy each family's learning curve (CSV) here")
    ev.add_argument("--merge", action="store_true", help="add the figures to generate.json and "
                    "generate_denovo_eval.json beside --result")
    ev.add_argument("--result", default=None)
    jn = sub.add_parser("join", help="join result files of single families evaluated side by side")
    jn.add_argument("parts", nargs="+", help="result files written by eval --result")
    jn.add_argument("--merge", action="store_true", help="add the figures to generate.json and "
                    "generate_denovo_eval.json beside --result")
    jn.add_argument("--result", default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    np.seterr(all="ignore")
    {"train": cmd_train, "eval": cmd_eval, "join": cmd_join}[args.mode](args)


if __name__ == "__main__":
    main()
