import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmmat.data.batch import crystal_batch
from mmmat.data.schema import MaterialRecord
from mmmat.encoders import create_encoder
from mmmat.latent.objectives import OBJECTIVES, create_objective

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml")


def _crystals(structures, rotation=None, shift=None):
    recs = [MaterialRecord.from_structure(s, f"m{i}") for i, s in enumerate(structures)]
    lat = torch.tensor(np.stack([r.lattice for r in recs]), dtype=torch.float64)
    if rotation is not None:
        lat = lat @ rotation.T
    frac = torch.tensor(np.concatenate([r.frac_coords for r in recs]), dtype=torch.float64)
    if shift is not None:
        frac = frac + shift
    z = torch.tensor(np.concatenate([r.numbers for r in recs]), dtype=torch.long)
    counts = torch.tensor([r.num_atoms for r in recs])
    return crystal_batch(z, frac.float(), lat.float(), counts, cutoff=5.0)


def _rotation(seed=0):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_objectives_are_registered():
    assert {"denoise", "masked_atoms"} <= set(OBJECTIVES)
    with pytest.raises(ValueError, match="unknown objective"):
        create_objective("denoising", hidden=8, cutoff=5.0)


def test_denoising_target_is_the_displacement_over_sigma(nacl, gan):
    obj = create_objective("denoise", hidden=16, cutoff=5.0, sigma_min=0.05, sigma_max=0.2)
    c = _crystals([nacl, gan])
    noisy, target = obj.corrupt(c, generator=torch.Generator().manual_seed(0))
    disp = noisy.pos - c.pos
    sigma = disp.norm(dim=1) / target["target"].norm(dim=1)
    for b in range(2):  # one σ per crystal, inside the range
        s = sigma[c.batch == b]
        assert torch.allclose(s, s[0].expand_as(s), rtol=1e-4) and 0.05 - 1e-6 <= float(s[0]) <= 0.2 + 1e-6
    # fractional coordinates follow the positions; the graph (offsets) is kept; the original is untouched
    assert torch.allclose(torch.bmm(noisy.frac_coords.unsqueeze(1), noisy.lattice[noisy.batch]).squeeze(1), noisy.pos,
                          atol=1e-4)
    assert torch.equal(noisy.edge_index, c.edge_index) and not torch.equal(noisy.pos, c.pos)


def test_denoising_head_is_equivariant_and_the_encoder_invariant(nacl, gan, triclinic):
    torch.manual_seed(0)
    enc = create_encoder("crystal/schnet", hidden=16, num_interactions=2, cutoff=5.0, num_rbf=8)
    obj = create_objective("denoise", hidden=16, cutoff=5.0)
    rot = _rotation()
    a = _crystals([nacl, gan, triclinic])
    b = _crystals([nacl, gan, triclinic], rotation=rot)
    ha, hb = enc.node_features(a), enc.node_features(b)
    assert torch.allclose(ha, hb, atol=1e-4)  # atom features invariant
    pa, pb = obj.predict(a, ha), obj.predict(b, hb)
    assert pa.abs().max() > 1e-4
    assert torch.allclose(pa @ rot.T.float(), pb, atol=1e-4)  # the predicted displacement rotates
    t = _crystals([nacl, gan, triclinic], shift=torch.tensor([0.13, -0.2, 0.05], dtype=torch.float64))
    assert torch.allclose(obj.predict(t, enc.node_features(t)), pa, atol=1e-4)  # translation invariant


def test_masked_atoms_masks_every_crystal_and_learns(nacl, gan):
    torch.manual_seed(0)
    enc = create_encoder("crystal/schnet", hidden=16, num_interactions=2, cutoff=5.0, num_rbf=8)
    obj = create_objective("masked_atoms", hidden=16, cutoff=5.0, mask_fraction=0.2)
    c = _crystals([nacl, gan])
    masked, target = obj.corrupt(c, generator=torch.Generator().manual_seed(1))
    m = target["mask"]
    for b in range(2):
        assert bool(m[c.batch == b].any())
    assert bool((masked.z[m] == 0).all()) and torch.equal(masked.z[~m], c.z[~m]) and torch.equal(target["z"], c.z)
    opt = torch.optim.Adam([*enc.parameters(), *obj.parameters()], lr=1e-2)
    first = None
    for _ in range(30):
        loss = obj.loss(masked, enc.node_features(masked), target)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first
    assert float(obj.accuracy(masked, enc.node_features(masked), target)) == 1.0
    # invariant logits: the same prediction for a rotated crystal
    r = _crystals([nacl, gan], rotation=_rotation(3))
    r_masked = r.clone()
    r_masked.z = masked.z
    la = obj.head(enc.node_features(masked))
    lb = obj.head(enc.node_features(r_masked))
    assert torch.allclose(la, lb, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from data_pipelines.base import BuildOptions, get_source
    from data_pipelines.build import build_shards

    out = tmp_path_factory.mktemp("obj_shards")
    build_shards(get_source("builtin")(None, limit=32), out, progress=False, options=BuildOptions(describe=True))
    return out


def test_pretraining_with_objectives_through_train_py(tmp_path, tiny_shards):
    import train

    cli = train.main([
        "fit", "--config", TINY, f"--data.shards={tiny_shards}", f"--data.tokenizer={tmp_path}/tok",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--model.init_args.save_dir={tmp_path}/model", "--trainer.max_epochs=1",
        "--model.init_args.objectives={denoise: {weight: 1.0}, masked_atoms: {weight: 0.5, mask_fraction: 0.2}}",
        "--model.init_args.save_heads=true", "--model.init_args.feature_spread={weight: 0.5}",
    ])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert 0.0 <= metrics["train/loss/feature_correlation"] <= 1.0
    assert math.isfinite(metrics["train/loss/feature_variance"])
    assert math.isfinite(metrics["train/loss/objective_denoise"])
    assert math.isfinite(metrics["train/loss/objective_masked_atoms"])
    model_dir = tmp_path / "model"
    assert (model_dir / "objectives.safetensors").exists()
    assert set(json.loads((model_dir / "objectives.json").read_text())) == {"denoise", "masked_atoms"}
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:  # the model never carries the heads
        assert not [k for k in f.keys() if "objective" in k or k.startswith(("denoise", "masked_atoms"))]
    from mmmat.latent.model import MultimodalModel

    assert MultimodalModel.from_pretrained(model_dir).modalities


def test_feature_spread_is_small_for_spread_features_and_large_for_collapsed_ones():
    from mmmat.latent.losses import feature_spread_loss

    g = torch.Generator().manual_seed(0)
    spread = torch.randn(4096, 16, generator=g)
    loss, terms = feature_spread_loss(spread)
    assert terms["variance"] < 0.05 and terms["correlation"] < 0.01
    collapsed = (torch.randn(4096, 1, generator=g) @ torch.randn(1, 16, generator=g)) * 0.1  # rank 1, small
    collapsed = collapsed.requires_grad_()
    loss_c, terms_c = feature_spread_loss(collapsed)
    assert terms_c["correlation"] > 0.8 and terms_c["variance"] > 0.5 and loss_c > 10 * loss
    loss_c.backward()
    assert torch.isfinite(collapsed.grad).all() and collapsed.grad.abs().sum() > 0


def test_feature_spread_rejects_unknown_options():
    from mmmat.tasks.pretrain import ContrastivePretraining

    enc = {"crystal": {"name": "crystal/schnet", "hidden": 16, "num_interactions": 1, "num_rbf": 8}}
    with pytest.raises(ValueError, match="feature_spread: unknown options"):
        ContrastivePretraining(enc, embed_dim=8, feature_spread={"weight": 1.0, "beta": 2.0})


def test_contrastive_loss_with_every_pair_weighted_zero_is_inactive_and_zero():
    from mmmat.latent.losses import MultimodalContrastiveLoss

    emb = {m: torch.nn.functional.normalize(torch.randn(4, 8), dim=1) for m in ("crystal", "xrd", "image")}
    off = MultimodalContrastiveLoss(anchor="crystal", weights={"xrd": 0.0, "image": 0.0})
    assert off.inactive(list(emb))
    assert float(off(emb)[0]) == 0.0
    assert not MultimodalContrastiveLoss(anchor="crystal", weights={"xrd": 0.0}).inactive(list(emb))


def test_structural_only_pretraining_runs_the_crystal_graph_branch_alone(tmp_path, tiny_shards):
    """Every contrastive pair weighted 0: only the crystal encoder's graph branch and the heads train."""
    import train
    from mmmat.latent.model import MultimodalModel

    cli = train.main([
        "fit", "--config", TINY, f"--data.shards={tiny_shards}", f"--data.tokenizer={tmp_path}/tok",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--model.init_args.save_dir={tmp_path}/model", "--trainer.max_epochs=1", "--trainer.max_steps=2",
        "--model.init_args.objectives={denoise: {weight: 1.0}, masked_atoms: {weight: 0.5}}",
        "--model.init_args.loss_weights={xrd: 0.0, image: 0.0, literature_text: 0.0}",
    ])
    module = cli.model
    assert module._structural_only()
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert math.isfinite(metrics["train/loss/objective_denoise"])
    assert not any(k.startswith("train/loss/crystal-") for k in metrics)  # no contrastive pair was computed
    torch.manual_seed(0)  # the initial weights, as train.py's seed_everything(0) drew them
    fresh = type(module)(**{k: v for k, v in module.hparams.items() if not k.startswith("_")})
    moved = {name for name, p in module.model.named_parameters()
             if not torch.equal(p.detach().cpu(), dict(fresh.model.named_parameters())[name].detach())}
    assert moved and all(name.startswith("encoders.crystal.") for name in moved)
    assert MultimodalModel.from_pretrained(tmp_path / "model").modalities
