"""benchmarks/gpu.py: each phase's dry run names only the folders given; build and a tiny pretraining run on CPU."""

import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu  # noqa: E402

DIRS = ["--shards", "S_DIR", "--work", "W_DIR", "--out", "O_DIR"]
PHASES = {
    "setup": ["--target", "SITE_DIR"],
    "build": ["--data", "RAW_DIR", "--shards", "S_DIR", "--out", "O_DIR"],
    "pretrain": [*DIRS, "--seconds", "30", "--measured", "M.tar.xz", "--", "--trainer.precision=bf16-mixed"],
    "finetune": [*DIRS, "--targets", "band_gap"],
    "generate": [*DIRS, "--predictor", "P_DIR", "--hull", "H.json"],
    "ddp": [*DIRS, "--samples", "1000"],
    "profile": DIRS,
    "speed": ["--shards", "S_DIR", "--out", "O_DIR", "--ddp"],
}


def _dry(capsys, phase: str, *extra: str) -> list[list[str]]:
    gpu.main(["--dry-run", "--site", "SITE_DIR", phase, *PHASES[phase], *extra])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"# phase {phase}")
    return [shlex.split(line) for line in lines[1:] if not line.startswith("#")]


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_dry_run_of_every_phase_uses_the_named_folders(phase, capsys):
    cmds = _dry(capsys, phase)
    assert cmds, phase
    text = " ".join(" ".join(c) for c in cmds)
    repo = str(Path(gpu.__file__).resolve().parents[1])
    text = text.replace(sys.executable, "PYTHON").replace(repo, "REPO")  # a checkout may itself live under /tmp
    assert "/tmp" not in text  # no hidden state: every path is one given on the command line or in the repo
    for c in cmds:
        scripts = [a for a in c if a.endswith(".py")]
        for s in scripts:
            assert Path(s).is_file(), s  # every script it calls exists
    if phase != "setup":
        assert "S_DIR" in text and "O_DIR" in text
    if phase in ("pretrain", "finetune", "generate", "ddp", "profile"):
        assert "W_DIR" in text


def test_dry_run_details(capsys):
    (pre,) = _dry(capsys, "pretrain")
    assert pre[-2:] == ["--", "--trainer.precision=bf16-mixed"] and "W_DIR/pretrain" in pre
    assert pre[pre.index("--result") + 1] == "O_DIR/pretrain_1gpu.json" and "M.tar.xz" in pre
    fit, bench, report = _dry(capsys, "generate")
    assert "--model.init_args.pretrained=W_DIR/pretrain/model" in fit and "--config" in fit
    assert "W_DIR/generate/overlay.yaml" in fit and not any(a.startswith("--ckpt_path") for a in fit)
    assert bench[bench.index("--predictor") + 1] == "P_DIR" and report[1:4] == ["-m", "mmmat.cli", "evaluate"]
    (fit,) = _dry(capsys, "generate", "--fit-only", "--max-steps", "100")
    assert "W_DIR/generate/overlay.yaml" in fit
    one, two = _dry(capsys, "ddp")
    assert one[one.index("--result") + 1] == "O_DIR/pretrain_1gpu_same_card.json"
    assert two[two.index("--config") + 1] == "configs/pretrain/mp20p_ddp.yaml"
    (ft,) = _dry(capsys, "finetune", "--settings", "scratch")
    assert "--pretrained" not in ft


def test_ddp_speedup_is_merged(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps({"metrics": {"crystals_per_s": 100.0}}))
    two.write_text(json.dumps({"metrics": {"crystals_per_s": 180.0}, "card": "x"}))
    assert gpu.ddp_speedup(one, two) == pytest.approx(1.8)
    doc = json.loads(two.read_text())
    assert doc["metrics"]["ddp_speedup"] == pytest.approx(1.8) and doc["card"] == "x"


def test_a_missing_input_stops_the_phase_with_its_name(tmp_path):
    with pytest.raises(SystemExit, match="manifest.json"):
        gpu.main(["pretrain", "--shards", str(tmp_path / "none"), "--work", str(tmp_path / "w"),
                  "--out", str(tmp_path / "o")])


@pytest.mark.slow
def test_build_and_tiny_pretrain_phases_run_on_cpu(tmp_path):
    """The build phase (embedded default data, 48 crystals) and a two-step pretraining on CPU."""
    shards, work, out = tmp_path / "shards", tmp_path / "work", tmp_path / "out"
    gpu.main(["build", "--source", "builtin", "--data", str(tmp_path), "--shards", str(shards), "--out", str(out),
              "--workers", "1", "--limit", "48"])
    assert (shards / "manifest.json").is_file()
    assert json.loads((out / "data_build_gpu_node.json").read_text())["metrics"]["train_samples"] == 48
    gpu.main(["pretrain", "--shards", str(shards), "--work", str(work), "--out", str(out), "--config",
              "configs/pretrain/tiny.yaml", "--samples", "32", "--no-eval", "--result", "pretrain_tiny", "--",
              "--trainer.accelerator=cpu", "--trainer.max_epochs=1"])
    res = json.loads((out / "pretrain_tiny.json").read_text())
    assert res["metrics"]["steps"] == 2 and res["metrics"]["samples_seen"] == 32
    assert (work / "pretrain" / "model" / "config.json").is_file()
