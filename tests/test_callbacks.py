from pathlib import Path
from types import SimpleNamespace

import pytest

from mmmat.tasks.callbacks import SigtermCheck, StepProfiler

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml")


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from data_pipelines.base import get_source
    from data_pipelines.build import build_shards

    out = tmp_path_factory.mktemp("tiny_shards")
    build_shards(get_source("builtin")(None, limit=48), out, progress=False)
    return out


def _trainer(world_size: int) -> tuple[SimpleNamespace, list[int]]:
    calls: list[int] = []
    loop = SimpleNamespace(_broadcast_sigterm_tensor=lambda: calls.append(1))
    return SimpleNamespace(world_size=world_size, fit_loop=SimpleNamespace(epoch_loop=loop)), calls


def test_sigterm_check_runs_every_n_steps_on_several_ranks():
    trainer, calls = _trainer(world_size=2)
    cb = SigtermCheck(every_n_steps=4)
    cb.on_train_start(trainer, None)
    cb.on_train_start(trainer, None)  # a second fit does not wrap twice
    for _ in range(10):
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor()
    assert len(calls) == 3 and cb.checks == 3  # steps 0, 4 and 8


def test_sigterm_check_leaves_one_process_and_other_lightning_versions_alone():
    trainer, calls = _trainer(world_size=1)
    original = trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor
    SigtermCheck(every_n_steps=4).on_train_start(trainer, None)
    assert trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor is original
    bare = SimpleNamespace(world_size=2, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace()))
    SigtermCheck().on_train_start(bare, None)  # no per-step check to wrap: nothing happens
    with pytest.raises(ValueError, match="every_n_steps"):
        SigtermCheck(every_n_steps=0)


def test_step_profiler_writes_a_report_and_stops(tmp_path, tiny_shards):
    import train

    out = tmp_path / "prof"
    cli = train.main([
        "fit", "--config", TINY, f"--data.shards={tiny_shards}", f"--data.tokenizer={tmp_path}/tok",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--model.init_args.save_dir={tmp_path}/model", "--trainer.max_epochs=5", "--trainer.limit_val_batches=0",
        "--trainer.callbacks+=mmmat.tasks.callbacks.StepProfiler", f"--trainer.callbacks.out_dir={out}",
        "--trainer.callbacks.start=4", "--trainer.callbacks.steps=2",
    ])
    report = (out / "profile_rank0.txt").read_text()
    assert "wall per step without profiler" in report and "by self CPU time" in report
    assert "aten::" in report  # operators were recorded
    assert cli.trainer.global_step == 6  # stopped after the profiled window (steps 4 and 5)
    assert isinstance(next(c for c in cli.trainer.callbacks if isinstance(c, StepProfiler)), StepProfiler)


def test_stop_after_ends_a_sitting_and_the_next_one_resumes(tmp_path, tiny_shards):
    import torch

    import train

    def run(root, *extra):
        return train.main([
            "fit", "--config", TINY, f"--data.shards={tiny_shards}", f"--data.tokenizer={tmp_path}/tok",
            f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
            f"--model.init_args.save_dir={root}/model", "--trainer.limit_val_batches=0",
            "--model.init_args.max_steps=12", "--trainer.max_epochs=4", *extra,
        ])

    ckpt = tmp_path / "sit" / "last.ckpt"
    stop = ["--trainer.callbacks+=mmmat.tasks.callbacks.StopAfter", "--trainer.callbacks.seconds=0",
            f"--trainer.callbacks.checkpoint={ckpt}"]
    first = run(tmp_path / "a", *stop)  # a zero budget: stops at the end of the first epoch
    assert first.trainer.global_step == 3 and ckpt.exists()
    second = run(tmp_path / "b", f"--ckpt_path={ckpt}")
    whole = run(tmp_path / "c")
    assert second.trainer.global_step == whole.trainer.global_step == 12
    sb, sw = second.model.state_dict(), whole.model.state_dict()
    for k in sb:
        assert torch.allclose(sb[k].float(), sw[k].float(), atol=1e-5), k


def test_step_profiler_names_the_callers_of_a_synchronisation(tmp_path):
    """A synchronisation raised inside torch is counted with the innermost frames outside the torch package."""
    import os
    import warnings

    import torch

    prof = StepProfiler(str(tmp_path))
    prof._records = []

    namespace: dict = {"warnings": warnings}
    tensor_py = os.path.join(os.path.dirname(torch.__file__), "_tensor.py")
    # a torch function that synchronises, called from a library installed under a path that holds "/torch/"
    # (a virtual environment in /opt/torch), called from the project's code
    exec(compile("def item():\n    warnings.warn_explicit('called a synchronizing CUDA operation', UserWarning, "
                 f"{tensor_py!r}, 1150)\n", tensor_py, "exec"), namespace)
    lib = "/opt/torch/.venv/lib/python3.12/site-packages/pytorch_lightning/callbacks/early_stopping.py"
    exec(compile("def check():\n    item()\n", lib, "exec"), namespace)
    exec(compile("def step():\n    check()\n", "/work/project/module.py", "exec"), namespace)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = prof._record_sync
        namespace["step"]()
        warnings.warn("something else", stacklevel=1)
    assert prof._records[0].startswith(
        f"{tensor_py}:1150 (from {lib}:2 check <- /work/project/module.py:2 step <- ")
    assert len(prof._records) == 1  # other warnings are not counted


def test_step_profiler_does_not_count_switching_the_check_on(tmp_path, monkeypatch):
    """Turning the synchronisation check on is reported as a synchronisation; the window leaves it out."""
    import types
    import warnings

    import torch

    def switch(mode):  # what torch 2.11 does when the check is switched on
        if mode:
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", switch)
    prof = StepProfiler(str(tmp_path), start=2, steps=1, sync_steps=2)
    module = types.SimpleNamespace(device=torch.device("cuda"))
    trainer = types.SimpleNamespace(global_step=3)
    prof.on_train_batch_start(trainer, module, batch=[0], idx=0)
    try:
        assert prof._records == []
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)  # one in the step
        assert len(prof._records) == 1
    finally:
        prof._warn.__exit__(None, None, None)
