"""The static-shape step (``engine.cuda_graphs``) computes what the plain step computes.

Tolerance: float32 on the CPU; losses agree to 1e-6 (relative) and every gradient to 1e-5 relative to the
largest entry of that gradient. The text encoders run with dropout off here: padding rows change the shape of
dropout's random draws (so which units drop), not what the step computes.
"""

import copy

import pytest
import torch

from data_pipelines.base import BuildOptions, get_source
from data_pipelines.build import build_shards

TEXT = {"name": "text/transformer", "vocab_size": 300, "hidden": 32, "layers": 1, "heads": 2, "intermediate": 64,
        "out_dim": 32, "max_position": 128, "dropout": 0.0}
ENCODERS = {
    "crystal": {"name": "crystal/schnet_xrd", "hidden": 32, "num_interactions": 2, "cutoff": 5.0, "num_rbf": 16,
                "xrd": {"out_dim": 32, "num_bins": 256, "widths": [8, 16], "depths": [1, 1], "hidden_dim": 32}},
    "xrd": {"name": "xrd/cnn", "out_dim": 32, "num_bins": 256, "widths": [8, 16], "depths": [1, 1],
            "hidden_dim": 32},
    "literature_text": TEXT,
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("static_shards")
    build_shards(get_source("builtin")(None, limit=40), out, progress=False, options=BuildOptions(describe=True))
    return out


def _data(shards, **kw):
    from mmmat.tasks.datamodule import MultimodalDataModule

    return MultimodalDataModule(str(shards), batch_size=16, mode="resident", cutoff=5.0, num_workers=0,
                                include_generated_text=True, max_text_tokens=64, **kw)


def _module(encoders=ENCODERS, **kw):
    from mmmat.tasks.pretrain import ContrastivePretraining

    torch.manual_seed(0)
    kw.setdefault("xrd_augment", {})
    m = ContrastivePretraining(encoders, embed_dim=32, engine={"fused_adamw": False}, **kw)
    m.model.tokenizer = None
    for enc in m.model.encoders.values():
        if hasattr(enc, "full_attention_mask"):
            enc.full_attention_mask = True
    return m


def _loss_and_grads(module, run, batch, seed):
    torch.manual_seed(seed)
    module.zero_grad()
    loss = run(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _same(la, ga, lb, gb):
    assert torch.isfinite(la) and torch.allclose(la, lb, rtol=1e-6, atol=1e-7), (la, lb)
    assert ga.keys() == gb.keys() and len(ga) > 20
    for name in ga:
        scale = ga[name].abs().max().clamp_min(1e-12)
        assert ((ga[name] - gb[name]).abs().max() / scale) < 1e-5, name


@pytest.mark.parametrize("precompute", [True, False])
def test_static_step_equals_plain_step(shards, precompute):
    from mmmat.tasks.static_step import StaticStep

    dm = _data(shards, precompute_graph=precompute)
    plain = _module()
    static_m = _module()
    static_m.load_state_dict(copy.deepcopy(plain.state_dict()))
    if precompute:
        plain._precompute_patterns(dm)  # the same data object: both steps read the cached patterns
    step = StaticStep(static_m, compile=False)
    data = dm.resident("train")
    for seed, idx in enumerate((torch.tensor([3, 1, 4, 15, 9, 2, 6, 5, 35, 8, 27, 0]), torch.arange(20, 32))):
        batch = data.batch(idx)
        la, ga = _loss_and_grads(plain, lambda b: plain.training_step(b, 0), batch, seed)
        lb, gb = _loss_and_grads(static_m, lambda b: step(b)[0], data.batch(idx), seed)
        _same(la, ga, lb, gb)
        # padding really is there: more atoms, edges and text rows than the batch has
        c = batch.crystal
        assert step.capacity["atoms"] > c.z.shape[0] and step.capacity["edges"] >= c.edge_index.shape[1]
        assert step.capacity["rows/literature_text"] >= batch.rows["literature_text"].shape[0]
    assert step.grown == 0


def test_static_step_with_xrd_mixtures_equals_plain_step(shards):
    from mmmat.tasks.static_step import StaticStep

    kw = {"xrd_augment": {"p_mixture": 0.5}, "mixture_loss_weight": 1.0}
    dm = _data(shards, precompute_graph=True)
    plain, static_m = _module(**kw), _module(**kw)
    static_m.load_state_dict(copy.deepcopy(plain.state_dict()))
    plain._precompute_patterns(dm)
    step = StaticStep(static_m, compile=False)
    data = dm.resident("train")
    idx = torch.tensor([3, 1, 4, 15, 9, 2, 6, 5, 35, 8, 27, 0])
    la, ga = _loss_and_grads(plain, lambda b: plain.training_step(b, 0), data.batch(idx), 0)
    lb, gb = _loss_and_grads(static_m, lambda b: step(b)[0], data.batch(idx), 0)
    _same(la, ga, lb, gb)
    assert "mixture_logit" in ga


def test_padding_rows_contribute_nothing(shards):
    """Garbage in every padding slot (atoms, edges, text rows) changes neither the loss nor any gradient."""
    from mmmat.tasks.static_step import StaticStep

    dm = _data(shards, precompute_graph=True)
    m = _module()
    step = StaticStep(m, compile=False)
    batch = dm.resident("train").batch(torch.arange(12))
    x = step.pad(batch)
    n, e = batch.crystal.z.shape[0], batch.crystal.edge_index.shape[1]
    k = batch.rows["literature_text"].shape[0]

    def run(inputs, seed=0):
        torch.manual_seed(seed)
        m.zero_grad()
        loss, _ = step.loss(inputs)
        loss.backward()
        return loss.detach(), {p: t.grad.clone() for p, t in m.named_parameters() if t.grad is not None}

    la, ga = run(x)
    y = dict(x)
    y["z"] = x["z"].clone()
    y["z"][n:] = 26  # padding atoms of another element
    y["pos"] = x["pos"].clone()
    y["pos"][n:] = torch.randn(x["pos"].shape[0] - n, 3)
    y["cell_offset"] = x["cell_offset"].clone()
    y["cell_offset"][e:, 1] = 7  # padding edges elsewhere, still far away
    y["rows/literature_text"] = x["rows/literature_text"].clone()
    y["rows/literature_text"][k:] = 5  # padding text rows read another material's text
    assert x["z"].shape[0] > n and x["edge_index"].shape[1] > e and x["rows/literature_text"].shape[0] > k
    lb, gb = run(y)
    _same(la, ga, lb, gb)


def test_capacity_overflow_grows_and_never_truncates(shards):
    from mmmat.tasks.static_step import StaticStep

    dm = _data(shards, precompute_graph=True)
    m = _module()
    step = StaticStep(m, compile=False)
    data = dm.resident("train")
    small = data.batch(torch.arange(4))
    step.pad(small)
    caps = dict(step.capacity)
    big = data.batch(torch.arange(len(data)))
    assert big.crystal.z.shape[0] >= caps["atoms"] and big.crystal.edge_index.shape[1] > caps["edges"]
    x = step.pad(big)
    assert step.grown >= 2  # atoms and edges at least
    assert x["z"].shape[0] == step.capacity["atoms"] > big.crystal.z.shape[0]
    assert x["edge_index"].shape[1] == step.capacity["edges"] >= big.crystal.edge_index.shape[1]
    assert torch.equal(x["edge_index"][:, : big.crystal.edge_index.shape[1]], big.crystal.edge_index)
    # a smaller batch again: same shapes, nothing grows
    grown = step.grown
    y = step.pad(small)
    assert step.grown == grown and y["z"].shape == x["z"].shape and y["edge_index"].shape == x["edge_index"].shape


def test_planned_capacities_hold_random_batches(shards):
    from mmmat.tasks.static_step import StaticStep

    data = _data(shards, precompute_graph=True).resident("train")
    step = StaticStep(_module(), compile=False)
    step.plan(data, 8)
    caps = dict(step.capacity)
    assert caps["atoms"] > 0 and caps["edges"] > 0 and 0 < caps["rows/literature_text"] <= 16
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        x = step.pad(data.batch(torch.randperm(len(data), generator=g)[:8]))
        assert x["z"].shape[0] == caps["atoms"] and x["edge_index"].shape[1] == caps["edges"]
    assert step.grown == 0


def test_unsupported_settings_are_errors():
    from mmmat.tasks.static_step import StaticStep

    m = _module({"crystal": ENCODERS["crystal"]}, objectives={"denoise": {"weight": 1.0}})
    with pytest.raises(ValueError, match="objectives"):
        StaticStep(m, compile=False)


def test_static_step_compiles_as_one_graph(shards):
    """The whole step (augmentation, every encoder of the tiny config, the loss) traces without a graph break."""
    from mmmat.tasks.static_step import StaticStep

    encoders = {
        "crystal": {"name": "crystal/schnet", "hidden": 32, "num_interactions": 2, "cutoff": 5.0, "num_rbf": 16},
        "xrd": ENCODERS["xrd"],
        "image": {"name": "image/timm", "model_name": "resnet10t", "out_dim": 32},
        "literature_text": {**TEXT, "dropout": 0.1},
    }
    dm = _data(shards, precompute_graph=True)
    m = _module(encoders)
    step = StaticStep(m, compile=False)
    x = step.pad(dm.resident("train").batch(torch.arange(8)))
    torch._dynamo.reset()
    explain = torch._dynamo.explain(step.loss)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    # and the compiled function runs end to end, forward and backward (the eager backend: no code generation)
    compiled = StaticStep(m, compile=True, mode=None, backend="eager")
    loss, logs = compiled(dm.resident("train").batch(torch.arange(8)))
    loss.backward()
    assert torch.isfinite(loss) and "train/loss" in logs and torch.isfinite(logs["train/loss"])


def test_eager_pattern_cnn_breaks_the_graph_and_keeps_the_result(shards):
    """Pattern CNNs kept out of the compiled graphs: graph breaks, and the same loss and gradients."""
    from mmmat.tasks.static_step import StaticStep

    dm = _data(shards, precompute_graph=True)
    plain, static_m = _module(), _module()
    static_m.load_state_dict(copy.deepcopy(plain.state_dict()))
    plain._precompute_patterns(dm)
    with pytest.raises(ValueError, match="fullgraph"):
        StaticStep(static_m, compile=True, backend="eager", eager_pattern_cnn=True)
    torch._dynamo.reset()
    step = StaticStep(static_m, compile=True, mode=None, backend="eager", fullgraph=False, eager_pattern_cnn=True)
    data = dm.resident("train")
    idx = torch.tensor([3, 1, 4, 15, 9, 2, 6, 5, 35, 8, 27, 0])
    x = step.pad(data.batch(idx))
    explain = torch._dynamo.explain(step.loss)(x)
    assert explain.graph_break_count >= 2  # the crystal encoder's CNN and the xrd encoder's
    la, ga = _loss_and_grads(plain, lambda b: plain.training_step(b, 0), data.batch(idx), 0)
    lb, gb = _loss_and_grads(static_m, lambda b: step(b)[0], data.batch(idx), 0)
    _same(la, ga, lb, gb)


def _ddp_worker(rank, world, init_file, shards, out_dir):
    """One rank: the plain and the compiled static step, each inside DDP on this rank's half of a batch."""
    import torch.distributed as dist
    from torch._dynamo.utils import counters
    from torch.nn.parallel import DistributedDataParallel

    from mmmat.tasks.static_step import StaticStep

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        class Step(torch.nn.Module):  # what Lightning's DDP wrapper does: the step runs inside DDP's forward
            def __init__(self, module, run):
                super().__init__()
                self.module, self.run = module, run

            def forward(self, batch):
                return self.run(batch)

        dm = _data(shards, precompute_graph=True)
        plain, static_m = _module(), _module()
        static_m.load_state_dict(copy.deepcopy(plain.state_dict()))
        plain._precompute_patterns(dm)
        torch._dynamo.reset()
        step = StaticStep(static_m, compile=True, mode=None, backend="eager", fullgraph=False)
        idx = torch.tensor([3, 1, 4, 15, 9, 2, 6, 5, 35, 8, 27, 0]).chunk(world)[rank]
        data = dm.resident("train")
        out = {}
        for tag, module, run in (("plain", plain, lambda b: plain.training_step(b, 0)),
                                 ("static", static_m, lambda b: step(b)[0])):
            ddp = DistributedDataParallel(Step(module, run))
            torch.manual_seed(rank)
            module.zero_grad()
            loss = ddp(data.batch(idx))
            loss.backward()  # DDP averages the gradients over the ranks
            out[tag] = (loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
        out["breaks"] = " ".join(counters["graph_break"])
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_static_step_under_ddp_equals_plain_step(shards, tmp_path):
    """Two gloo ranks: the compiled static step inside DDP (the cross-rank gathers of the contrastive loss run
    between its graphs) gives each rank the plain step's loss and the same DDP-averaged gradients."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(shards), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert "_gather_with_grad_eager" in ranks[0]["breaks"]  # the collectives run between the graphs
    for r in ranks:
        _same(r["plain"][0], r["plain"][1], r["static"][0], r["static"][1])
    assert not torch.allclose(ranks[0]["plain"][0], ranks[1]["plain"][0])  # each rank its own half
    for name, g in ranks[0]["static"][1].items():  # the gradients were averaged: the same on both ranks
        torch.testing.assert_close(g, ranks[1]["static"][1][name])
