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
    import yaml

    saved = yaml.safe_load(next(tmp_path.rglob("config.yaml")).read_text())  # typed encoders, defaults filled in
    xrd = saved["model"]["init_args"]["encoders"]["xrd"]
    assert xrd["class_path"] == "mmmat.encoders.spectrum.XRDCNNEncoderConfig" and xrd["init_args"]["out_dim"] == 32
    assert "kernel_size" in xrd["init_args"]
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


def test_ddp_two_cpu_processes_through_train_py(tmp_path, tiny_shards):
    """The DDP path: two gloo processes on the CPU, launched by Lightning from train.py itself."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = _args(tmp_path, tiny_shards, "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_epochs=2",
                 "--trainer.callbacks+=mmmat.tasks.callbacks.SigtermCheck", "--trainer.callbacks.every_n_steps=2")
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, str(root / "train.py"), *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = (next(tmp_path.rglob("metrics.csv"))).read_text()
    assert "val/xrd_to_crystal_R@1" in metrics
    # 48 train materials over 2 ranks x 16 per batch: 1 step per epoch, every rank the same count; the
    # SIGTERM check every 2 steps keeps the ranks in step
    assert ",0," in metrics or "\n0," in metrics
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_wandb_offline_logging_needs_no_login(tmp_path, tiny_shards, monkeypatch):
    import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cli = train.main(_args(tmp_path, tiny_shards, "--trainer.max_epochs=1",
                           "--trainer.logger=pytorch_lightning.loggers.WandbLogger",
                           "--trainer.logger.init_args.offline=true",
                           f"--trainer.logger.init_args.save_dir={tmp_path}"))
    assert cli.trainer.global_step == 3
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_save_load_round_trip_gives_identical_embeddings(tmp_path, tiny_shards):
    import yaml

    from mmmat.data.loader import load_records, split_shards
    from mmmat.data.tokenizer import build_tokenizer, corpus_from_records
    from mmmat.latent.model import MultimodalModel

    cfg = yaml.safe_load(open(TINY))["model"]["init_args"]
    model = MultimodalModel(cfg["encoders"], embed_dim=cfg["embed_dim"]).eval()
    recs = load_records(split_shards(tiny_shards, "train"))[:6]
    model.tokenizer = build_tokenizer(list(corpus_from_records(recs)), vocab_size=512)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    back = MultimodalModel.from_pretrained(tmp_path / "m").eval()
    structures = [r.to_structure() for r in recs]
    assert torch.equal(model.embed("crystal", structures), back.embed("crystal", structures))
    prof = torch.stack([torch.from_numpy(r.xrd) for r in recs])
    assert torch.equal(model.embed("xrd", prof), back.embed("xrd", prof))
    imgs = [r.image for r in recs]
    assert torch.equal(model.embed("image", imgs), back.embed("image", imgs))
    texts = ["LiCoO2 heated at 900 C in air", "a rocksalt oxide"]
    e1, e2 = model.embed("literature_text", texts), back.embed("literature_text", texts)
    assert torch.equal(e1, e2) and torch.allclose(e1.norm(dim=1), torch.ones(2), atol=1e-5)
    # the file holds tensors only: loading never unpickles
    from safetensors.torch import load_file

    assert all(isinstance(v, torch.Tensor) for v in load_file(str(tmp_path / "m" / "model.safetensors")).values())
    with pytest.raises(FileNotFoundError, match="config.json"):
        MultimodalModel.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="non-empty"):
        back.embed("literature_text", [""])
    with pytest.raises(ValueError, match="1701"):
        back.embed("xrd", torch.zeros(2, 10))


def test_crystal_augment_perturbs_only_slightly(tiny_shards):
    import yaml

    from mmmat.data.batch import Collator
    from mmmat.data.loader import load_records, split_shards
    from mmmat.tasks.pretrain import ContrastivePretraining

    cfg = yaml.safe_load(open(TINY))["model"]["init_args"]
    cfg["encoders"] = {"crystal": cfg["encoders"]["crystal"], "xrd": cfg["encoders"]["xrd"]}
    m = ContrastivePretraining(**cfg, crystal_augment={"displacement": 0.03, "strain": 0.01})
    recs = load_records(split_shards(tiny_shards, "train"))[:8]
    b = Collator(cutoff=5.0)(recs)
    pos0, lat0 = b.crystal.pos.clone(), b.crystal.lattice.clone()
    m._augmented(b)
    dpos = (b.crystal.pos - pos0).norm(dim=1)
    assert 0 < float(dpos.mean()) < 0.5
    assert float((b.crystal.lattice - lat0).abs().max()) <= 0.02 * float(lat0.abs().max()) + 1e-6
    # fractional coordinates follow the moved atoms
    back = torch.bmm(b.crystal.frac_coords.unsqueeze(1), b.crystal.lattice[b.crystal.batch]).squeeze(1)
    assert torch.allclose(back, b.crystal.pos, atol=1e-4)
    with pytest.raises(ValueError, match="unknown keys"):
        ContrastivePretraining(**cfg, crystal_augment={"rotate": 1.0})


def test_augment_config_loops_over_the_registry(tiny_shards):
    """``augment: {modality: kwargs}`` builds each spec's augmenter; xrd_augment / crystal_augment are its entries."""
    import yaml

    from mmmat.data.augment import CrystalAugment, XRDAugment
    from mmmat.data.batch import Collator
    from mmmat.data.loader import load_records, split_shards
    from mmmat.modalities import get_modality
    from mmmat.tasks.pretrain import ContrastivePretraining

    cfg = yaml.safe_load(open(TINY))["model"]["init_args"]
    cfg.pop("xrd_augment", None)
    cfg["encoders"] = {"crystal": cfg["encoders"]["crystal"], "xrd": cfg["encoders"]["xrd"]}
    recs = load_records(split_shards(tiny_shards, "train"))[:8]
    crystal_kw, xrd_kw = {"displacement": 0.03, "strain": 0.01}, {"p_strain": 1.0, "max_strain": 0.02}

    def run(**kw):
        torch.manual_seed(0)
        m = ContrastivePretraining(**cfg, **kw)
        b = Collator(cutoff=5.0)(recs)
        torch.manual_seed(1)
        m._augmented(b)
        return m, b

    old, b_old = run(xrd_augment=xrd_kw, crystal_augment=crystal_kw)
    new, b_new = run(augment={"xrd": xrd_kw, "crystal": crystal_kw})
    assert list(new.augmenters) == list(old.augmenters) == ["crystal", "xrd"]  # the registry's order
    assert isinstance(new.augmenters["crystal"], CrystalAugment) and isinstance(new.augment, XRDAugment)
    assert torch.equal(b_old.crystal.pos, b_new.crystal.pos) and torch.equal(b_old.xrd["profile"], b_new.xrd["profile"])
    clean = Collator(cutoff=5.0)(recs)
    assert not torch.equal(clean.crystal.pos, b_new.crystal.pos)
    assert not torch.equal(clean.xrd["profile"], b_new.xrd["profile"])
    assert torch.equal(clean.xrd["peaks"], b_new.xrd["peaks"])  # profiles re-rendered, peaks kept
    assert not ContrastivePretraining(**cfg, crystal_augment={}).augmenters  # an empty crystal config: nothing
    with pytest.raises(ValueError, match="both given"):
        ContrastivePretraining(**cfg, xrd_augment={}, augment={"xrd": {}})
    with pytest.raises(KeyError, match="unknown modality 'sound'"):
        ContrastivePretraining(**cfg, augment={"sound": {}})
    with pytest.raises(ValueError, match="'image' has no training augmentation"):
        get_modality("image").augmenter()


def test_model_records_the_crystal_encoders_cutoff():
    from mmmat.latent.model import MultimodalModel

    enc = {"crystal": {"name": "crystal/schnet", "hidden": 16, "num_interactions": 1, "cutoff": 6.0, "num_rbf": 8}}
    assert MultimodalModel(enc, embed_dim=8).config["cutoff"] == 6.0
    assert MultimodalModel(enc, embed_dim=8, cutoff=7.0).config["cutoff"] == 7.0
    with pytest.raises(ValueError, match="shorter than the crystal encoder"):
        MultimodalModel(enc, embed_dim=8, cutoff=5.0)


def test_lr_scale_sets_a_learning_rate_per_modality():
    from mmmat.tasks.pretrain import ContrastivePretraining

    enc = {"crystal": {"name": "crystal/schnet", "hidden": 16, "num_interactions": 1, "cutoff": 4.0, "num_rbf": 8},
           "xrd": {"name": "xrd/cnn", "out_dim": 16, "num_bins": 64, "widths": [4], "depths": [1], "hidden_dim": 16}}
    module = ContrastivePretraining(enc, embed_dim=8, lr=0.01, max_steps=10, lr_scale={"xrd": 0.1})
    opt = module.configure_optimizers()["optimizer"]
    lr_of = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}  # before warm-up
    prefixes = ("model.encoders.xrd.", "model.projections.xrd.")
    xrd = [p for n, p in module.named_parameters() if n.startswith(prefixes)]
    rest = [p for n, p in module.named_parameters() if not n.startswith(prefixes)]
    assert xrd and all(lr_of[id(p)] == pytest.approx(0.001) for p in xrd)
    assert rest and all(lr_of[id(p)] == pytest.approx(0.01) for p in rest)
    assert len(lr_of) == sum(1 for p in module.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="lr_scale names modalities without an encoder"):
        ContrastivePretraining(enc, embed_dim=8, lr_scale={"image": 0.5})


def test_run_dir_moves_every_output_and_prints_a_summary(tmp_path, tiny_shards, monkeypatch, capsys):
    import train

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run = tmp_path / "run"
    train.main(["fit", "--config", TINY, f"--data.shards={tiny_shards}", f"--run_dir={run}",
                "--trainer.max_epochs=1"])
    assert (run / "model" / "config.json").is_file() and (run / "tokenizer").is_dir()
    assert list((run / "pretrain").rglob("metrics.csv")) and list(run.rglob("config.yaml"))
    assert not any(cwd.rglob("*"))  # nothing under the config's own runs/tiny
    out = capsys.readouterr().out
    assert "val/loss" in out and f"model -> {run / 'model'}" in out


def test_mixture_augment_and_multilabel_objective(tmp_path, tiny_shards):
    import train
    from mmmat.data.augment import XRDAugment

    gen = torch.Generator().manual_seed(0)
    peaks = torch.zeros(6, 4, 2)
    peaks[..., 0] = torch.rand(6, 4, generator=gen) * 3 + 1.0
    peaks[..., 1] = 100.0
    aug = XRDAugment(p_mixture=1.0, mixture_phases=3, instrument={"counts": [1e3, 1e4]})
    prof, params = aug(peaks=peaks, generator=gen, return_params=True)
    m = params["mixture"]
    assert prof.shape == (6, 1701) and torch.isfinite(prof).all()
    assert torch.allclose(m.sum(1), torch.ones(6)) and (m.diagonal() >= 0.5).all()
    assert ((m > 0).sum(1) >= 2).all()  # every row mixed with at least one other member
    cli = train.main(_args(tmp_path, tiny_shards, '--model.init_args.xrd_augment={"p_mixture": 0.5, "instrument": {}}',
                           "--model.init_args.mixture_loss_weight=0.5", "--trainer.max_epochs=1"))
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert "train/loss_mixture" in metrics and metrics["train/loss_mixture"] > 0
    assert "val/xrd_to_crystal_R@1" in metrics


def test_shipped_configs_stop_a_run_whose_loss_is_not_finite(tmp_path, tiny_shards, monkeypatch):
    # the mp20p configs carry an EarlyStopping(check_finite) entry: a NaN loss ends the run at its epoch's end
    import yaml

    import train
    from mmmat.latent.losses import MultimodalContrastiveLoss

    shipped = yaml.safe_load(open(Path(TINY).parent / "mp20p.yaml"))["trainer"]["callbacks"]
    guard = [c for c in shipped if c["class_path"].endswith("EarlyStopping")]
    assert guard and guard[0]["init_args"]["check_finite"]
    tiny = yaml.safe_load(open(TINY))["trainer"].get("callbacks") or []
    extra = tmp_path / "guard.yaml"
    extra.write_text(yaml.safe_dump({"trainer": {"callbacks": tiny + guard}}))
    forward = MultimodalContrastiveLoss.forward

    def nan_loss(self, *args, **kwargs):
        loss, logs = forward(self, *args, **kwargs)
        return loss * float("nan"), logs

    monkeypatch.setattr(MultimodalContrastiveLoss, "forward", nan_loss)
    cli = train.main(_args(tmp_path, tiny_shards, "--config", str(extra), "--trainer.max_epochs=4",
                           "--trainer.limit_val_batches=0"))
    assert cli.trainer.global_step == 3  # stopped after the first epoch (48 materials, batch 16), not 12 steps


def test_cuda_graphs_off_cuda_runs_the_plain_step_and_says_why(tmp_path, tiny_shards):
    """The shipped mp20p engine (cuda_graphs on) on a CPU trainer: the plain step runs, with a warning naming why."""
    import train

    engine = "--model.init_args.engine={cuda_graphs: true, compile_pattern_cnn: false}"
    with pytest.warns(UserWarning, match="cuda_graphs: the plain step runs .*CUDA"):
        cli = train.main(_args(tmp_path, tiny_shards, engine, "--trainer.max_steps=2"))
    assert cli.model._static is None and cli.trainer.global_step == 2
    assert torch.isfinite(torch.tensor(float(cli.trainer.callback_metrics["train/loss"])))
