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


def _fit_logged(shards, path, sync_free):
    """Four steps logged every second step into a CSVLogger: the ``self.log`` calls (step, name, ``logger``
    argument), the values given to ``_log_train`` by step, and the rows of metrics.csv."""
    import csv

    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    dm = _data(shards, precompute_graph=sync_free)
    module = _module({**OFF, "sync_free": sync_free})
    calls: list[tuple[int, str, bool | None]] = []
    given: dict[int, dict[str, float]] = {}
    log, log_train = module.log, module._log_train

    def recording_log(name, value, *args, **kwargs):
        assert isinstance(value, torch.Tensor) and value.ndim == 0
        calls.append((module.trainer.global_step, name, kwargs.get("logger")))
        return log(name, value, *args, **kwargs)

    def recording_log_train(values, batch_size):
        given[module.trainer.global_step] = {k: float(v) for k, v in values.items()}
        return log_train(values, batch_size)

    module.log, module._log_train = recording_log, recording_log_train
    logger = CSVLogger(str(path), name="log", version=0)
    trainer = pl.Trainer(max_steps=4, log_every_n_steps=2, logger=logger, accelerator="cpu", devices=1,
                         limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    with open(path / "log" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return calls, given, rows


@pytest.mark.parametrize("sync_free", [True, False])
def test_logged_values_reach_the_loggers_for_the_written_steps(shards, tmp_path, sync_free):
    """Every logged value reaches the loggers for exactly the steps they write, at the step numbers and with the
    values plain Lightning gives. With ``sync_free`` they go to the loggers from one stacked copy per written step
    (``train/loss`` is logged to Lightning every step for the callbacks only); without it each value is logged
    every step as a device tensor."""
    calls, given, rows = _fit_logged(shards, tmp_path / "run", sync_free)
    assert sorted(given) == [0, 1, 2, 3]
    names = set(given[0])
    assert names >= {"train/loss", "train/loss/crystal-xrd", "train/acc/crystal_to_xrd"}
    if sync_free:  # the loss for the callbacks only; the loggers get every value from the stacked copy
        assert calls == [(s, "train/loss", False) for s in range(4)]
    else:
        assert {(s, k) for s, k, _ in calls} == {(s, k) for s in range(4) for k in names}
        assert all(flag is None for _, _, flag in calls)
    written = [1, 3]  # log_every_n_steps=2: the loggers write after the second and the fourth step
    got = {int(r["step"]): r for r in rows if r.get("train/loss")}
    assert sorted(got) == written and len([r for r in rows if r.get("train/loss")]) == len(written)
    for s in written:
        assert {k for k, v in got[s].items() if v} == names | {"epoch", "step"}
        for k in names:
            assert float(got[s][k]) == pytest.approx(given[s][k], rel=1e-6), (s, k)
    if sync_free:  # the same rows as the plain path writes
        _, _, plain = _fit_logged(shards, tmp_path / "plain", False)
        assert [r.keys() for r in rows] == [r.keys() for r in plain]
        for row, ref in zip(rows, plain, strict=True):
            assert row["step"] == ref["step"] and row["epoch"] == ref["epoch"]
            for k in names:
                assert float(row[k]) == pytest.approx(float(ref[k]), rel=1e-5), k


class _FakeEvent:
    """Stands for a ``torch.cuda.Event``: not complete until ``done``; counts the waits."""

    def __init__(self):
        self.done, self.waits = False, 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waits += 1
        self.done = True


class _FakeLogger:
    def __init__(self):
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def save(self):
        pass


def test_pending_logs_written_once_their_copy_has_landed():
    from mmmat.tasks.pretrain import _PendingLogs

    pending, logger = _PendingLogs(capacity=3), _FakeLogger()
    events = [_FakeEvent() for _ in range(3)]
    for i, (step, event) in enumerate(zip([1, 3, 5], events, strict=True)):
        pending.push(step, 0, ["train/loss", "train/acc"], torch.tensor([float(i), 10.0 + i]), event)
    assert pending.write([logger]) == [] and logger.rows == []  # nothing has landed
    events[1].done = True
    assert pending.write([logger]) == [] and logger.rows == []  # in order: the second waits for the first
    events[0].done = True
    written = pending.write([logger])
    assert logger.rows == [(1, {"epoch": 0, "train/loss": 0.0, "train/acc": 10.0}),
                           (3, {"epoch": 0, "train/loss": 1.0, "train/acc": 11.0})]
    assert written == [m for _, m in logger.rows]
    pending.push(7, 1, ["train/loss"], torch.tensor([3.0]), None)  # on the host already
    pending.write([logger])
    assert [s for s, _ in logger.rows] == [1, 3]  # behind step 5, still on its way
    assert not any(e.waits for e in events)
    pending.write([logger], wait=True)  # the epoch-end flush
    assert logger.rows[2:] == [(5, {"epoch": 0, "train/loss": 2.0, "train/acc": 12.0}),
                               (7, {"epoch": 1, "train/loss": 3.0})]
    assert events[2].waits == 1 and not pending.entries


def test_pending_logs_keep_at_most_capacity_entries():
    from mmmat.tasks.pretrain import _PendingLogs

    pending, logger = _PendingLogs(capacity=2), _FakeLogger()
    events = [_FakeEvent() for _ in range(3)]
    for step, event in enumerate(events):
        pending.push(step, 0, ["train/loss"], torch.tensor([float(step)]), event)
        pending.write([logger])
    assert [s for s, _ in logger.rows] == [0] and events[0].waits == 1 and len(pending.entries) == 2
