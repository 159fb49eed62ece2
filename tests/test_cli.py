import json

import pytest
from typer.testing import CliRunner

from mmmat.cli import app


def test_quickstart_runs_offline_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path / "q"), "--workers", "2"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "q" / "quickstart.json").read_text())
    manifest = json.loads((tmp_path / "q" / "shards" / "manifest.json").read_text())
    assert manifest["total_samples"] == 288 and manifest["total_failures"] == 0
    assert summary["samples_seen"] == summary["train_batches"] * 32
    assert summary["batch_fields"]["xrd"] == [32, 1701]
    assert summary["batch_fields"]["image"] == [32, 1, 64, 64]
    assert summary["edges_per_crystal"] > 10
    assert summary["present"]["xrd"] == 32 and summary["present"]["literature_text"] == 32
    # a second run resumes every shard
    r = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path / "q"), "--workers", "2"])
    assert r.exit_code == 0
    assert json.loads((tmp_path / "q" / "shards" / "manifest.json").read_text())["build"]["rows_built_now"] == 0


def test_data_info_and_errors(tmp_path):
    r = CliRunner().invoke(app, ["data", "info", str(tmp_path)])
    assert r.exit_code == 2 and "manifest.json" in r.output
    r = CliRunner().invoke(app, ["data", "build", "nosuch", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown data source" in r.output
    r = CliRunner().invoke(app, ["data", "build", "perov5", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "needs --root" in r.output


def test_train_entry_point_parses():
    import train

    with pytest.raises(SystemExit) as exc:
        train.main(["fit", "--help"])
    assert exc.value.code == 0
