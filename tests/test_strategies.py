"""FlatGradientDDPStrategy: the same training as Lightning's DDP, with one flat all-reduce per step."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_pipelines.base import BuildOptions, get_source
from data_pipelines.build import build_shards

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "pretrain" / "tiny.yaml")


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_shards_strategy")
    build_shards(get_source("builtin")(None, limit=48), out, progress=False, options=BuildOptions(describe=True))
    return out


def _strategy_overlay(tmp: Path, class_path: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "strategy.yaml"
    path.write_text(f"trainer:\n  strategy:\n    class_path: {class_path}\n")
    return path


def _train(tmp: Path, shards: Path, strategy: str) -> dict[str, torch.Tensor]:
    args = ["fit", "--config", TINY, f"--data.shards={shards}", f"--data.tokenizer={tmp}/tok",
            f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp}",
            f"--model.init_args.save_dir={tmp}/model", "--trainer.devices=2", "--trainer.accelerator=cpu",
            "--config", str(_strategy_overlay(tmp, strategy)), "--trainer.max_epochs=3",
            "--trainer.check_val_every_n_epoch=100"]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(str(tmp / "model" / "model.safetensors"))


def test_flat_gradient_strategy_trains_as_ddp_does(tmp_path, tiny_shards):
    """Two gloo processes, 3 steps: the weights after the flat all-reduce equal DDP's (tolerance 1e-5)."""
    ddp = _train(tmp_path / "ddp", tiny_shards, "pytorch_lightning.strategies.DDPStrategy")
    flat = _train(tmp_path / "flat", tiny_shards, "mmmat.tasks.strategies.FlatGradientDDPStrategy")
    assert ddp.keys() == flat.keys()
    for k in ddp:
        assert torch.allclose(ddp[k].float(), flat[k].float(), atol=1e-5, rtol=1e-5), k


def test_flat_gradient_strategy_refuses_wrapper_options():
    from mmmat.tasks.strategies import FlatGradientDDPStrategy

    with pytest.raises(ValueError, match="bucket_cap_mb"):
        FlatGradientDDPStrategy(bucket_cap_mb=8)
    s = FlatGradientDDPStrategy(broadcast_buffers=False)
    assert s.broadcast_buffers is False


def test_dtype_groups_follow_first_appearance():
    """Each dtype group is one collective: the grouping order must not depend on hashing (it differs by process)."""
    from mmmat.tasks.strategies import _dtype_groups

    a, b, c, d = torch.zeros(2), torch.zeros(3, dtype=torch.long), torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)
    groups = _dtype_groups([b, a, d, c])
    assert [g[0].dtype for g in groups] == [torch.long, torch.float32, torch.bfloat16]
    assert groups[1][0] is a and groups[1][1] is c
