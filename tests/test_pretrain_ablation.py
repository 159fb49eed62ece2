import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _write(work, name, seed, runs):
    metrics = {}
    for (target, setting, labels), mae in runs.items():
        metrics.setdefault(target, {}).setdefault(setting, {})[labels] = {"test_mae": mae, "steps": 10}
    (work / name).mkdir(parents=True, exist_ok=True)
    (work / name / f"finetune_seed{seed}.json").write_text(json.dumps({"metrics": metrics}))


def test_summary_gain_is_mean_over_seeds_of_paired_relative_gains(tmp_path):
    from pretrain_ablation import summarise

    fe, bg = "formation_energy_per_atom", "band_gap"
    scratch = {0: 0.12, 1: 0.10, 2: 0.14}
    ft = {0: 0.09, 1: 0.09, 2: 0.07}
    for s in (0, 1, 2):
        runs = {(fe, "scratch", "1000"): scratch[s], (bg, "scratch", "1000"): 0.4}
        if s == 0:
            runs.update({(fe, "scratch", "all"): 0.045, (bg, "scratch", "all"): 0.33})
        _write(tmp_path, "scratch", s, runs)
        runs = {(fe, "finetuned", "1000"): ft[s], (bg, "finetuned", "1000"): 0.39}
        if s == 0:
            runs.update({(fe, "finetuned", "all"): 0.04, (bg, "finetuned", "all"): 0.3, (fe, "frozen", "all"): 0.2,
                         (bg, "frozen", "all"): 0.5})
        _write(tmp_path, "denoise", s, runs)
    metrics, details = summarise(tmp_path, ["denoise"], [0, 1, 2])
    gains = [(scratch[s] - ft[s]) / scratch[s] for s in (0, 1, 2)]
    assert metrics["best_variant"] == "denoise"
    assert metrics["pretrain_gain_1k"] == pytest.approx(sum(gains) / 3)
    assert metrics["pretrain_gain_1k_std"] == pytest.approx(
        (sum((g - sum(gains) / 3) ** 2 for g in gains) / 2) ** 0.5)
    assert metrics["formation_energy_mae_finetuned_all"] == 0.04 and metrics["frozen_probe_mae"] == 0.2
    assert details["scratch"][fe]["mae_1k_mean"] == pytest.approx(0.12)


def test_phases_print_their_commands(tmp_path):
    for phase, expect in (("pretrain", "objectives={denoise"), ("finetune", "--model.init_args.subset_seed=2")):
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pretrain_ablation.py"), "--phase", phase,
                            "--dry-run", "--workdir", str(tmp_path), "--shards", "s"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 0, r.stderr
        assert expect in r.stdout


def test_finetune_runs_one_file_per_run_skipping_finished_ones(tmp_path):
    import argparse

    from pretrain_ablation import finetune_runs, run_file, summarise

    fe = "formation_energy_per_atom"
    args = argparse.Namespace(finetune_variants=["scratch", "denoise"], seeds=[0, 1, 2], targets=[fe],
                              labels=["1000", "all"], probe=True, workdir=str(tmp_path))
    runs = finetune_runs(args)
    # scratch: 3 x 1k + all; denoise: 3 x 1k + all + frozen probe
    assert len(runs) == 9
    assert ("denoise", 0, fe, "frozen", "all") in runs and ("denoise", 1, fe, "frozen", "all") not in runs
    assert not any(r[0] == "scratch" and r[3] != "scratch" for r in runs)
    for name, seed, mae_ in (("scratch", 1, 0.2), ("denoise", 1, 0.1)):
        f = run_file(tmp_path, name, seed, fe, "scratch" if name == "scratch" else "finetuned", "1000")
        f.parent.mkdir(parents=True, exist_ok=True)
        setting = "scratch" if name == "scratch" else "finetuned"
        f.write_text(json.dumps({"metrics": {fe: {setting: {"1000": {"test_mae": mae_}}}}}))
    assert len(finetune_runs(args)) == 7
    metrics, _ = summarise(tmp_path, ["denoise"], [0, 1, 2])
    assert metrics["pretrain_gain_1k"] == pytest.approx(0.5) and metrics["pretrain_gain_1k_std"] is None
