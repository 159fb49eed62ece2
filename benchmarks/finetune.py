"""Property fine-tuning on mp20p: from scratch, frozen (linear probe) and fine-tuned, all labels and 1,000.

    python benchmarks/finetune.py --pretrained runs/pretrain_mp20p/model --shards shards/mp20p \
        --seconds 100 --result benchmarks/results/finetune.json

For every target (formation energy per atom, band gap), setting and label count, one run of train.py's
LightningCLI with the target's config (configs/finetune/mp20p_formation.yaml, mp20p_band_gap.yaml):

    scratch    the config's encoder, randomly initialised, everything trains
    frozen     the pretrained crystal encoder frozen, heads trained (mode linear_probe)
    partial    the pretrained encoder's last ``--unfreeze-last`` blocks and readout train (not run by default)
    finetuned  the pretrained encoder and heads train (mode full, encoder lr = encoder_lr_ratio x lr)

``--labels all 1000``: all train labels, or the first 1,000 of a permutation of the labelled train materials
by seed 0 (``model.max_train_labels``; the composition baseline uses the same materials). Each run stops at
``--seconds`` (the TimeBudget callback fits the cosine schedule to it) or at ``--max-steps``; the checkpoint
with the best validation score (mean MAE / train std) is scored on the test split (7,342). Decoded records are
kept in memory across runs, so the shards are read once. With --baselines, the composition-model figures of
benchmarks/results/finetune_baselines.json are copied beside the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "formation_energy_per_atom": str(ROOT / "configs" / "finetune" / "mp20p_formation.yaml"),
    "band_gap": str(ROOT / "configs" / "finetune" / "mp20p_band_gap.yaml"),
}
SETTINGS = {
    "scratch": {"pretrained": False, "mode": "full"},
    "frozen": {"pretrained": True, "mode": "linear_probe"},
    "partial": {"pretrained": True, "mode": "partial"},
    "finetuned": {"pretrained": True, "mode": "full"},
}


def _run_args(args: argparse.Namespace, target: str, setting: str, labels: str, workdir: Path) -> list[str]:
    """Command-line arguments of one train.py run."""
    config = dict(c.split("=", 1) for c in args.config).get(target, CONFIGS.get(target))
    if config is None:
        raise SystemExit(f"no config for target {target!r}: pass --config {target}=PATH")
    s = SETTINGS[setting]
    out = [
        "--config", config, f"--data.shards={args.shards}", f"--model.init_args.targets=[{target}]",
        f"--trainer.default_root_dir={workdir}", f"--trainer.logger.init_args.save_dir={workdir}",
        f"--model.init_args.mode={s['mode']}", f"--model.init_args.save_dir={workdir}/model",
    ]
    if s["pretrained"]:
        out.append(f"--model.init_args.pretrained={args.pretrained}")
    if s["mode"] == "partial":
        out.append(f"--model.init_args.unfreeze_last={args.unfreeze_last}")
    steps = args.max_steps if labels == "all" else (args.max_steps_small or args.max_steps)
    if steps:
        out.append(f"--trainer.max_steps={steps}")
    if labels != "all":
        out.append(f"--model.init_args.max_train_labels={int(labels)}")
    best = {"monitor": "val/score", "mode": "min", "save_last": True, "filename": "best-{step}"}
    cb = [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": best}]
    if args.seconds:
        cb.append({"class_path": "mmmat.tasks.callbacks.TimeBudget",
                   "init_args": {"seconds": args.seconds, "calibrate_steps": args.calibrate_steps}})
    overlay = workdir / "overlay.yaml"
    overlay.parent.mkdir(parents=True, exist_ok=True)
    overlay.write_text(json.dumps({"trainer": {"callbacks": cb}}))
    return [*out, "--config", str(overlay), *args.override]


def run_one(args: argparse.Namespace, target: str, setting: str, labels: str, cache: dict) -> dict:
    """Fit, then test the best checkpoint; returns the test metrics of ``target``."""
    import torch
    from pytorch_lightning import LightningModule
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.cli import LightningCLI

    from mmmat.tasks.datamodule import MultimodalDataModule

    workdir = Path(args.workdir) / f"{target}_{setting}_{labels}"
    run_args = _run_args(args, target, setting, labels, workdir)
    cli = LightningCLI(LightningModule, MultimodalDataModule, subclass_mode_model=True, run=False,
                       save_config_kwargs={"overwrite": True}, args=run_args)
    dm = cli.datamodule
    h = dm.hparams
    splits = (h.train_split, h.val_split, h.test_split)
    if not cache:
        cache.update({s: dm.records(s) for s in splits})
    # every run starts from the full decoded splits (setup() narrows the train split for max_train_labels)
    dm._records = {s: list(cache[s]) for s in splits}
    t0 = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=dm)
    fit_s = time.perf_counter() - t0
    ckpt = next((c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    best = "best" if ckpt is not None and ckpt.best_model_path else None
    best_score = ckpt.best_model_score if best else None
    cli.trainer.test(cli.model, datamodule=dm, ckpt_path=best)
    doc = json.loads((Path(cli.trainer.log_dir) / "test_metrics.json").read_text())
    m = doc["metrics"]
    res = {
        "test_mae": m[f"{target}_mae"], "test_rmse": m[f"{target}_rmse"], "test_r2": m[f"{target}_r2"],
        "test_nll": m.get(f"{target}_nll"), "test_within_1std": m.get(f"{target}_within_1std"),
        "test_materials": int(m[f"{target}_n"]), "train_labels": doc["num_train_labels"],
        "steps": int(cli.trainer.global_step), "fit_seconds": round(fit_s, 1),
        "checkpoint": "best val/score" if best else "last",
        "best_val_score": None if best_score is None else float(best_score),
        "log_dir": str(cli.trainer.log_dir),
    }
    del cli, dm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", default=None, help="saved MultimodalModel folder")
    ap.add_argument("--shards", default="shards/mp20p")
    ap.add_argument("--targets", nargs="+", default=list(CONFIGS))
    ap.add_argument("--settings", nargs="+", default=["scratch", "frozen", "finetuned"],
                    choices=list(SETTINGS))
    ap.add_argument("--labels", nargs="+", default=["all", "1000"], help="'all' or a number of train labels")
    ap.add_argument("--config", nargs="*", default=[], help="TARGET=PATH: config per target")
    ap.add_argument("--seconds", type=float, default=100.0, help="training budget per run (0 = none)")
    ap.add_argument("--calibrate-steps", type=int, default=200)
    ap.add_argument("--max-steps", type=int, default=None, help="steps per run (default: config)")
    ap.add_argument("--max-steps-small", type=int, default=None, help="cap for label-limited runs")
    ap.add_argument("--unfreeze-last", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--baselines", action="store_true", help="copy finetune_baselines.json figures in")
    ap.add_argument("--result", default=None)
    ap.add_argument("--merge", action="store_true",
                    help="keep the runs of an existing --result file that this call does not redo")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once, each in its own process on the same GPU (fixed --max-steps keep "
                         "them comparable when they share it)")
    ap.add_argument("--override", nargs=argparse.REMAINDER, default=[], help="more train.py arguments")
    args = ap.parse_args()
    if args.workdir is None:
        args.workdir = tempfile.mkdtemp(prefix="finetune_bench_")
    if any(SETTINGS[s]["pretrained"] for s in args.settings) and not args.pretrained:
        raise SystemExit("--pretrained is needed for the frozen, partial and finetuned settings")

    metrics: dict = {}
    t0 = time.perf_counter()
    runs = [(t, s, n) for t in args.targets for n in args.labels for s in args.settings]
    if args.jobs > 1:
        for (target, setting, labels), res in zip(runs, run_parallel(args, runs)):
            metrics.setdefault(target, {}).setdefault(setting, {})[labels] = res
    else:
        cache: dict = {}
        for target, setting, labels in runs:
            res = run_one(args, target, setting, labels, cache)
            metrics.setdefault(target, {}).setdefault(setting, {})[labels] = res
            mae, steps = res["test_mae"], res["steps"]
            print(f"{target} {setting} {labels}: MAE {mae:.4f} ({steps} steps)", flush=True)
    extra = {
        "pretrained": args.pretrained,
        "shards": args.shards,
        "seconds_per_run": args.seconds,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "units": {"formation_energy_per_atom": "eV/atom", "band_gap": "eV"},
    }
    if args.pretrained:
        from mmmat.heads.property import model_fingerprint

        extra["pretrained_fingerprint"] = model_fingerprint(args.pretrained)
    if args.merge and args.result and Path(args.result).exists():
        prev = json.loads(Path(args.result).read_text())
        # runs of this call replace the same (target, setting, labels) runs of the file; the others stay
        for target, settings in prev.get("metrics", {}).items():
            if target not in CONFIGS:
                continue
            for setting, by_labels in settings.items():
                for labels, res in by_labels.items():
                    metrics.setdefault(target, {}).setdefault(setting, {}).setdefault(labels, res)
        fp_prev, fp_new = prev.get("pretrained_fingerprint"), extra.get("pretrained_fingerprint")
        if fp_prev and fp_new and fp_prev != fp_new:
            raise SystemExit(f"--merge: {args.result} was measured with another pretrained model")
        if fp_prev and not fp_new:
            extra["pretrained"], extra["pretrained_fingerprint"] = prev.get("pretrained"), fp_prev
        extra["earlier_commands"] = prev.get("earlier_commands", []) + [prev.get("command")]
        extra["total_seconds"] = round(extra["total_seconds"] + prev.get("total_seconds", 0.0), 1)
    extra["summary"] = summary(metrics)
    base = RESULTS / "finetune_baselines.json"
    if args.baselines and base.exists():
        extra["composition_baselines"] = json.loads(base.read_text())["metrics"]
    write_result("finetune", metrics, extra, out=args.result)


def run_parallel(args: argparse.Namespace, runs: list[tuple[str, str, str]]) -> list[dict]:
    """Each run in a child process of this script, ``args.jobs`` at a time; their results in ``runs`` order.

    A child that fails is reported with its log and stops the benchmark once the others have finished.
    """
    import os
    import subprocess

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    common = ["--shards", args.shards, "--workdir", str(work), "--seconds", str(args.seconds),
              "--calibrate-steps", str(args.calibrate_steps), "--unfreeze-last", str(args.unfreeze_last)]
    if args.pretrained:
        common += ["--pretrained", args.pretrained]
    if args.max_steps is not None:
        common += ["--max-steps", str(args.max_steps)]
    if args.max_steps_small is not None:
        common += ["--max-steps-small", str(args.max_steps_small)]
    if args.config:
        common += ["--config", *args.config]
    if args.override:
        common += ["--override", *args.override]  # REMAINDER: must come last
    pending = list(enumerate(runs))
    active: list[tuple[int, subprocess.Popen, Path, Path]] = []
    results: dict[int, dict] = {}
    failed: list[str] = []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    while pending or active:
        while pending and len(active) < args.jobs:
            i, (target, setting, labels) = pending.pop(0)
            part = work / f"part_{target}_{setting}_{labels}.json"
            log = work / f"part_{target}_{setting}_{labels}.log"
            cmd = [sys.executable, __file__, "--targets", target, "--settings", setting, "--labels", labels,
                   "--result", str(part), *common]
            with open(log, "w") as fh:
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
            active.append((i, proc, part, log))
        time.sleep(1.0)
        for item in list(active):
            i, proc, part, log = item
            if proc.poll() is None:
                continue
            active.remove(item)
            target, setting, labels = runs[i]
            if proc.returncode != 0 or not part.exists():
                failed.append(f"{target} {setting} {labels} (exit {proc.returncode}; log {log}):\n"
                              + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
                continue
            res = json.loads(part.read_text())["metrics"][target][setting][labels]
            results[i] = res
            print(f"{target} {setting} {labels}: MAE {res['test_mae']:.4f} ({res['steps']} steps)", flush=True)
    if failed:
        raise SystemExit("fine-tuning runs failed:\n" + "\n".join(failed))
    return [results[i] for i in range(len(runs))]


def summary(metrics: dict) -> dict:
    """The headline figures: fine-tuned test MAE with all labels, and the pretraining gain at 1,000 labels."""
    out: dict = {}
    for target, key in (("formation_energy_per_atom", "formation_energy_mae"), ("band_gap", "band_gap_mae")):
        runs = metrics.get(target, {})
        ft = runs.get("finetuned", {})
        if "all" in ft:
            out[key] = ft["all"]["test_mae"]
        scratch_1k, ft_1k = runs.get("scratch", {}).get("1000"), ft.get("1000")
        if scratch_1k and ft_1k:
            gain = (scratch_1k["test_mae"] - ft_1k["test_mae"]) / scratch_1k["test_mae"]
            out["pretrain_gain_1k" if target == "formation_energy_per_atom" else f"pretrain_gain_1k_{target}"] = gain
    return out


if __name__ == "__main__":
    main()
