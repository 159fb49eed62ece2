"""What each pretraining objective adds: the same fine-tuning budget from four starting points.

    python benchmarks/pretrain_ablation.py --shards shards/mp20p --seconds 300 --phase pretrain
    python benchmarks/pretrain_ablation.py --shards shards/mp20p --phase finetune --jobs 3
    python benchmarks/pretrain_ablation.py --phase summary --result benchmarks/results/pretrain_ablation.json

Variants (each pretrained for the same wall time, ``--seconds``, on one GPU with configs/pretrain/mp20p.yaml,
every one with the plain step: the captured step, ``engine.cuda_graphs``, does not take structural objectives,
and a faster step for some variants would give them more samples in the same time):

    scratch           no pretraining (the fine-tuning config's encoder, randomly initialised)
    contrastive       the contrastive objective alone
    denoise           contrastive + coordinate denoising
    denoise_masked    contrastive + coordinate denoising + masked atoms
    denoise_masked_spread  the same + feature_spread on the crystal encoder's output (against the collapse
                      that benchmarks/feature_probe.py measures)
    structural_only   coordinate denoising + masked atoms, every contrastive pair weighted 0: only the crystal
                      encoder's graph branch runs, so it sees more crystals in the same time

Fine-tuning (benchmarks/finetune.py, fixed step counts): formation energy and band gap, all labels (seed 0) and
1,000 labels (seeds ``--seeds``: each seed draws its own 1,000 materials and initialisation); the pretrained
variants also get a frozen-encoder probe with all labels. Every fine-tuning run is its own process with its own
result file (``--jobs`` of them side by side on the GPU), and ``--finetune-variants``, ``--targets`` and
``--labels`` pick a part of the table, so the phases run over several calls (sessions of a GPU job) and on
several GPUs; each writes into ``--workdir`` and skips what is already there. ``summary`` writes
``pretrain_ablation.json``: per variant the test MAEs, ``pretrain_gain_1k`` (scratch MAE − fine-tuned MAE,
over scratch MAE, formation energy, 1,000 labels, mean over seeds) with its standard deviation, and each
pretraining's cross-modal retrieval (from benchmarks/pretrain.py); the headline keys take the best variant.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: the same step for every variant (see above)
PLAIN_ENGINE = "{precompute_patterns: true, sync_free: true, fused_adamw: true, compile: false, cuda_graphs: false}"
_DM = "--model.init_args.objectives={denoise: {weight: 1.0}, masked_atoms: {weight: 0.5}}"
#: variant -> its train.py arguments
VARIANTS: dict[str, list[str]] = {
    "contrastive": [],
    "denoise": ["--model.init_args.objectives={denoise: {weight: 1.0}}"],
    "denoise_masked": [_DM],
    "denoise_masked_spread": [_DM, "--model.init_args.feature_spread={weight: 1.0}"],
    # the structural objectives without the contrastive loss (every pair weighted 0): does the contrastive loss
    # cost the fine-tuning? The step then runs the crystal graph branch alone (ContrastivePretraining's
    # structural step), so this variant sees several times more crystals in the same time; before that step
    # existed the other encoders still ran (pretrain_ablation.json's structural_only row: 1,929 steps in 200 s)
    "structural_only": [_DM, "--model.init_args.loss_weights={xrd: 0.0, image: 0.0, processing_text: 0.0, "
                             "literature_text: 0.0}"],
}
TARGETS = ("formation_energy_per_atom", "band_gap")


def _run(cmd: list[str], dry: bool) -> None:
    print("$", " ".join(cmd), flush=True)
    if not dry:
        subprocess.run(cmd, check=True, cwd=ROOT)


def pretrain(args: argparse.Namespace) -> None:
    """Pretrain every variant for ``--seconds`` (skipped when its model exists), then its retrieval figures.

    With ``--queries`` (a query cache built beside the training by ``benchmarks/pretrain.py --build-queries``)
    the evaluation runs after training as its own step that waits for the cache.
    """
    for name in args.variants:
        work = Path(args.workdir) / name
        result = str(work / "pretrain.json")
        evaluate = [sys.executable, "benchmarks/pretrain.py", "--shards", args.shards, "--workdir", str(work),
                    "--eval-only", "--result", result, "--queries", str(args.queries), "--wait-queries", "600"]
        if args.measured:
            evaluate += ["--measured", args.measured]
        if (work / "model" / "model.safetensors").exists():
            evaluated = (work / "pretrain.json").exists() and "R@1" in (work / "pretrain.json").read_text()
            if args.queries and not evaluated and not args.no_eval:
                _run(evaluate, args.dry_run)
            continue
        cmd = [sys.executable, "benchmarks/pretrain.py", "--shards", args.shards, "--config", args.config,
               "--seconds", str(args.seconds), "--workdir", str(work), "--result", result]
        if args.queries or args.no_eval:
            cmd.append("--no-eval")
        elif args.measured:
            cmd += ["--measured", args.measured]
        cmd.append("--")  # train.py arguments follow
        cmd += VARIANTS[name]
        cmd += [f"--model.init_args.engine={PLAIN_ENGINE}", *args.pretrain_override]
        _run(cmd, args.dry_run)
        if args.queries and not args.no_eval:
            _run(evaluate, args.dry_run)


def finetune_runs(args: argparse.Namespace) -> list[tuple[str, int, str, str, str]]:
    """Every fine-tuning run of the ablation still to do: (variant, seed, target, setting, labels).

    Per target: 1,000 labels for every seed, all labels for the first seed, and for pretrained variants a
    frozen-encoder probe with all labels (first seed). A run is done when its result file exists.
    """
    runs = []
    for name in args.finetune_variants:
        for seed in args.seeds:
            for target in args.targets:
                for labels in args.labels:
                    if labels == "all" and seed != args.seeds[0]:
                        continue
                    settings = ["scratch"] if name == "scratch" else ["finetuned"]
                    if name != "scratch" and labels == "all" and args.probe:
                        settings.append("frozen")
                    for setting in settings:
                        if not run_file(Path(args.workdir), name, seed, target, setting, labels).exists():
                            runs.append((name, seed, target, setting, labels))
    return runs


def run_file(workdir: Path, name: str, seed: int, target: str, setting: str, labels: str) -> Path:
    """The result file of one fine-tuning run."""
    return workdir / name / "runs" / f"{target}_{setting}_{labels}_seed{seed}.json"


def finetune(args: argparse.Namespace) -> None:
    """Fine-tune from every variant (and scratch) with the same budget, ``--jobs`` runs side by side.

    Each run is one ``benchmarks/finetune.py`` process with its own result file, so a call that stops early
    keeps what finished and the next call does the rest.
    """
    from concurrent.futures import ThreadPoolExecutor

    work = Path(args.workdir)

    def command(run: tuple[str, int, str, str, str]) -> list[str]:
        name, seed, target, setting, labels = run
        pre = [] if name == "scratch" else ["--pretrained", str(work / name / "model")]
        tag = f"{target}_{setting}_{labels}_seed{seed}"
        return [sys.executable, "benchmarks/finetune.py", "--shards", args.shards, *pre, "--targets", target,
                "--settings", setting, "--labels", labels, "--seconds", "0", "--max-steps", str(args.steps),
                "--max-steps-small", str(args.steps_1k), "--workdir", str(work / name / "ft" / tag),
                "--result", str(run_file(work, *run)),
                "--override", f"--seed_everything={seed}", f"--model.init_args.subset_seed={seed}",
                f"--model.init_args.seed={seed}", *args.finetune_override,
                *([] if name == "scratch" else args.pretrained_override)]

    cmds = [command(r) for r in finetune_runs(args)]
    if args.dry_run:
        for c in cmds:
            print("$", " ".join(c), flush=True)
        return

    def one(cmd: list[str]) -> int:
        log = Path(cmd[cmd.index("--result") + 1]).with_suffix(".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        print("$", " ".join(cmd), flush=True)
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode
        print(f"{'done' if rc == 0 else f'FAILED (exit {rc}, log {log})'}: {log.stem}", flush=True)
        return rc

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        failed = sum(rc != 0 for rc in pool.map(one, cmds))
    if failed:
        raise SystemExit(f"{failed} of {len(cmds)} fine-tuning runs failed (logs beside their result files)")


def summarise(workdir: Path, variants: list[str], seeds: list[int]) -> tuple[dict, dict]:
    """The ablation table from the result files of the two phases; (metrics, per-variant details)."""
    def mae(name: str, seed: int, target: str, setting: str, labels: str) -> float | None:
        run = None
        one = run_file(workdir, name, seed, target, setting, labels)
        for p in (one, workdir / name / f"finetune_seed{seed}.json"):
            if p.exists():
                run = json.loads(p.read_text())["metrics"].get(target, {}).get(setting, {}).get(labels)
                if run is not None:
                    break
        return None if run is None else float(run["test_mae"])

    details: dict = {}
    for target in TARGETS:
        scratch_1k = [m for s in seeds if (m := mae("scratch", s, target, "scratch", "1000")) is not None]
        details.setdefault("scratch", {})[target] = {
            "mae_all": mae("scratch", seeds[0], target, "scratch", "all"),
            "mae_1k_mean": statistics.fmean(scratch_1k) if scratch_1k else None,
            "mae_1k_std": statistics.stdev(scratch_1k) if len(scratch_1k) > 1 else None,
        }
        for name in variants:
            ft_1k = {s: m for s in seeds if (m := mae(name, s, target, "finetuned", "1000")) is not None}
            sc = {s: m for s in seeds if (m := mae("scratch", s, target, "scratch", "1000")) is not None}
            gains = [(sc[s] - ft_1k[s]) / sc[s] for s in ft_1k if s in sc]
            d = details.setdefault(name, {})
            d[target] = {
                "mae_all": mae(name, seeds[0], target, "finetuned", "all"),
                "frozen_probe_mae_all": mae(name, seeds[0], target, "frozen", "all"),
                "mae_1k_mean": statistics.fmean(ft_1k.values()) if ft_1k else None,
                "mae_1k_std": statistics.stdev(ft_1k.values()) if len(ft_1k) > 1 else None,
                "gain_1k_mean": statistics.fmean(gains) if gains else None,
                "gain_1k_std": statistics.stdev(gains) if len(gains) > 1 else None,
                "seeds": sorted(ft_1k),
            }
            first = run_file(workdir, name, seeds[0], target, "finetuned", "1000")
            if first.exists():
                d[target]["finetune_command"] = json.loads(first.read_text()).get("command")
            p = workdir / name / "pretrain.json"
            if p.exists() and target == TARGETS[0]:
                m = json.loads(p.read_text())["metrics"]
                d["retrieval"] = {k: v for k, v in m.items() if "R@" in k or "median_rank" in k or "queries" in k
                                  or "top10" in k}
                pre = json.loads(p.read_text())
                d["pretraining"] = {"card": pre.get("card"), "command": pre.get("train_command", pre.get("command")),
                                    **{k: m.get(k) for k in ("train_wall_seconds", "steps", "samples_seen",
                                                             "crystals_per_s")}}
    fe = "formation_energy_per_atom"
    scored = [n for n in variants if details.get(n, {}).get(fe, {}).get("gain_1k_mean") is not None]
    metrics: dict = {}
    if scored:
        best = max(scored, key=lambda n: details[n][fe]["gain_1k_mean"])
        metrics = {
            "best_variant": best,
            "pretrain_gain_1k": details[best][fe]["gain_1k_mean"],
            "pretrain_gain_1k_std": details[best][fe]["gain_1k_std"],
            "formation_energy_mae_finetuned_all": details[best][fe]["mae_all"],
            "band_gap_mae_finetuned_all": details[best]["band_gap"]["mae_all"],
            "frozen_probe_mae": details[best][fe]["frozen_probe_mae_all"],
            "formation_energy_mae_scratch_all": details["scratch"][fe]["mae_all"],
            "band_gap_mae_scratch_all": details["scratch"]["band_gap"]["mae_all"],
        }
    return metrics, details


def main() -> None:
    """Run one phase."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["pretrain", "finetune", "summary"], required=True)
    ap.add_argument("--shards", default="shards/mp20p")
    ap.add_argument("--config", default="configs/pretrain/mp20p.yaml")
    ap.add_argument("--measured", default=None, help="measured IUCr profiles for the pretraining benchmark")
    ap.add_argument("--queries", default=None, help="query cache of the retrieval figures (see pretrain())")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seconds", type=float, default=300.0, help="pretraining wall time per variant")
    ap.add_argument("--steps", type=int, default=4000, help="fine-tuning steps with all labels")
    ap.add_argument("--steps-1k", type=int, default=2000, help="fine-tuning steps with 1,000 labels")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="fine-tuning runs side by side on the GPU")
    ap.add_argument("--finetune-variants", nargs="+", default=["scratch", *VARIANTS],
                    choices=["scratch", *VARIANTS], help="starting points fine-tuned by this call")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--labels", nargs="+", default=["1000", "all"], choices=["1000", "all"])
    ap.add_argument("--no-probe", dest="probe", action="store_false", help="skip the frozen-encoder probes")
    ap.add_argument("--finetune-override", type=shlex.split, default=[],
                    help="more train.py arguments for fine-tuning, one string: --finetune-override='--a=1 --b=2'")
    ap.add_argument("--pretrained-override", type=shlex.split, default=[],
                    help="more train.py arguments for fine-tuning from a pretrained variant only, one string: "
                         "--pretrained-override='--model.init_args.layer_decay=0.8 "
                         "--model.init_args.head_warmup_steps=200'")
    ap.add_argument("--pretrain-override", type=shlex.split, default=[],
                    help="more train.py arguments for pretraining, one string (as --finetune-override). The "
                         "override strings are split like a shell line: quote an argument that holds spaces "
                         "inside the string, --pretrain-override='\"--model.init_args.objectives={denoise: "
                         "{weight: 1.0}}\"'")
    ap.add_argument("--no-eval", action="store_true", help="pretrain only; a later pretrain call evaluates")
    ap.add_argument("--workdir", default="runs/pretrain_ablation")
    ap.add_argument("--result", default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--setup", default=None, help="summary: how the runs were placed on the hardware (recorded)")
    args = ap.parse_args()
    if args.phase == "pretrain":
        pretrain(args)
    elif args.phase == "finetune":
        finetune(args)
    else:
        metrics, details = summarise(Path(args.workdir), args.variants, args.seeds)
        write_result("pretrain_ablation", metrics,
                     {"variants": details, "seconds_per_pretraining": args.seconds, "seeds": args.seeds,
                      "setup": args.setup,
                      "units": {"formation_energy_per_atom": "eV/atom", "band_gap": "eV"}}, out=args.result)


if __name__ == "__main__":
    main()
