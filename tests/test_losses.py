import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mmmat.latent.losses import (
    LogitScale,
    MultimodalContrastiveLoss,
    clip_loss,
    gather_with_grad,
    siglip_loss,
)

WORLD = 2
N_GLOBAL = 8  # 4 rows per rank
D_IN, D = 6, 5
MODS = ("crystal", "xrd", "processing_text", "image")
# Absent rows per modality (global indices); "image" is absent everywhere.
ABSENT = {"crystal": [4], "xrd": [1, 6], "processing_text": [0, 3, 5], "image": list(range(N_GLOBAL))}

# (name, kind, mode, weights)
CASES = [
    ("clip_anchor", "clip", "anchor", None),
    ("clip_all_pairs", "clip", "all_pairs", {"xrd-processing_text": 0.5, "crystal-xrd": 2.0}),
    ("siglip_anchor", "siglip", "anchor", {"xrd": 3.0}),
    ("siglip_all_pairs", "siglip", "all_pairs", None),
    ("fn_clip", "clip", "fn", None),
    ("fn_siglip", "siglip", "fn", None),
]


def _global_data(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(N_GLOBAL, D_IN, generator=g) for m in MODS}
    present = {m: torch.ones(N_GLOBAL, dtype=torch.bool) for m in MODS}
    for m, rows in ABSENT.items():
        present[m][rows] = False
    torch.manual_seed(seed)
    heads = nn.ModuleDict({m: nn.Linear(D_IN, D) for m in MODS})
    return x, present, heads


def _run_case(idx: int, rank: int, world: int) -> dict:
    """Loss, logs and gradients of one case on this rank's slice (world 1: the whole batch)."""
    _, kind, mode, weights = CASES[idx]
    x, present, heads = _global_data(100 + idx)
    b = N_GLOBAL // world
    sl = slice(rank * b, (rank + 1) * b)
    xs = {m: x[m][sl].clone().requires_grad_(True) for m in MODS}
    pres = {m: present[m][sl] for m in MODS}
    emb = {m: F.normalize(heads[m](xs[m]), dim=-1) for m in MODS}
    if mode == "fn":
        scale_mod = LogitScale(init_scale=5.0, bias=True, init_bias=-2.0)
        scale, bias = scale_mod()
        if kind == "clip":
            loss = clip_loss(emb["crystal"], emb["xrd"], scale, pres["crystal"], pres["xrd"])
        else:
            loss = siglip_loss(emb["crystal"], emb["xrd"], scale, bias, pres["crystal"], pres["xrd"])
        logs = {}
        params = dict(scale_mod.named_parameters())
        params.update(
            {f"head.{k}": v for k, v in heads.named_parameters() if k.startswith(("crystal", "xrd"))}
        )
        if kind == "clip":
            params.pop("bias")
    else:
        crit = MultimodalContrastiveLoss(kind=kind, mode=mode, weights=weights)
        loss, logs = crit(emb, pres)
        params = {f"crit.{k}": v for k, v in crit.named_parameters()}
        params.update({f"head.{k}": v for k, v in heads.named_parameters()})
    loss.backward()
    grads = {}
    for k, p in params.items():
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        if world > 1:  # as DDP does: average the parameter gradients over ranks
            dist.all_reduce(grad)
            grad /= world
        grads[k] = grad
    return {
        "loss": loss.detach(),
        "logs": {k: v.detach().clone() for k, v in logs.items()},
        "x_grad": {
            m: (xs[m].grad.clone() if xs[m].grad is not None else torch.zeros_like(xs[m])) for m in MODS
        },
        "param_grad": grads,
    }


def _gather_checks(rank: int, world: int) -> dict:
    """gather_with_grad: forward order and the summed backward."""
    x = torch.full((3, 2), float(rank + 1), requires_grad=True)
    y = gather_with_grad(x)
    weights = torch.arange(y.shape[0], dtype=torch.float32)[:, None] * (rank + 1)
    (y * weights).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad.clone()}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {"cases": [_run_case(i, rank, world) for i in range(len(CASES))]}
        results["gather"] = _gather_checks(rank, world)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("idx", range(len(CASES)), ids=[c[0] for c in CASES])
def test_ddp_equivalence(distributed_results, idx):
    """Mean of the rank losses = global loss; DDP-averaged parameter gradients = global gradients."""
    ref = _run_case(idx, 0, 1)
    ranks = [r["cases"][idx] for r in distributed_results]
    assert torch.isfinite(ref["loss"]) and ref["loss"] > 0
    _close(torch.stack([r["loss"] for r in ranks]).mean(), ref["loss"])
    for k, v in ref["logs"].items():
        _close(torch.stack([r["logs"][k].float() for r in ranks]).mean(), v.float())
    for k, v in ref["param_grad"].items():
        assert v.abs().sum() > 0 or k.startswith("head.image"), k  # gradients actually flow
        for r in ranks:  # every rank holds the same averaged gradient, equal to the global one
            _close(r["param_grad"][k], v)
    b = N_GLOBAL // WORLD
    for m in MODS:
        for rank, r in enumerate(ranks):
            # local feature gradients are W × the global ones (each rank's loss is its W-scaled share)
            _close(r["x_grad"][m], WORLD * ref["x_grad"][m][rank * b : (rank + 1) * b])
        if m == "image":
            assert ref["x_grad"][m].abs().sum() == 0


def test_gather_with_grad(distributed_results):
    for rank, r in enumerate(distributed_results):
        g = r["gather"]
        _close(g["y"], torch.cat([torch.full((3, 2), 1.0), torch.full((3, 2), 2.0)]))
        # d/dx of Σ_r' (r'+1)·Σ_i i·y_i, rows of rank r at i = 3r..3r+2
        rows = torch.arange(3 * rank, 3 * rank + 3, dtype=torch.float32)[:, None]
        _close(g["x_grad"], (rows * (1 + 2)).expand(3, 2))


def test_gather_with_grad_single_process_identity():
    x = torch.randn(4, 3)
    assert gather_with_grad(x) is x


def test_perfect_alignment_low_loss_accuracy_one():
    q, _ = torch.linalg.qr(torch.randn(64, 64))
    e = q[:32]  # orthonormal rows: positives cos 1, negatives cos 0
    for kind in ("clip", "siglip"):
        crit = MultimodalContrastiveLoss(kind=kind, mode="all_pairs", init_scale=100.0)
        loss, logs = crit({"crystal": e, "xrd": e.clone(), "image": e.clone()}, {})
        assert loss.item() < 1e-2, kind
        for k, v in logs.items():
            if k.startswith("acc/"):
                assert v.item() == pytest.approx(1.0), (kind, k)


def test_random_features_give_log_batch():
    torch.manual_seed(0)
    bsz = 64
    a = F.normalize(torch.randn(bsz, 1024), dim=-1)
    b = F.normalize(torch.randn(bsz, 1024), dim=-1)
    loss = clip_loss(a, b, torch.tensor(1.0))
    assert abs(loss.item() - math.log(bsz)) < 0.02
    crit = MultimodalContrastiveLoss(init_scale=1.0)
    loss2, logs = crit({"crystal": a, "xrd": b})
    _close(loss2, loss)
    assert logs["n_pairs/crystal-xrd"].item() == bsz


def test_logit_scale_clamp_and_init():
    ls = LogitScale()
    scale, bias = ls()
    assert bias is None
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        ls.log_scale.fill_(math.log(1000.0))
    scale, _ = ls()
    assert scale.item() == pytest.approx(100.0, rel=1e-6)
    scale.backward()
    assert ls.log_scale.grad.item() == 0.0  # above the cap: constant
    assert ls.log_scale.item() == pytest.approx(math.log(1000.0))  # parameter itself untouched
    sig = LogitScale(bias=True)
    assert sig()[1].item() == -10.0
    assert {n for n, _ in sig.named_parameters()} == {"log_scale", "bias"}


def test_masked_clip_matches_manual_definition():
    torch.manual_seed(1)
    n = 10
    a = F.normalize(torch.randn(n, 8), dim=-1)
    b = F.normalize(torch.randn(n, 8), dim=-1)
    ma = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    mb = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    s = torch.tensor(3.0)
    loss = clip_loss(a, b, s, ma, mb)
    both = (ma & mb).nonzero().flatten().tolist()
    terms = []
    for i in both:
        cols_b = mb.nonzero().flatten()
        la = s * a[i] @ b[cols_b].T
        terms.append(-(la[(cols_b == i).nonzero()[0, 0]] - torch.logsumexp(la, 0)))
        cols_a = ma.nonzero().flatten()
        lb = s * b[i] @ a[cols_a].T
        terms.append(-(lb[(cols_a == i).nonzero()[0, 0]] - torch.logsumexp(lb, 0)))
    _close(loss, torch.stack(terms).sum() / (2 * len(both)))


def test_masked_siglip_matches_manual_definition():
    torch.manual_seed(2)
    n = 7
    a = F.normalize(torch.randn(n, 8), dim=-1)
    b = F.normalize(torch.randn(n, 8), dim=-1)
    ma = torch.tensor([1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    mb = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    s, bias = torch.tensor(4.0), torch.tensor(-1.5)
    loss = siglip_loss(a, b, s, bias, ma, mb)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if ma[i] and mb[j]:
                z = 1.0 if i == j else -1.0
                total = total - F.logsigmoid(z * (s * a[i] @ b[j] + bias))
    _close(loss, total / int((ma & mb).sum()))


def test_absent_modality_gives_zero_without_nan():
    torch.manual_seed(3)
    bsz = 6
    lin = nn.Linear(4, 5)
    x = torch.randn(bsz, 4)
    nan_rows = torch.full((bsz, 5), float("nan"))  # garbage on absent rows must not leak
    none = torch.zeros(bsz, dtype=torch.bool)
    for kind in ("clip", "siglip"):
        e = F.normalize(lin(x), dim=-1)
        crit = MultimodalContrastiveLoss(kind=kind, mode="all_pairs")
        # every pair lacks joint presence: total 0, finite gradients
        loss, logs = crit({"crystal": e, "xrd": nan_rows}, {"xrd": none})
        assert loss.item() == 0.0 and logs["loss/crystal-xrd"].item() == 0.0
        assert logs["n_pairs/crystal-xrd"].item() == 0
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in lin.parameters())
        assert torch.isfinite(crit.logit_scale.log_scale.grad)
        lin.zero_grad()
        e = e.detach()
        # an absent modality beside present ones: its pairs add nothing, the rest is unchanged
        loss_3, logs_3 = crit({"crystal": e, "xrd": e.flip(0), "image": nan_rows}, {"image": none})
        loss_2, _ = crit({"crystal": e, "xrd": e.flip(0)}, {})
        assert torch.isfinite(loss_3) and loss_3.item() > 0
        _close(loss_3, loss_2)
        assert logs_3["loss/crystal-image"].item() == 0.0
    assert clip_loss(e, nan_rows, torch.tensor(10.0), mask_b=none).item() == 0.0
    assert siglip_loss(e, nan_rows, torch.tensor(10.0), torch.tensor(-10.0), mask_b=none).item() == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        MultimodalContrastiveLoss(mode="triplets")
    with pytest.raises(ValueError):
        MultimodalContrastiveLoss(kind="triplet")
    e = F.normalize(torch.randn(4, 3), dim=-1)
    with pytest.raises(KeyError):
        MultimodalContrastiveLoss(anchor="crystal")({"xrd": e, "image": e}, {})
    with pytest.raises(ValueError, match="weights"):
        MultimodalContrastiveLoss(weights={"crystal-text": 1.0})({"crystal": e, "xrd": e}, {})
    pairs = MultimodalContrastiveLoss(mode="all_pairs").pairs(["xrd", "image", "crystal"])
    assert pairs == [("crystal", "image"), ("crystal", "xrd"), ("image", "xrd")]
