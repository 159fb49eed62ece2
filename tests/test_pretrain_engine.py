"""The pretraining engine's optimisations change nothing that the step computes.

Tolerance: float32 on the CPU. Losses agree to 1e-6 (relative) and every gradient to 1e-5 relative to the
largest entry of that gradient; the graphs (edges, offsets) are identical and distances agree to 1e-6 Å.
"""

import copy

import pytest
import torch

from data_pipelines.base import BuildOptions, get_source
from data_pipelines.build import build_shards

ENCODERS = {
    "crystal": {"name": "crystal/schnet_xrd", "hidden": 32, "num_interactions": 2, "cutoff": 5.0, "num_rbf": 16,
                "xrd": {"out_dim": 32, "num_bins": 256, "widths": [8, 16], "depths": [1, 1], "hidden_dim": 32}},
    "xrd": {"name": "xrd/cnn", "out_dim": 32, "num_bins": 256, "widths": [8, 16], "depths": [1, 1],
            "hidden_dim": 32},
    "literature_text": {"name": "text/transformer", "vocab_size": 300, "hidden": 32, "layers": 1, "heads": 2,
                        "intermediate": 64, "out_dim": 32, "max_position": 128},
}
OFF = {"precompute_patterns": False, "sync_free": False, "fused_adamw": False, "compile": False}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine_shards")
    build_shards(get_source("builtin")(None, limit=40), out, progress=False, options=BuildOptions(describe=True))
    return out


def _data(shards, **kw):
    from mmmat.tasks.datamodule import MultimodalDataModule

    return MultimodalDataModule(str(shards), batch_size=16, mode="resident", cutoff=5.0, num_workers=0,
                                include_generated_text=True, max_text_tokens=64, **kw)


def test_precomputed_graph_is_the_same_graph(shards):
    plain = _data(shards).resident("train", device="cpu")
    fast = _data(shards, precompute_graph=True).resident("train", device="cpu")
    idx = torch.tensor([5, 0, 17, 3, 29, 11, 8])
    a, b = plain.batch(idx).crystal, fast.batch(idx).crystal
    assert a.edge_index.shape[1] > 100
    assert torch.equal(a.edge_index, b.edge_index)
    assert torch.equal(a.cell_offset, b.cell_offset)
    assert torch.allclose(a.edge_dist, b.edge_dist, atol=1e-6)


def test_edge_capacity_pads_and_grows_never_truncates(shards):
    data = _data(shards, precompute_graph=True, edge_capacity=64).resident("train", device="cpu")
    ref = _data(shards).resident("train", device="cpu")
    idx = torch.arange(12)
    real = ref.batch(idx).crystal
    n = real.edge_index.shape[1]
    assert n > 64
    c = data.batch(idx).crystal
    assert data.capacity_grown == 1 and data.edge_capacity >= n and data.edge_capacity % 4096 == 0
    assert c.edge_index.shape[1] == data.edge_capacity  # padded to the (grown) capacity
    assert torch.equal(c.edge_index[:, :n], real.edge_index)  # every real edge kept, in order
    assert bool((c.edge_dist[n:] > 1000.0).all())  # padding lies beyond any cutoff
    # a smaller batch fits: same capacity, nothing grows
    assert data.batch(torch.arange(3)).crystal.edge_index.shape[1] == data.edge_capacity
    assert data.capacity_grown == 1


def test_padding_edges_change_no_embedding(shards):
    from mmmat.encoders import create_encoder

    torch.manual_seed(0)
    enc = create_encoder("crystal/schnet", hidden=32, num_interactions=2, cutoff=5.0, num_rbf=16)
    exact = _data(shards, precompute_graph=True).resident("train", device="cpu")
    padded = _data(shards, precompute_graph=True, edge_capacity=40_000).resident("train", device="cpu")
    idx = torch.arange(10)
    assert torch.allclose(enc(exact.batch(idx)), enc(padded.batch(idx)), atol=1e-6)


def _module(engine):
    from mmmat.tasks.pretrain import ContrastivePretraining

    torch.manual_seed(0)
    return ContrastivePretraining(ENCODERS, embed_dim=32, xrd_augment={}, engine=engine)


def _loss_and_grads(module, batch, seed):
    torch.manual_seed(seed)
    module.zero_grad()
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_optimised_step_equals_plain_step(shards):
    dm_plain, dm_fast = _data(shards), _data(shards, precompute_graph=True)
    plain, fast = _module(OFF), _module({"fused_adamw": False})  # fused AdamW needs CUDA
    fast.load_state_dict(copy.deepcopy(plain.state_dict()))
    for m, dm in ((plain, dm_plain), (fast, dm_fast)):
        m.model.tokenizer = None
        m._precompute_patterns(dm)
        if m.engine["sync_free"]:
            m.model.encoders["literature_text"].full_attention_mask = True
    assert "computed_xrd" in dm_fast.resident("train").crystal_features
    assert not dm_plain.resident("train").crystal_features
    idx = torch.tensor([3, 1, 4, 15, 9, 2, 6, 5, 35, 8, 27, 0])
    for seed in (0, 1):
        a, b = dm_plain.resident("train").batch(idx), dm_fast.resident("train").batch(idx)
        assert b.rows["literature_text"].numel() >= 1 and not a.rows == {}
        la, ga = _loss_and_grads(plain, a, seed)
        lb, gb = _loss_and_grads(fast, b, seed)
        assert torch.isfinite(la) and torch.allclose(la, lb, rtol=1e-6, atol=1e-7), (la, lb)
        assert ga.keys() == gb.keys() and len(ga) > 20
        for name in ga:
            scale = ga[name].abs().max().clamp_min(1e-12)
            assert ((ga[name] - gb[name]).abs().max() / scale) < 1e-5, name


def test_unknown_engine_option_is_an_error():
    from mmmat.tasks.pretrain import ContrastivePretraining

    with pytest.raises(ValueError, match="engine: unknown options"):
        ContrastivePretraining(ENCODERS, embed_dim=32, engine={"compiled": True})


def test_engine_values_are_checked():
    from mmmat.tasks.pretrain import ContrastivePretraining

    with pytest.raises(ValueError, match="engine.compile_pattern_cnn must be true or false or 'fp32'"):
        ContrastivePretraining(ENCODERS, embed_dim=32, engine={"compile_pattern_cnn": "bf16"})
    with pytest.raises(ValueError, match="engine.compile must be true or false, got 'yes'"):
        ContrastivePretraining(ENCODERS, embed_dim=32, engine={"compile": "yes"})
    ContrastivePretraining(ENCODERS, embed_dim=32, engine={"compile_pattern_cnn": "fp32"})


def test_pattern_cnn_in_float32_under_autocast():
    """``engine.compile_pattern_cnn: fp32``: the CNN computes in float32 inside a bf16 autocast region."""
    from mmmat.encoders.spectrum import XRDCNNEncoder

    torch.manual_seed(0)
    cnn = XRDCNNEncoder(out_dim=16, num_bins=256, widths=(8, 16), depths=(1, 1), hidden_dim=16)
    profile = torch.rand(3, 1701)
    reference = cnn.embed_profile(profile)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = cnn.embed_profile(profile)
        cnn.float32 = True
        high = cnn.embed_profile(profile)
    assert low.dtype == torch.bfloat16 and high.dtype == torch.float32
    assert torch.equal(high, reference)  # exactly the float32 network
    assert not torch.equal(low.float(), reference)


def test_crystal_augment_drops_the_precomputed_pattern(shards):
    from mmmat.tasks.pretrain import ContrastivePretraining

    dm = _data(shards, precompute_graph=True)
    m = ContrastivePretraining(ENCODERS, embed_dim=32, xrd_augment={}, crystal_augment={"strain": 0.01}, engine={})
    m._precompute_patterns(dm)
    assert not dm.resident("train").crystal_features  # geometry changes every step: nothing is cached


def test_compiled_encoders_give_the_same_embeddings(shards):
    from mmmat.tasks.pretrain import ContrastivePretraining

    dm = _data(shards, precompute_graph=True)
    torch.manual_seed(0)
    plain = ContrastivePretraining({"crystal": ENCODERS["crystal"]}, embed_dim=32)
    fast = ContrastivePretraining({"crystal": ENCODERS["crystal"]}, embed_dim=32)
    fast.load_state_dict(plain.state_dict())
    fast._compile_encoders()
    enc = fast.model.encoders["crystal"]
    assert "message_passing" in vars(enc.gnn)  # the compiled wrapper
    assert "embed_profile" not in vars(enc.xrd)  # the pattern CNN stays eager (NaN when compiled under bf16)
    batch = dm.resident("train", device="cpu").batch(torch.arange(8))
    plain.eval()
    fast.eval()
    with torch.no_grad():
        a = plain.model(batch, modalities=["crystal"])["crystal"]
        b = fast.model(batch, modalities=["crystal"])["crystal"]
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("sync_free", [True, False])
def test_logged_values_read_back_once_on_written_steps(shards, tmp_path, sync_free):
    """With ``sync_free`` the values beside the loss are logged (as host values, from one stacked read-back) only on
    the steps the loggers write; without it, every step, as device tensors. ``train/loss`` is logged every step."""
    import csv
    import math

    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    dm = _data(shards, precompute_graph=sync_free)
    module = _module({**OFF, "sync_free": sync_free})
    calls: list[tuple[int, str, torch.Tensor]] = []
    log = module.log

    def recording_log(name, value, *args, **kwargs):
        calls.append((module.trainer.global_step, name, value))
        return log(name, value, *args, **kwargs)

    module.log = recording_log
    logger = CSVLogger(str(tmp_path), name="log", version=0)
    trainer = pl.Trainer(max_steps=4, log_every_n_steps=2, logger=logger, accelerator="cpu", devices=1,
                         limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    loss_steps = [s for s, k, _ in calls if k == "train/loss"]
    assert loss_steps == [0, 1, 2, 3]
    others = [(s, k, v) for s, k, v in calls if k != "train/loss"]
    assert {k for _, k, _ in others} >= {"train/loss/crystal-xrd", "train/acc/crystal_to_xrd"}
    written = {1, 3}  # log_every_n_steps=2: the loggers write after the second and the fourth step
    assert {s for s, _, _ in others} == (written if sync_free else {0, 1, 2, 3})
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and math.isfinite(float(v)) for _, _, v in others)
    rows = list(csv.DictReader(open(tmp_path / "log" / "version_0" / "metrics.csv")))
    got = {int(r["step"]): r for r in rows if r.get("train/loss/crystal-xrd")}
    assert set(got) == written
    for s, k, v in others:
        if s in written and k in got[s]:
            assert float(got[s][k]) == pytest.approx(float(v), rel=1e-6)
