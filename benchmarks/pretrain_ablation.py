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

Fine-tuning (benchmarks/finetune.py, fixed step counts): formation energy and band gap, all labels (seed 0) and
1,000 labels (seeds ``--seeds``: each seed draws its own 1,000 materials and initialisation); the pretrained
variants also get a frozen-encoder probe with all labels. The phases run over several calls (sessions of a
GPU job); each writes into ``--workdir`` and skips what is already there. ``summary`` writes
``pretrain_ablation.json``: per variant the test MAEs, ``pretrain_gain_1k`` (scratch MAE − fine-tuned MAE,
over scratch MAE, formation energy, 1,000 labels, mean over seeds) with its standard deviation, and each
pretraining's cross-modal retrieval (from benchmarks/pretrain.py); the headline keys take the best variant.
"""

from __future__ import annotations

import argparse
import json
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
VARIANTS = {
    "contrastive": None,
    "denoise": "{denoise: {weight: 1.0}}",
    "denoise_masked": "{denoise: {weight: 1.0}, masked_atoms: {weight: 0.5}}",
}
TARGETS = ("formation_energy_per_atom", "band_gap")


def _run(cmd: list[str], dry: bool) -> None:
    print("$", " ".join(cmd), flush=True)
    if not dry:
        subprocess.run(cmd, check=True, cwd=ROOT)


def pretrain(args: argparse.Namespace) -> None:
    """Pretrain every variant for ``--seconds`` (skipped when its model exists)."""
    for name in args.variants:
        work = Path(args.workdir) / name
        if (work / "model" / "model.safetensors").exists():
            continue
        cmd = [sys.executable, "benchmarks/pretrain.py", "--shards", args.shards, "--config", args.config,
               "--seconds", str(args.seconds), "--workdir", str(work), "--result", str(work / "pretrain.json")]
        if args.measured:
            cmd += ["--measured", args.measured]
        if VARIANTS[name]:
            cmd.append(f"--model.init_args.objectives={VARIANTS[name]}")
        cmd.append(f"--model.init_args.engine={PLAIN_ENGINE}")
        _run(cmd, args.dry_run)


def finetune(args: argparse.Namespace) -> None:
    """Fine-tune from every variant (and scratch) with the same budget; one result file per (variant, seed)."""
    for name in ["scratch", *args.variants]:
        for seed in args.seeds:
            out = Path(args.workdir) / name / f"finetune_seed{seed}.json"
            if out.exists():
                continue
            labels = ["all", "1000"] if seed == args.seeds[0] else ["1000"]
            if name == "scratch":
                settings, pre = ["scratch"], []
            else:
                settings = ["finetuned", "frozen"] if seed == args.seeds[0] else ["finetuned"]
                pre = ["--pretrained", str(Path(args.workdir) / name / "model")]
            cmd = [sys.executable, "benchmarks/finetune.py", "--shards", args.shards, *pre, "--settings", *settings,
                   "--labels", *labels, "--seconds", "0", "--max-steps", str(args.steps),
                   "--max-steps-small", str(args.steps_1k), "--jobs", str(args.jobs),
                   "--workdir", str(Path(args.workdir) / name / f"ft_seed{seed}"), "--result", str(out),
                   "--override", f"--seed_everything={seed}", f"--model.init_args.subset_seed={seed}",
                   f"--model.init_args.seed={seed}", *args.finetune_override]
            _run(cmd, args.dry_run)


def summarise(workdir: Path, variants: list[str], seeds: list[int]) -> tuple[dict, dict]:
    """The ablation table from the result files of the two phases; (metrics, per-variant details)."""
    def mae(name: str, seed: int, target: str, setting: str, labels: str) -> float | None:
        p = workdir / name / f"finetune_seed{seed}.json"
        if not p.exists():
            return None
        run = json.loads(p.read_text())["metrics"].get(target, {}).get(setting, {}).get(labels)
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
            p = workdir / name / "pretrain.json"
            if p.exists() and target == TARGETS[0]:
                m = json.loads(p.read_text())["metrics"]
                d["retrieval"] = {k: v for k, v in m.items() if "R@" in k or "median_rank" in k or "queries" in k}
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
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seconds", type=float, default=300.0, help="pretraining wall time per variant")
    ap.add_argument("--steps", type=int, default=4000, help="fine-tuning steps with all labels")
    ap.add_argument("--steps-1k", type=int, default=2000, help="fine-tuning steps with 1,000 labels")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="fine-tuning runs side by side on the GPU")
    ap.add_argument("--finetune-override", nargs="*", default=[], help="more train.py arguments for fine-tuning")
    ap.add_argument("--workdir", default="runs/pretrain_ablation")
    ap.add_argument("--result", default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args()
    if args.phase == "pretrain":
        pretrain(args)
    elif args.phase == "finetune":
        finetune(args)
    else:
        metrics, details = summarise(Path(args.workdir), args.variants, args.seeds)
        write_result("pretrain_ablation", metrics,
                     {"variants": details, "seconds_per_pretraining": args.seconds, "seeds": args.seeds,
                      "units": {"formation_energy_per_atom": "eV/atom", "band_gap": "eV"}}, out=args.result)


if __name__ == "__main__":
    main()
