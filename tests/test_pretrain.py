import json
from pathlib import Path

import pytest
import torch

from data_pipelines.base import BuildOptions, get_source
from data_pipelines.build import build_shards

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml")


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_shards")
    build_shards(get_source("builtin")(None, limit=48), out, progress=False, options=BuildOptions(describe=True))
    return out


def _args(tmp, shards, *extra):
    return ["fit", "--config", TINY, f"--data.shards={shards}", f"--data.tokenizer={tmp}/tok",
            f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp}",
            f"--model.init_args.save_dir={tmp}/model", *extra]


def test_tiny_pretraining_through_train_py(tmp_path, tiny_shards):
    import train

    cli = train.main(_args(tmp_path, tiny_shards))
    trainer = cli.trainer
    assert trainer.global_step == 6  # 48 train materials, batch 16, 2 epochs
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert "val/xrd_to_crystal_R@1" in metrics and "val/crystal_to_xrd_R@10" in metrics
    assert 0.0 <= metrics["val/xrd_to_crystal_R@1"] <= 1.0
    assert metrics["val/xrd_to_crystal_median_rank"] >= 1
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    # the resolved config and the model on disk
    assert list(tmp_path.rglob("config.yaml"))
    assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "model" / "model.safetensors").exists()
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert set(cfg["encoders"]) >= {"crystal", "xrd", "literature_text"}


def test_resume_continues_the_same_run(tmp_path, tiny_shards):
    import train

    # the learning-rate schedule is fixed by model.max_steps, so the interrupted run (1 epoch) and the
    # uninterrupted one (2 epochs) follow the same schedule
    sched = "--model.init_args.max_steps=6"
    a = train.main(_args(tmp_path / "a", tiny_shards, "--trainer.max_epochs=1", sched))
    ckpt = next((tmp_path / "a").rglob("*.ckpt"))
    b = train.main(_args(tmp_path / "b", tiny_shards, "--trainer.max_epochs=2", sched, f"--ckpt_path={ckpt}"))
    full = train.main(_args(tmp_path / "c", tiny_shards, "--trainer.max_epochs=2", sched))
    assert a.trainer.global_step == 3 and b.trainer.global_step == 6
    # resumed run = uninterrupted run: same weights after the second epoch
    sb, sf = b.model.state_dict(), full.model.state_dict()
    assert sb.keys() == sf.keys()
    for k in sb:
        assert torch.allclose(sb[k].float(), sf[k].float(), atol=1e-5), k


def test_unknown_config_key_is_an_error(tmp_path, tiny_shards):
    import train

    with pytest.raises(SystemExit):
        train.main(_args(tmp_path, tiny_shards, "--model.init_args.no_such_key=1"))
