"""Scale-out: FSDP2 sharding on 2 CPU processes (gloo), the torchrun and SLURM launch scripts, LR scaling."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = ROOT / "configs" / "launch" / "torchrun_pretrain.sh"
SBATCH = ROOT / "configs" / "launch" / "slurm_pretrain.sbatch"
WORLD = 2
ENCODERS = {
    "crystal": {"name": "crystal/schnet", "hidden": 16, "num_interactions": 2, "cutoff": 4.0, "num_rbf": 8},
    "xrd": {"name": "xrd/cnn", "out_dim": 16, "num_bins": 128, "widths": [4, 8], "depths": [1, 1], "hidden_dim": 16},
}


def _batch(rank: int):
    from mmmat.data.batch import Collator
    from mmmat.data.schema import MaterialRecord

    rng = np.random.default_rng(rank)
    recs = [MaterialRecord(f"r{rank}-{i}", np.eye(3) * (3.6 + 0.3 * i + 0.1 * rank), [[0, 0, 0], [0.5, 0.5, 0.5]],
                           [11, 17], xrd=rng.random(1701).astype(np.float32)) for i in range(4)]
    return Collator(cutoff=4.0)(recs)


class _Task(torch.nn.Module):
    """What apply_fsdp reads from ContrastivePretraining (model, loss, device_mesh), without Lightning."""

    def __init__(self):
        from mmmat.latent.losses import MultimodalContrastiveLoss
        from mmmat.latent.model import MultimodalModel

        super().__init__()
        self.model = MultimodalModel(ENCODERS, embed_dim=8)
        self.loss = MultimodalContrastiveLoss()
        self.device_mesh = None


def _fsdp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        from mmmat.tasks.fsdp import apply_fsdp, unsharded_state_dict

        batch = _batch(rank)  # a different batch on every rank
        torch.manual_seed(0)
        ref = _Task().eval()
        torch.manual_seed(0)
        fs = _Task().eval()
        # the mesh Lightning's ModelParallelStrategy builds on one node: (1 node, 2 devices)
        fs.device_mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("data_parallel", "tensor_parallel"))
        units = apply_fsdp(fs)
        full_before = unsharded_state_dict(fs.model)
        out = {"units": units, "loss": {}, "grad": {}}
        for name, m in (("ref", ref), ("fsdp", fs)):
            emb = m.model(batch, modalities=m.model.modalities)
            loss, _ = m.loss(emb, {k: batch.present[k] for k in emb})
            loss.backward()
            out["loss"][name] = loss.detach()
            grads = {}
            for n, p in m.named_parameters():
                g = p.grad
                if isinstance(g, DTensor):
                    g = g.full_tensor()  # FSDP reduce-scatters the rank-averaged gradient
                elif name == "ref":  # DDP's average over ranks
                    g = g.clone()
                    dist.all_reduce(g)
                    g /= world
                grads[n] = g.detach().clone()
            out["grad"][name] = grads
        out["sharded"] = {n: (tuple(p.to_local().shape), tuple(p.shape)) for n, p in fs.named_parameters()
                          if isinstance(p, DTensor)}
        out["replicated"] = [n for n, p in fs.named_parameters() if not isinstance(p, DTensor)]
        if rank == 0:
            ref_sd = ref.model.state_dict()
            out["state_dict_equal"] = sorted(full_before) == sorted(ref_sd) and all(
                torch.equal(full_before[k], ref_sd[k]) for k in ref_sd)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_fsdp_worker, args=(WORLD, str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_fsdp_on_two_cpu_processes_equals_ddp(fsdp_results):
    """FSDP2 over 2 gloo processes: every model parameter sharded in half, same loss as the unsharded model,
    and the same gradients as DDP's rank average (atol 1e-6, rtol 1e-5: only the order of the sums differs)."""
    for r in fsdp_results:
        # crystal: 2 interaction blocks + encoder; xrd: 2 stages + 2 position projections + encoder;
        # 2 projections; the model root
        assert r["units"] == 3 + 5 + 2 + 1
        assert r["replicated"] == ["loss.logit_scale.log_scale"]  # a scalar: replicated, gradient averaged
        assert len(r["sharded"]) == len(r["grad"]["ref"]) - 1
        for local, full in r["sharded"].values():
            assert local[0] == -(-full[0] // WORLD) or local[0] == full[0] // WORLD  # dim 0 split in two
        assert torch.isfinite(r["loss"]["ref"]) and float(r["loss"]["ref"]) > 0
        torch.testing.assert_close(r["loss"]["fsdp"], r["loss"]["ref"], atol=1e-6, rtol=1e-5)
        assert r["grad"]["fsdp"].keys() == r["grad"]["ref"].keys()
        for n, g in r["grad"]["ref"].items():
            torch.testing.assert_close(r["grad"]["fsdp"][n], g, atol=1e-6, rtol=1e-5, msg=n)
    # the losses differ between ranks (different batches) but the averaged gradients agree
    assert float(fsdp_results[0]["loss"]["ref"]) != float(fsdp_results[1]["loss"]["ref"])
    assert fsdp_results[0]["state_dict_equal"]  # gathering the shards gives back the full weights


def test_shard_mesh_picks_fsdp_or_hsdp():
    from mmmat.tasks.fsdp import shard_mesh

    class Dim:
        def __init__(self, n):
            self.n = n

        def size(self):
            return self.n

    class Mesh:
        ndim = 2

        def __init__(self, dp, tp):
            self.dims = {"data_parallel": Dim(dp), "tensor_parallel": Dim(tp)}

        def __getitem__(self, k):
            return self.dims[k]

    one_node = Mesh(1, 8)
    assert shard_mesh(one_node) is one_node["tensor_parallel"]  # FSDP over the node's 8 devices
    flat = Mesh(16, 1)
    assert shard_mesh(flat) is flat["data_parallel"]  # FSDP over all 16 ranks
    nodes = Mesh(2, 8)
    assert shard_mesh(nodes) is nodes  # HSDP: replicated over 2 nodes, sharded over 8 devices


# ---------------------------------------------------------------------------------------- launch scripts
@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from data_pipelines.base import BuildOptions, get_source
    from data_pipelines.build import build_shards

    out = tmp_path_factory.mktemp("tiny_shards")
    build_shards(get_source("builtin")(None, limit=48), out, shard_size=8, progress=False,
                 options=BuildOptions(describe=True))  # 6 train shards, 4 val: >= 2 ranks when streaming
    return out


def _dry_run(script: Path, env: dict, *args: str) -> list[str]:
    """The command a launch script would run (DRY_RUN=1), as an argument list."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NODE_RANK",
                                                                       "NPROC_PER_NODE", "CONFIG"))}
    r = subprocess.run(["bash", str(script), *args], env={**clean, "DRY_RUN": "1", "PYTHON": sys.executable, **env},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return shlex.split(r.stdout)


def _train_args(cmd: list[str]) -> list[str]:
    """Arguments after ``train.py fit``."""
    i = cmd.index("train.py")
    assert cmd[i + 1] == "fit"
    return cmd[i + 2:]


def _print_config(args: list[str], capsys) -> dict:
    import yaml

    import train

    with pytest.raises(SystemExit) as e:
        train.main(["fit", *args, "--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_torchrun_script_dry_run_parses(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    # one node, no GPU here: --standalone with one process
    cmd = _dry_run(TORCHRUN, {})
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--standalone" in cmd
    assert "--nproc-per-node=1" in cmd
    # node 1 of a 2-node SLURM allocation running the script once per node: node rank, size and rendezvous
    # host come from the SLURM variables (host: the first of the node list, as Lightning resolves it)
    slurm = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_NTASKS": "2",
             "NPROC_PER_NODE": "4", "PATH": "/usr/bin:/bin"}
    url = "pipe:aws s3 cp s3://bucket/mp20p/train/shard-{000000..000278}.tar -"
    cmd = _dry_run(TORCHRUN, slurm, f"--data.urls.train={url}")
    for flag in ("--nnodes=2", "--node-rank=1", "--master-addr=gpu017", "--master-port=29500", "--nproc-per-node=4"):
        assert flag in cmd, (flag, cmd)
    from lightning_fabric.plugins.environments import SLURMEnvironment

    for nodes in ("gpu[017-018]", "node1,node2", "a[3,5-7],b[1-2]", "single"):
        first = SLURMEnvironment.resolve_root_node_address(nodes)
        assert f"--master-addr={first}" in _dry_run(TORCHRUN, {**slurm, "SLURM_JOB_NODELIST": nodes})
    args = _train_args(cmd)
    assert args[:2] == ["--config", "configs/pretrain/mp20p_multinode.yaml"]
    assert "--trainer.num_nodes=2" in args and "--trainer.devices=4" in args
    cfg = _print_config(args, capsys)  # train.py parses the config and the overrides
    assert cfg["trainer"]["num_nodes"] == 2 and str(cfg["trainer"]["devices"]) == "4"
    assert cfg["data"]["urls"] == {"train": url} and cfg["data"]["mode"] == "stream"
    assert any(c["class_path"].endswith("ScaleLearningRate") for c in cfg["trainer"]["callbacks"])


def test_slurm_script_dry_run_and_lightning_slurm_environment(capsys, monkeypatch, tiny_shards, tmp_path):
    from lightning_fabric.plugins.environments import SLURMEnvironment

    import train

    monkeypatch.chdir(ROOT)
    job = {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "81234",
           "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_NODELIST": "node[07-08]", "SLURM_JOB_NAME": "mmmat-pretrain",
           "SLURM_SUBMIT_DIR": str(ROOT)}
    cmd = _dry_run(SBATCH, job)
    assert cmd[:2] == ["srun", "--kill-on-bad-exit=1"] and cmd[2] == sys.executable
    args = _train_args(cmd)
    assert args == ["--config", "configs/pretrain/mp20p_multinode.yaml", "--trainer.num_nodes=2",
                    "--trainer.devices=2"]
    cfg = _print_config(args, capsys)
    assert cfg["trainer"]["strategy"]["class_path"].endswith("DDPStrategy")
    assert _print_config(_train_args(_dry_run(SBATCH, {**job, "CONFIG": "configs/pretrain/mp20p_fsdp.yaml"})),
                         capsys)["trainer"]["strategy"]["class_path"].endswith("ModelParallelStrategy")
    # outside a job the script refuses with a clear message
    r = subprocess.run(["bash", str(SBATCH)], env={"PATH": os.environ["PATH"], "DRY_RUN": "1"}, capture_output=True,
                       text=True)
    assert r.returncode != 0 and "not in a SLURM job" in r.stderr
    # what the 4th task (node 1, local rank 1) that srun starts sees: Lightning takes rank, node, address and
    # port from SLURM and checks devices and num_nodes against the job (tiny model, CPU "devices")
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "x")
        monkeypatch.delenv(k)
    for k, v in {**job, "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
                 "SLURM_NODEID": "1"}.items():
        monkeypatch.setenv(k, v)
    cmd = _dry_run(SBATCH, {**job, "CONFIG": "configs/pretrain/tiny.yaml"}, "--trainer.accelerator=cpu",
                   f"--data.shards={tiny_shards}", f"--data.tokenizer={tmp_path}/tok",
                   f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}")
    trainer = train.main(_train_args(cmd), run=False).trainer
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment)
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 2, 4)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (3, 1, 1)
    assert env.main_address == "node07" and env.main_port == 15000 + 1234
    # the check Lightning makes when fit starts: the script's devices and num_nodes match the job
    env.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
    with pytest.raises(ValueError, match="ntasks-per-node=2"):
        env.validate_settings(num_devices=3, num_nodes=2)


def test_torchrun_fsdp_two_cpu_processes_through_train_py(tiny_shards, tmp_path):
    """torchrun starts 2 gloo processes; Lightning (TorchElasticEnvironment, ModelParallelStrategy) trains the
    tiny model with FSDP2 on shards streamed through ``pipe:cat`` URLs and split by node, writes a sharded
    checkpoint and the whole model."""
    from safetensors.torch import load_file

    from mmmat.latent.model import MultimodalModel

    env = {"NPROC_PER_NODE": "2", "CONFIG": "configs/pretrain/tiny_fsdp.yaml", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    n_train = len(list((tiny_shards / "train").glob("*.tar")))
    train_urls = f"pipe:cat {tiny_shards}/train/shard-{{000000..{n_train - 1:06d}}}.tar"
    args = [f"--data.shards={tiny_shards}", f"--data.tokenizer={tmp_path}/tok", "--trainer.max_epochs=1",
            "--data.mode=stream", f"--data.urls.train={train_urls}", "--trainer.limit_train_batches=1.0",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--model.init_args.save_dir={tmp_path}/model"]
    r = subprocess.run(["bash", str(TORCHRUN), *args], env={**clean, **env, "PYTHON": sys.executable},
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "FSDP: " in out and "units sharded" in out
    assert "ScaleLearningRate: global batch 32 (16 x 2 ranks x 1 accumulated), lr 0.001 at 16 -> 0.00141421" in out
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "train/loss" in metrics and "val/xrd_to_crystal_R@1" in metrics
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts and all(c.is_dir() for c in ckpts)  # one shard file per rank
    # the model on disk is whole: every tensor has the shape of an unsharded model's
    model = MultimodalModel.from_pretrained(tmp_path / "model")
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert saved.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert saved[k].shape == v.shape and torch.isfinite(saved[k]).all(), k


def test_scale_learning_rate_rules():
    from types import SimpleNamespace

    from pytorch_lightning.utilities.parsing import AttributeDict

    from mmmat.tasks.callbacks import ScaleLearningRate

    dm = SimpleNamespace(hparams=SimpleNamespace(batch_size=256))
    trainer = SimpleNamespace(datamodule=dm, world_size=16, accumulate_grad_batches=2)
    module = SimpleNamespace(hparams=AttributeDict(lr=0.002))
    cb = ScaleLearningRate(base_batch=256, rule="linear")
    cb.setup(trainer, module, "fit")
    assert cb.global_batch == 8192 and module.hparams.lr == pytest.approx(0.064)
    cb.setup(trainer, module, "fit")  # a second fit scales from the configured rate, not again
    assert module.hparams.lr == pytest.approx(0.064)
    module = SimpleNamespace(hparams=AttributeDict(lr=0.002))
    ScaleLearningRate(base_batch=256).setup(trainer, module, "fit")
    assert module.hparams.lr == pytest.approx(0.002 * 32 ** 0.5)
    with pytest.raises(ValueError, match="sqrt"):
        ScaleLearningRate(rule="cubic")


def test_shard_units_put_nested_blocks_first():
    from torch import nn

    from mmmat.tasks.fsdp import shard_units

    inner = nn.ModuleList([nn.Linear(2, 2), nn.Identity()])
    outer_block = nn.Module()
    outer_block.inner, outer_block.lin = inner, nn.Linear(2, 2)
    enc = nn.Module()
    enc.blocks = nn.ModuleList([outer_block])
    model = nn.Module()
    model.encoders = nn.ModuleDict({"x": enc})
    model.projections = nn.ModuleDict({"x": nn.Linear(2, 2)})
    units = shard_units(model)
    # children before parents (fully_shard needs that); blocks without parameters are left out
    assert units == [inner[0], outer_block, enc, model.projections["x"]]
