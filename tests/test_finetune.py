import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data_pipelines.base import BuildOptions, get_source
from data_pipelines.build import build_shards
from mmmat.data.batch import Collator
from mmmat.data.schema import MaterialRecord, RecordError
from mmmat.heads.property import PropertyModel, model_fingerprint, select_labelled

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "finetune" / "tiny.yaml")
ENC = {"name": "crystal/schnet", "hidden": 16, "num_interactions": 3, "cutoff": 4.0, "num_rbf": 8}


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft_shards")
    opts = BuildOptions(xrd=False, image=False, describe=False)
    build_shards(get_source("builtin")(None, limit=48), out, progress=False, options=opts)
    return out


@pytest.fixture
def structures(nacl, gan, triclinic):
    return [nacl, gan, triclinic]


def _args(tmp, shards, *extra, sub="fit"):
    return [sub, "--config", TINY, f"--data.shards={shards}", f"--trainer.default_root_dir={tmp}",
            f"--trainer.logger.init_args.save_dir={tmp}", *extra]


def _batch(structures, cutoff=4.0):
    recs = [MaterialRecord.from_structure(s, f"m{i}") for i, s in enumerate(structures)]
    return Collator(cutoff=cutoff)(recs)


def _records(shards, split):
    from mmmat.data.loader import load_records, split_shards

    return load_records(split_shards(shards, split))


# ---------------------------------------------------------------------------------------------- train.py
def test_tiny_finetune_through_train_py_with_a_target_named_on_the_cli(tmp_path, tiny_shards):
    import train

    cli = train.main(_args(tmp_path, tiny_shards, "--model.init_args.targets=[num_atoms]"))
    assert cli.trainer.global_step == 6  # 48 train materials, batch 16, 2 epochs
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert {"val/num_atoms_mae", "val/num_atoms_rmse", "val/num_atoms_r2", "val/score"} <= set(metrics)
    assert math.isfinite(metrics["train/loss"])
    # normalisation fitted on the train split
    y = np.array([r.properties["num_atoms"] for r in _records(tiny_shards, "train")])
    norm = cli.model.model.normalization["num_atoms"]
    assert norm["mean"] == pytest.approx(y.mean()) and norm["std"] == pytest.approx(y.std())
    # the saved model, and the end-of-fit report of the last validation
    run = Path(cli.trainer.log_dir)
    cfg = json.loads((run / "model" / "config.json").read_text())
    assert [t["name"] for t in cfg["targets"]] == ["num_atoms"]
    assert cfg["normalization"]["num_atoms"]["mean"] == pytest.approx(y.mean())
    assert (run / "parity_val_num_atoms.png").stat().st_size > 1000
    # test through train.py with the checkpoint: parity plot, metrics JSON, predictions
    ckpt = next(run.rglob("*.ckpt"))
    t = train.main(_args(tmp_path / "t", tiny_shards, "--model.init_args.targets=[num_atoms]",
                         f"--ckpt_path={ckpt}", sub="test"))
    out = Path(t.trainer.log_dir)
    doc = json.loads((out / "test_metrics.json").read_text())
    assert doc["num_train_labels"] == 48
    assert doc["normalization"]["num_atoms"]["mean"] == pytest.approx(y.mean())
    pred = pd.read_csv(out / "test_predictions.csv")
    assert len(pred) == 25 and (pred["num_atoms_std"] > 0).all()
    mae = float((pred["num_atoms"] - pred["num_atoms_true"]).abs().mean())
    assert doc["metrics"]["num_atoms_mae"] == pytest.approx(mae, rel=1e-5)
    assert (out / "parity_test_num_atoms.png").stat().st_size > 1000


def test_linear_probe_from_pretrained_leaves_the_encoder_unchanged(tmp_path, tiny_shards):
    import train
    from mmmat.latent.model import MultimodalModel

    torch.manual_seed(0)
    mm = MultimodalModel({"crystal": {**ENC, "cutoff": 5.0}}, embed_dim=8)
    mm.save_pretrained(tmp_path / "pre")
    before = {k: v.clone() for k, v in mm.encoders["crystal"].state_dict().items()}
    cli = train.main(_args(tmp_path, tiny_shards, f"--model.init_args.pretrained={tmp_path / 'pre'}",
                           "--model.init_args.mode=linear_probe", "--model.init_args.max_train_labels=32",
                           "--model.init_args.head_layers=1"))
    model = cli.model.model
    assert cli.trainer.global_step == 4  # 32 labelled materials kept, batch 16, 2 epochs
    assert cli.model.num_train_labels == 32
    after = model.encoder.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert not model.encoder.training  # a frozen encoder stays in eval mode
    # the heads did train, from the pretrained model's encoder whose fingerprint is recorded
    cfg = json.loads((Path(cli.trainer.log_dir) / "model" / "config.json").read_text())
    assert cfg["source"]["fingerprint"] == model_fingerprint(tmp_path / "pre")
    assert cfg["metadata"]["num_train_labels"] == 32 and cfg["encoder"]["hidden"] == 16
    # the same 32 materials as select_labelled picks
    recs = _records(tiny_shards, "train")
    labels = np.array([[r.properties["density"], r.properties["volume_per_atom"]] for r in recs])
    idx = select_labelled(labels, 32, 1.0, 0)
    dens = labels[idx, 0]
    assert model.normalization["density"]["mean"] == pytest.approx(dens.mean())


def test_unknown_target_column_is_a_clear_error(tmp_path, tiny_shards):
    import train

    with pytest.raises(ValueError, match=r"'no_such_column' is not in .*available columns: .*density"):
        train.main(_args(tmp_path, tiny_shards, "--model.init_args.targets=[density, no_such_column]"))


# ---------------------------------------------------------------------------------------------- model
def test_nan_labels_are_masked(structures):
    torch.manual_seed(0)
    model = PropertyModel(ENC, ["a", {"name": "c", "kind": "classification", "num_classes": 3}])
    batch = _batch(structures)
    out = model(batch)
    loss, parts = model.loss(out, torch.full((3, 2), math.nan))
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in parts.values())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)
    # a partly labelled batch: the loss is the mean over the labelled rows only
    labels = torch.tensor([[1.0, 2.0], [math.nan, math.nan], [3.0, 0.0]])
    _, parts = model.loss(model(batch), labels)
    sub = _batch([structures[0], structures[2]])
    _, ref = model.loss(model(sub), labels[[0, 2]])
    assert torch.allclose(parts["a"], ref["a"], atol=1e-6) and torch.allclose(parts["c"], ref["c"], atol=1e-6)
    with pytest.raises(ValueError, match="outside 0..2"):
        model.loss(model(batch), torch.tensor([[1.0, 5.0], [1.0, 0.0], [1.0, 1.0]]))


def test_normalisation_round_trip(structures, tmp_path):
    model = PropertyModel(ENC, ["a", "b"])
    labels = np.array([[1.0, 100.0], [3.0, np.nan], [np.nan, 300.0], [5.0, 200.0]])
    norm = model.fit_normalization(labels)
    assert norm["a"] == {"mean": pytest.approx(3.0), "std": pytest.approx(np.std([1.0, 3.0, 5.0]))}
    assert norm["b"] == {"mean": pytest.approx(200.0), "std": pytest.approx(np.std([100, 300, 200]))}
    y = torch.tensor([1.0, 4.0, -2.0], dtype=torch.float64)
    assert torch.allclose(model.denormalize("b", model.normalize("b", y)), y)
    # a head that outputs 0 (standardised) predicts the train mean, with std in label units
    for name in ("a", "b"):
        last = model.heads[name].net[-1]
        torch.nn.init.zeros_(last.weight)
    pred = model.predict(_batch(structures))
    assert torch.allclose(pred["b"], torch.full((3,), 200.0))
    assert torch.allclose(pred["b_std"], torch.full((3,), norm["b"]["std"]), rtol=1e-4)
    model.save_pretrained(tmp_path / "m")
    assert PropertyModel.from_pretrained(tmp_path / "m").normalization == model.normalization
    with pytest.raises(ValueError, match="no labelled training material for target 'b'"):
        model.fit_normalization(np.array([[1.0, np.nan]]))


def test_partial_unfreezes_only_the_last_blocks(structures):
    from mmmat.tasks.finetune import PropertyFinetuning

    module = PropertyFinetuning(["a"], encoder=ENC, mode="partial", unfreeze_last=1, max_steps=10, lr=0.01,
                                encoder_lr_ratio=0.5, warmup_steps=1)
    model = module.model
    enc = model.encoder
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert all(n.startswith(("blocks.2.", "final_norm", "global_mlp", "head")) for n in trainable)
    assert any(n.startswith("blocks.2.") for n in trainable)
    assert not any(p.requires_grad for m in (enc.embedding, enc.radial, enc.blocks[0], enc.blocks[1])
                   for p in m.parameters())
    opt = module.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert {g["lr"] for g in opt.param_groups} == {0.01, 0.005}
    # one step: frozen blocks unchanged, the last block changed
    frozen = {k: v.clone() for k, v in enc.blocks[1].state_dict().items()}
    last = {k: v.clone() for k, v in enc.blocks[2].state_dict().items()}
    loss, _ = model.loss(model(_batch(structures)), torch.tensor([[1.0], [2.0], [3.0]]))
    loss.backward()
    opt.step()
    assert all(torch.equal(frozen[k], v) for k, v in enc.blocks[1].state_dict().items())
    assert any(not torch.equal(last[k], v) for k, v in enc.blocks[2].state_dict().items())
    with pytest.raises(ValueError, match="unfreeze_last must be in 0..3"):
        model.set_trainable("partial", 4)


def test_partial_on_an_encoder_with_a_diffraction_branch(structures):
    from mmmat.heads.property import PropertyModel

    enc_cfg = {"name": "crystal/schnet_xrd", "hidden": 16, "num_interactions": 2, "cutoff": 4.0, "num_rbf": 8,
               "xrd": {"out_dim": 16, "num_bins": 128, "widths": [4, 8], "depths": [1, 1], "hidden_dim": 16}}
    model = PropertyModel(enc_cfg, ["a"], head_hidden=8)
    model.set_trainable("partial", 1)
    trainable = {n for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert any(n.startswith("gnn.blocks.1.") for n in trainable) and any(n.startswith("fuse") for n in trainable)
    assert not any(n.startswith(("gnn.blocks.0.", "xrd.", "gnn.embedding")) for n in trainable)
    pred = model(_batch(structures))
    assert torch.isfinite(next(iter(pred.values()))).all()


def test_save_load_gives_identical_predictions(structures, tmp_path):
    torch.manual_seed(1)
    model = PropertyModel(ENC, ["a", {"name": "c", "kind": "classification", "num_classes": 4}],
                          regression_loss="l1", head_hidden=8)
    model.fit_normalization(np.array([[1.0, 0.0], [2.0, 1.0]]))
    model.save_pretrained(tmp_path / "m", metadata={"note": "x"})
    back = PropertyModel.from_pretrained(tmp_path / "m")
    p1, p2 = model.eval().predict_records(structures), back.predict_records(structures)
    assert p1.keys() == p2.keys() == {"a", "a_std", "c", "c_prob"}
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)
    assert back.config["loss"]["regression_loss"] == "l1" and back.metadata == {"note": "x"}
    with pytest.raises(FileNotFoundError, match="config.json"):
        PropertyModel.from_pretrained(tmp_path / "nothing")


def test_reset_head_replaces_targets():
    model = PropertyModel(ENC, ["a"])
    model.fit_normalization(np.array([5.0, 7.0]))
    model.reset_head([{"name": "b"}, {"name": "c", "kind": "classification", "num_classes": 2}])
    assert model.target_names == ["b", "c"] and list(model.heads) == ["b", "c"]
    assert model.normalization == {"b": {"mean": 0.0, "std": 1.0}}
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_head([{"name": "c", "kind": "classification"}])
    with pytest.raises(ValueError, match="more than once"):
        model.reset_head(["a", "a"])


def test_select_labelled_is_a_seeded_first_n():
    labels = np.arange(20, dtype=float)
    labels[[3, 7]] = np.nan
    all_idx = select_labelled(labels)
    assert list(all_idx) == [i for i in range(20) if i not in (3, 7)]
    a, b = select_labelled(labels, 5, seed=0), select_labelled(labels, 5, seed=0)
    assert np.array_equal(a, b) and len(a) == 5 and set(a) <= set(all_idx) and list(a) == sorted(a)
    perm = np.random.default_rng(0).permutation(18)[:5]
    assert np.array_equal(a, np.sort(all_idx[perm]))
    assert len(select_labelled(labels, fraction=0.5)) == 9


# ---------------------------------------------------------------------------------------------- predict_files
def test_predict_files_on_cifs(structures, tmp_path):
    from pymatgen.io.cif import CifWriter

    from mmmat.heads.predict import predict_files

    torch.manual_seed(2)
    model = PropertyModel(ENC, ["a"])
    model.fit_normalization(np.array([1.0, 2.0, 4.0]))
    model.save_pretrained(tmp_path / "m")
    files = []
    for i, s in enumerate(structures[:2]):
        f = tmp_path / "cifs" / f"s{i}.cif"
        f.parent.mkdir(exist_ok=True)
        f.write_text(str(CifWriter(s)))
        files.append(f)
    df = predict_files(tmp_path / "m", files, csv=tmp_path / "out.csv")
    assert list(df.columns) == ["file", "formula", "a", "a_std"]
    assert list(df["formula"]) == ["NaCl", "GaN"] and list(df["file"]) == [str(f) for f in files]
    assert (df["a_std"] > 0).all()
    ref = PropertyModel.from_pretrained(tmp_path / "m").predict_records(structures[:2])
    assert np.allclose(df["a"], ref["a"], atol=1e-5)
    assert pd.read_csv(tmp_path / "out.csv").shape == (2, 4)
    # a folder expands to its CIFs
    assert len(predict_files(tmp_path / "m", [tmp_path / "cifs"])) == 2
    bad = tmp_path / "broken.cif"
    bad.write_text("data_x\n_cell_length_a 3.0\nthis is not a CIF loop\n")
    with pytest.raises(RecordError, match="broken.cif"):
        predict_files(tmp_path / "m", [files[0], bad])
    with pytest.raises(FileNotFoundError, match="missing.cif"):
        predict_files(tmp_path / "m", [tmp_path / "missing.cif"])
    # the same through `mmmat predict`
    from typer.testing import CliRunner

    from mmmat.cli import app

    r = CliRunner().invoke(app, ["predict", "--model", str(tmp_path / "m"), "--input", str(files[0]),
                                 "--input", str(files[1]), "--csv", str(tmp_path / "cli.csv")])
    assert r.exit_code == 0, r.output
    assert "NaCl" in r.output and pd.read_csv(tmp_path / "cli.csv").shape == (2, 4)
    r = CliRunner().invoke(app, ["predict", "--model", str(tmp_path / "m"), "--input", str(bad)])
    assert r.exit_code == 2 and "broken.cif" in r.output


def test_cli_predict_errors(tmp_path):
    from typer.testing import CliRunner

    from mmmat.cli import app

    r = CliRunner().invoke(app, ["predict", "--model", str(tmp_path), "--input", str(tmp_path / "x.cif")])
    assert r.exit_code == 2 and "config.json" in r.output


# ---------------------------------------------------------------------------------------------- using the pretraining
def test_encoder_layer_ids():
    from mmmat.tasks.finetune import encoder_layer_id

    assert encoder_layer_id("embedding.weight", 3) == 0 and encoder_layer_id("radial.weight", 3) == 0
    assert encoder_layer_id("blocks.0.lin_in.weight", 3) == 1 and encoder_layer_id("blocks.2.mlp.0.bias", 3) == 3
    assert encoder_layer_id("head.0.weight", 3) == 4 and encoder_layer_id("final_norm.weight", 3) == 4
    assert encoder_layer_id("gnn.blocks.1.filter.weight", 3) == 2 and encoder_layer_id("xrd.stem.0.weight", 3) == 3
    assert encoder_layer_id("fuse.weight", 3) == 4


def test_layer_decay_head_warmup_and_aux_objective_through_train_py(tmp_path, tiny_shards):
    import train

    args = _args(
        tmp_path, tiny_shards, "--model.init_args.targets=[num_atoms]", "--model.init_args.layer_decay=0.5",
        "--model.init_args.encoder_lr_ratio=0.1", "--model.init_args.head_warmup_steps=3",
        "--model.init_args.aux_objectives={masked_atoms: {weight: 0.1}}", "--trainer.max_steps=3",
    )[1:]
    cli = train.main(args, run=False)
    model = cli.model
    n_blocks = len(model.model.encoder.blocks)
    before = {n: p.detach().clone() for n, p in model.model.encoder.named_parameters()}
    # three steps of head-only warm-up: the heads learn, the encoder does not move
    cli.trainer.fit(model, datamodule=cli.datamodule)
    assert model.global_step == 3
    groups = cli.trainer.optimizers[0].param_groups
    enc = sorted({round(g["initial_lr"] / model.hparams.lr, 8) for g in groups if g["part"] == "encoder"})
    assert enc == sorted(round(0.1 * 0.5**k, 8) for k in range(n_blocks + 2))  # one rate per layer, top 0.1
    for n, p in model.model.encoder.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    assert "train/aux_masked_atoms" in cli.trainer.callback_metrics


def test_l2_sp_holds_the_encoder_near_its_pretrained_weights(tmp_path, tiny_shards):
    import train
    from mmmat.latent.model import MultimodalModel
    from mmmat.tasks.finetune import PropertyFinetuning

    torch.manual_seed(0)
    mm = MultimodalModel({"crystal": {**ENC, "cutoff": 5.0}}, embed_dim=8)
    mm.save_pretrained(tmp_path / "pre")

    def run(l2_sp):
        pre = f"--model.init_args.pretrained={tmp_path / 'pre'}"
        cli = train.main(_args(tmp_path / f"l2sp_{l2_sp}", tiny_shards, pre,
                               "--model.init_args.encoder_lr_ratio=1.0", f"--model.init_args.l2_sp={l2_sp}",
                               "--trainer.max_steps=8", "--trainer.max_epochs=4")[1:], run=False)
        model = cli.model
        start = {n: p.detach().clone() for n, p in model.model.encoder.named_parameters()}
        cli.trainer.fit(model, datamodule=cli.datamodule)
        assert model.global_step == 8
        drift = sum(float(((p.detach() - start[n]) ** 2).sum()) for n, p in model.model.encoder.named_parameters())
        decay = {g["weight_decay"] for g in cli.trainer.optimizers[0].param_groups if g["part"] == "encoder"}
        return drift, decay, cli

    free, decay_free, _ = run(0.0)
    held, decay_held, cli = run(100.0)
    assert max(decay_free) > 0 and decay_held == {0.0}  # the penalty replaces the encoder's weight decay
    assert 0 < held < 0.5 * free, (held, free)
    logged = float(cli.trainer.callback_metrics["train/l2_sp"])  # the last step's squared distance
    assert 0 < logged < free
    assert not any(k.startswith("_sp_ref") for k in cli.model.state_dict())  # never saved with the model
    with pytest.raises(ValueError, match="l2_sp"):
        PropertyFinetuning(targets=["density"], encoder=ENC, l2_sp=0.1)  # no pretrained weights to hold on to
    with pytest.raises(ValueError, match="l2_sp"):
        PropertyFinetuning(targets=["density"], pretrained=str(tmp_path / "pre"), l2_sp=-1.0)


def test_shrink_perturb_starts_from_shrunk_pretrained_weights_plus_a_fresh_init(tmp_path):
    from mmmat.encoders import create_encoder
    from mmmat.latent.model import MultimodalModel
    from mmmat.tasks.finetune import PropertyFinetuning

    torch.manual_seed(0)
    mm = MultimodalModel({"crystal": {**ENC, "cutoff": 5.0}}, embed_dim=8)
    mm.save_pretrained(tmp_path / "pre")
    plain = PropertyFinetuning(targets=["density"], pretrained=str(tmp_path / "pre"))
    sp = PropertyFinetuning(targets=["density"], pretrained=str(tmp_path / "pre"), shrink_perturb=[0.4, 0.1], seed=3)
    cfg = dict(plain.model.config["encoder"])
    torch.manual_seed(3)
    fresh = dict(create_encoder(cfg.pop("name"), **cfg).named_parameters())
    moved = 0
    for (name, a), (_, b) in zip(plain.model.encoder.named_parameters(), sp.model.encoder.named_parameters(),
                                 strict=True):
        if a.dim() >= 2:  # weight matrices: 0.4 x pretrained + 0.1 x fresh
            assert torch.allclose(b, 0.4 * a + 0.1 * fresh[name], atol=1e-6), name
            moved += 1
        else:  # biases and norms keep their pretrained values
            assert torch.equal(a, b), name
    assert moved >= 4
    same = PropertyFinetuning(targets=["density"], pretrained=str(tmp_path / "pre"), shrink_perturb=[1.0, 0.0])
    assert all(torch.equal(a, b) for a, b in zip(plain.model.encoder.parameters(), same.model.encoder.parameters(),
                                                  strict=True))
    with pytest.raises(ValueError, match="shrink_perturb needs model.pretrained"):
        PropertyFinetuning(targets=["density"], encoder=ENC, shrink_perturb=[0.5, 0.01])
    with pytest.raises(ValueError, match="shrink_perturb must be"):
        PropertyFinetuning(targets=["density"], pretrained=str(tmp_path / "pre"), shrink_perturb=[0.5])
