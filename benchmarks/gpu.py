"""GPU benchmark runner: one phase per call, every input and output a folder named on the command line.

    python3 benchmarks/gpu.py setup --target SITE                       # prints the PYTHONPATH to use
    python3 benchmarks/gpu.py --site SITE build --data .gpu/data/mp_20 --shards SHARDS --out OUT
    python3 benchmarks/gpu.py --site SITE pretrain --shards SHARDS --work WORK --out OUT --seconds 240 \\
        --measured .gpu/data/xrd_measured/iucr_rietveld_cifs_cdvae_xrd/cif_files.tar.xz
    python3 benchmarks/gpu.py --site SITE finetune --shards SHARDS --work WORK --out OUT --seconds 20
    python3 benchmarks/gpu.py --site SITE generate --shards SHARDS --work WORK --out OUT --seconds 240
    python3 benchmarks/gpu.py --site SITE ddp --shards SHARDS --work WORK --out OUT --samples 2000000
    python3 benchmarks/gpu.py --site SITE profile --shards SHARDS --work WORK --out OUT
    python3 benchmarks/gpu.py --site SITE speed --shards SHARDS --out OUT [--ddp]
    python3 benchmarks/gpu.py --dry-run PHASE ...                       # print the commands only

Phases:

- ``setup``: install the carried wheels (``--wheels``, default ``.whl/``) into ``--target`` without network
  (see ../shared/docs/GPU.md) and print the ``PYTHONPATH`` to export; later phases take it as ``--site``.
- ``build``: mp20p shards from the raw data folder ``--data`` into ``--shards`` (``benchmarks/data_build.py``;
  a folder already holding finished shards is resumed, ``--fresh`` rebuilds), with ``--loader`` the loader
  benchmark on them too (``benchmarks/loader.py``).
- ``pretrain``: ``benchmarks/pretrain.py`` with the model in ``WORK/pretrain/model`` and the result in
  ``OUT/<--result>.json``; ``--no-eval`` trains only, ``--eval-only`` evaluates ``WORK/pretrain/model``.
  Arguments after ``--`` go to train.py.
- ``finetune``: ``benchmarks/finetune.py`` from ``--pretrained`` (default ``WORK/pretrain/model``), runs in
  ``WORK/finetune``, merged into ``OUT/finetune.json``.
- ``generate``: generator training through train.py (``configs/generate/mp20p.yaml``) into
  ``WORK/generate``, then ``benchmarks/generate.py`` (``OUT/generate.json``, de novo samples in ``OUT/denovo``);
  ``--max-steps N`` trains a fixed schedule over several calls (``--call-seconds`` each, resumed from
  ``WORK/generate/sitting.ckpt``), ``--fit-only`` / ``--eval-only`` split training and evaluation, ``--hull``
  also runs ``mmmat evaluate`` on the de novo samples (``OUT/denovo_eval/report.json``).
- ``ddp``: the one-GPU step on this card for 60 s, then the DDP config on every GPU for ``--samples``;
  ``ddp_speedup`` is merged into ``OUT/pretrain_2gpu.json``.
- ``profile``: step profiles, one GPU then DDP (``OUT/p1``, ``OUT/p2``).
- ``speed``: ``benchmarks/pretrain_speed.py`` (``OUT/pretrain_speed.json``; ``--ddp`` adds the two-GPU part).

Nothing is read from an earlier call except the folders named here (``--shards``, ``--work``, ``--pretrained``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
ENV = {"PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


@dataclass
class Step:
    """One thing a phase does: a command (``argv``) or a function call (``call``) described by ``what``."""

    what: str
    argv: list[str] | None = None
    call: Callable[[], Any] | None = None
    needs: list[Path] = field(default_factory=list)  # inputs that must exist when the step runs

    def show(self) -> str:
        """The step as printed by a dry run."""
        return shlex.join(self.argv) if self.argv is not None else f"# {self.what}"


# ------------------------------------------------------------------------------------------- helpers
def gpu_info() -> None:
    """Print the GPUs (name, memory), when nvidia-smi is there."""
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], check=False)
    else:
        print("no nvidia-smi: no GPU visible")


def write_yaml(path: Path, doc: dict[str, Any]) -> None:
    """Write a config overlay (JSON is YAML)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def ddp_speedup(one_gpu: Path, ddp: Path) -> float:
    """Merge ``ddp_speedup`` (DDP crystals/s over one GPU's on the same card) into the DDP result file."""
    one = json.loads(one_gpu.read_text())
    two = json.loads(ddp.read_text())
    speedup = two["metrics"]["crystals_per_s"] / one["metrics"]["crystals_per_s"]
    two["metrics"]["ddp_speedup"] = speedup
    two["metrics"]["one_gpu_crystals_per_s_same_card"] = one["metrics"]["crystals_per_s"]
    ddp.write_text(json.dumps(two, indent=1))
    print("ddp_speedup", speedup)
    return speedup


def collect_metrics(run_dir: Path, out: Path) -> None:
    """Concatenate the CSV logger's ``metrics.csv`` of every version under ``run_dir`` into ``out``."""
    files = sorted(run_dir.glob("*/version_*/metrics.csv"))
    if not files:
        print(f"no metrics.csv under {run_dir}")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    for f in files:
        with open(f, newline="") as fh:
            rows.extend(csv.DictReader(fh))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        w.writerows(rows)
    print(f"{len(rows)} metric rows -> {out}")


def checkpoint_step(path: Path) -> None:
    """Print the global step stored in a Lightning checkpoint."""
    import torch

    print("step", torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def show_profiles(out: Path) -> None:
    """Print the head of every step profile written under ``out``."""
    for f in sorted(out.glob("p*/profile_rank*.txt")):
        print(f"== {f}")
        print("\n".join(f.read_text().splitlines()[:4]))


# ------------------------------------------------------------------------------------------- phases
def phase_setup(a: argparse.Namespace, py: str) -> list[Step]:
    """Install the carried wheels into ``--target``."""
    wheels = sorted(Path(a.wheels).glob("*.whl"))
    if not wheels and not a.dry_run:
        raise SystemExit(f"no wheels in {a.wheels}: bring them as ../shared/docs/GPU.md says")
    argv = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
            "--upgrade", "--target", a.target, *(str(w) for w in wheels or [Path(a.wheels) / "*.whl"])]
    site = Path(a.target).resolve()
    return [Step(f"install {len(wheels)} wheels into {a.target}", argv),
            Step("the PYTHONPATH to use", call=lambda: print(f"export PYTHONPATH={site}:{ROOT}"))]


def phase_build(a: argparse.Namespace, py: str) -> list[Step]:
    """Shards from the raw data folder, and optionally the loader benchmark on them."""
    argv = [py, str(BENCH / "data_build.py"), "--source", a.source, "--root", a.data, "--out", a.shards,
            "--workers", str(a.workers), "--result", str(Path(a.out) / "data_build_gpu_node.json")]
    argv += ["--limit", str(a.limit)] if a.limit else []
    argv += ["--fresh"] if a.fresh else []
    steps = [Step(f"build shards in {a.shards}", argv, needs=[Path(a.data)])]
    if a.loader:
        steps.append(Step("loader benchmark", [py, str(BENCH / "loader.py"), "--shards", a.shards, "--workers",
                                               str(a.workers), "--schnet", "--batches", "100", "--result",
                                               str(Path(a.out) / "loader_gpu.json")]))
    return steps


def _pretrain_argv(a: argparse.Namespace, py: str, workdir: Path, result: Path, *extra: str,
                   overrides: list[str] | None = None) -> list[str]:
    argv = [py, str(BENCH / "pretrain.py"), "--shards", a.shards, "--config", a.config, "--workdir", str(workdir),
            "--result", str(result), *extra]
    if getattr(a, "measured", None):
        argv += ["--measured", a.measured]
    return argv + (["--", *overrides] if overrides else [])  # train.py arguments


def phase_pretrain(a: argparse.Namespace, py: str) -> list[Step]:
    """Pretraining (time budget or sample count) and its retrieval evaluation."""
    work, out = Path(a.work), Path(a.out)
    result = out / f"{a.result}.json"
    extra = ["--queries", str(work / "queries.pt")]
    if a.eval_only:
        return [Step("retrieval evaluation of WORK/pretrain/model",
                     _pretrain_argv(a, py, work / "pretrain", result, *extra, "--eval-only"),
                     needs=[Path(a.shards) / "manifest.json", work / "pretrain" / "model"])]
    extra += ["--samples", str(a.samples)] if a.samples else ["--seconds", str(a.seconds)]
    extra += ["--devices", str(a.devices)] if a.devices else []
    extra += ["--no-eval"] if a.no_eval else []
    extra += ["--no-val"] if a.no_val else []
    return [Step("GPUs", call=gpu_info),
            Step("pretraining", _pretrain_argv(a, py, work / "pretrain", result, *extra, overrides=a.overrides),
                 needs=[Path(a.shards) / "manifest.json"])]


def phase_finetune(a: argparse.Namespace, py: str) -> list[Step]:
    """Property fine-tuning settings from the pretrained model."""
    pretrained = Path(a.pretrained or Path(a.work) / "pretrain" / "model")
    argv = [py, str(BENCH / "finetune.py"), "--shards", a.shards, "--seconds", str(a.seconds), "--workdir",
            str(Path(a.work) / "finetune"), "--merge", "--baselines", "--result", str(Path(a.out) / "finetune.json"),
            "--jobs", str(a.jobs)]
    needs = [Path(a.shards) / "manifest.json"]
    if a.settings != ["scratch"]:
        argv += ["--pretrained", str(pretrained)]
        needs.append(pretrained)
    argv += ["--targets", *a.targets] if a.targets else []
    argv += ["--settings", *a.settings] if a.settings else []
    argv += ["--max-steps", str(a.max_steps)] if a.max_steps else []
    argv += ["--max-steps-small", str(a.max_steps_small)] if a.max_steps_small else []
    return [Step("GPUs", call=gpu_info), Step("fine-tuning", argv, needs=needs)]


def phase_generate(a: argparse.Namespace, py: str) -> list[Step]:
    """Generator training (one budget, or a fixed schedule over calls), its benchmark and de novo report."""
    work, out = Path(a.work) / "generate", Path(a.out)
    pretrained = Path(a.pretrained or Path(a.work) / "pretrain" / "model")
    steps = [Step("GPUs", call=gpu_info)]
    if not a.eval_only:
        overlay = work / "overlay.yaml"
        sitting = work / "sitting.ckpt"
        cbs: list[dict[str, Any]] = []
        doc: dict[str, Any] = {"trainer": {"callbacks": cbs}}
        if a.max_steps:
            doc["trainer"]["max_steps"] = a.max_steps
            doc["model"] = {"init_args": {"max_steps": a.max_steps}}
            cbs.append({"class_path": "mmmat.tasks.callbacks.StopAfter",
                        "init_args": {"seconds": a.call_seconds, "checkpoint": str(sitting)}})
        else:
            cbs.append({"class_path": "mmmat.tasks.callbacks.TimeBudget",
                        "init_args": {"seconds": a.seconds, "calibrate_steps": 200}})
        cbs.append({"class_path": "mmmat.tasks.callbacks.Throughput"})
        steps.append(Step(f"write {overlay}", call=lambda: write_yaml(overlay, doc)))
        argv = [py, str(ROOT / "train.py"), "fit", "--config", a.config, "--config", str(overlay),
                f"--data.shards={a.shards}", f"--model.init_args.pretrained={pretrained}",
                f"--data.tokenizer={pretrained}/tokenizer", f"--model.init_args.save_dir={work}/model",
                f"--trainer.default_root_dir={work}", f"--trainer.logger.init_args.save_dir={work}"]
        if a.max_steps and sitting.exists():  # a later call of the schedule resumes from the last one
            argv.append(f"--ckpt_path={sitting}")
        steps.append(Step("generator training", argv, needs=[Path(a.shards) / "manifest.json", pretrained]))
        if a.max_steps:
            steps.append(Step(f"step reached ({sitting})", call=lambda: checkpoint_step(sitting)))
        steps.append(Step(f"metrics -> {out / 'generate_train_metrics.csv'}",
                          call=lambda: collect_metrics(work, out / "generate_train_metrics.csv")))
    if a.fit_only:
        return steps
    argv = [py, str(BENCH / "generate.py"), "--model", str(work / "model"), "--shards", a.shards, "--workers",
            str(a.workers), "--denovo-out", str(out / "denovo"), "--result", str(out / "generate.json")]
    argv += ["--predictor", a.predictor] if a.predictor else []
    argv += list(a.overrides)
    steps.append(Step("generator benchmark", argv, needs=[work / "model"]))
    if a.hull:
        argv = [py, "-m", "mmmat.cli", "evaluate", "--generated", str(out / "denovo"), "--reference", a.shards,
                "--out", str(out / "denovo_eval" / "report.json"), "--hull", a.hull, "--relax-steps",
                str(a.relax_steps), "--workers", str(a.relax_workers), "--device", "cuda",
                "--cache-dir", str(Path(a.work) / "evalcache")]
        steps.append(Step("staged report of the de novo samples", argv, needs=[Path(a.hull)]))
    return steps


def phase_ddp(a: argparse.Namespace, py: str) -> list[Step]:
    """One GPU on this card, then DDP over every GPU, and the speed-up."""
    work, out = Path(a.work), Path(a.out)
    one, two = out / "pretrain_1gpu_same_card.json", out / "pretrain_2gpu.json"
    a1 = argparse.Namespace(**{**vars(a), "config": a.config, "measured": None})
    a2 = argparse.Namespace(**{**vars(a), "config": a.ddp_config})
    needs = [Path(a.shards) / "manifest.json"]
    return [
        Step("GPUs", call=gpu_info),
        Step("one GPU, 60 s", _pretrain_argv(a1, py, work / "d1", one, "--devices", "1", "--seconds", "60",
                                             "--no-eval", "--no-val"), needs=needs),
        Step("DDP", _pretrain_argv(a2, py, work / "d2", two, "--samples", str(a.samples), "--queries",
                                   str(work / "queries.pt")), needs=needs),
        Step(f"ddp_speedup -> {two}", call=lambda: ddp_speedup(one, two)),
    ]


def phase_profile(a: argparse.Namespace, py: str) -> list[Step]:
    """Step profiles and host-sync counts: one GPU (``OUT/p1``), then DDP (``OUT/p2``)."""
    work, out = Path(a.work), Path(a.out)
    needs = [Path(a.shards) / "manifest.json"]
    steps = [Step("GPUs", call=gpu_info)]
    for name, cfg, dev in (("p1", a.config, ["--devices", "1"]), ("p2", a.ddp_config, [])):
        b = argparse.Namespace(**{**vars(a), "config": cfg, "measured": None})
        steps.append(Step(f"profile {name}", _pretrain_argv(
            b, py, work / name, out / f"{name}.json", *dev, "--samples", "100000000", "--no-eval", "--no-val",
            "--profile", str(out / name), overrides=a.overrides), needs=needs))
    steps.append(Step("profile heads", call=lambda: show_profiles(out)))
    return steps


def phase_speed(a: argparse.Namespace, py: str) -> list[Step]:
    """The pretraining step's speed (benchmarks/pretrain_speed.py)."""
    out = Path(a.out)
    argv = [py, str(BENCH / "pretrain_speed.py"), "--shards", a.shards, "--result", str(out / "pretrain_speed.json")]
    if a.ddp:
        argv += ["--ddp", "--ddp-result", str(out / "pretrain_2gpu_speed.json")]
    return [Step("GPUs", call=gpu_info), Step("step speed", argv + list(a.overrides),
                                              needs=[Path(a.shards) / "manifest.json"])]


PHASES: dict[str, Callable[[argparse.Namespace, str], list[Step]]] = {
    "setup": phase_setup, "build": phase_build, "pretrain": phase_pretrain, "finetune": phase_finetune,
    "generate": phase_generate, "ddp": phase_ddp, "profile": phase_profile, "speed": phase_speed,
}


# ------------------------------------------------------------------------------------------- command line
def parser() -> argparse.ArgumentParser:
    """The command line: global options, then one subcommand per phase."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the commands of the phase, run nothing")
    ap.add_argument("--site", default=None, help="folder of installed wheels (setup's --target), put on PYTHONPATH")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the steps")
    sub = ap.add_subparsers(dest="phase", required=True)

    def folders(p: argparse.ArgumentParser, work: bool = True) -> None:
        p.add_argument("--shards", required=True, help="shard folder (written by the build phase)")
        if work:
            p.add_argument("--work", required=True, help="folder for runs and models of this and later phases")
        p.add_argument("--out", required=True, help="folder for result files")

    p = sub.add_parser("setup", help="install the carried wheels")
    p.add_argument("--wheels", default=str(ROOT / ".whl"))
    p.add_argument("--target", required=True, help="folder to install into (later: --site)")

    p = sub.add_parser("build", help="shards from raw data")
    p.add_argument("--data", required=True, help="raw data folder (mp_20)")
    p.add_argument("--source", default="mp20", help="data source name (builtin: the embedded default)")
    p.add_argument("--shards", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="delete --shards first")
    p.add_argument("--loader", action="store_true", help="then the loader benchmark on the shards")

    p = sub.add_parser("pretrain", help="pretraining and retrieval evaluation")
    folders(p)
    p.add_argument("--config", default="configs/pretrain/mp20p.yaml")
    p.add_argument("--seconds", type=float, default=240)
    p.add_argument("--samples", type=int, default=0, help="train on this many samples instead of --seconds")
    p.add_argument("--devices", type=int, default=0)
    p.add_argument("--measured", default=None, help="measured patterns (tar.xz of CIFs)")
    p.add_argument("--result", default="pretrain_1gpu", help="result name (OUT/<name>.json)")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--no-val", action="store_true")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("overrides", nargs="*", help="after --: train.py arguments")

    p = sub.add_parser("finetune", help="property fine-tuning")
    folders(p)
    p.add_argument("--pretrained", default=None, help="model folder (default WORK/pretrain/model)")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--targets", nargs="*", default=None)
    p.add_argument("--settings", nargs="*", default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-steps-small", type=int, default=None)
    p.add_argument("--jobs", type=int, default=1)

    p = sub.add_parser("generate", help="generator training and benchmark")
    folders(p)
    p.add_argument("--pretrained", default=None, help="model folder (default WORK/pretrain/model)")
    p.add_argument("--config", default="configs/generate/mp20p.yaml")
    p.add_argument("--seconds", type=float, default=240)
    p.add_argument("--max-steps", type=int, default=None, help="a fixed schedule of this many steps over calls")
    p.add_argument("--call-seconds", type=float, default=480, help="training time per call with --max-steps")
    p.add_argument("--fit-only", action="store_true")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--predictor", default=None, help="fine-tuned property model for the conditioned part")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--hull", default=None, help="CHGNet hull JSON: also the staged report of the de novo samples")
    p.add_argument("--relax-steps", type=int, default=500)
    p.add_argument("--relax-workers", type=int, default=12)
    p.add_argument("overrides", nargs="*", help="after --: benchmarks/generate.py arguments")

    for name, what in (("ddp", "one GPU then DDP"), ("profile", "step profiles")):
        p = sub.add_parser(name, help=what)
        folders(p)
        p.add_argument("--config", default="configs/pretrain/mp20p.yaml")
        p.add_argument("--ddp-config", default="configs/pretrain/mp20p_ddp.yaml")
        if name == "ddp":
            p.add_argument("--samples", type=int, required=True)
            p.add_argument("--measured", default=None)
        p.add_argument("overrides", nargs="*", help="after --: train.py arguments")

    p = sub.add_parser("speed", help="benchmarks/pretrain_speed.py")
    folders(p, work=False)
    p.add_argument("--ddp", action="store_true")
    p.add_argument("overrides", nargs="*", help="after --: benchmarks/pretrain_speed.py arguments")
    return ap


def plan(args: argparse.Namespace) -> list[Step]:
    """The steps of the phase ``args.phase``."""
    args.overrides = list(getattr(args, "overrides", []) or [])
    return PHASES[args.phase](args, args.python)


def run(steps: list[Step], args: argparse.Namespace) -> None:
    """Run the steps in order (stop at the first that fails), or print them with ``--dry-run``."""
    env = {**os.environ, **ENV}
    env["PYTHONPATH"] = os.pathsep.join(
        [p for p in (args.site and str(Path(args.site).resolve()), str(ROOT), os.environ.get("PYTHONPATH")) if p])
    if args.dry_run:
        print(f"# phase {args.phase}; PYTHONPATH={env['PYTHONPATH']}; cwd {ROOT}")
        for s in steps:
            print(s.show())
        return
    for folder in ("out", "work"):
        if getattr(args, folder, None):
            Path(getattr(args, folder)).mkdir(parents=True, exist_ok=True)
    for s in steps:
        missing = [str(p) for p in s.needs if not p.exists()]
        if missing:
            raise SystemExit(f"{args.phase}: {s.what} needs {', '.join(missing)} (run the phase that writes it, "
                             f"or name the folder)")
        print(f"== {s.what}", flush=True)
        if s.call is not None:
            s.call()
            continue
        r = subprocess.run(s.argv, cwd=ROOT, env=env, check=False)
        if r.returncode != 0:
            raise SystemExit(f"{args.phase}: {s.what} failed (exit {r.returncode}): {s.show()}")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run (or print) one phase."""
    args = parser().parse_args(argv)
    run(plan(args), args)


if __name__ == "__main__":
    main()
