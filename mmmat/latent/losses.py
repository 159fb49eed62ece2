"""Contrastive objectives (CLIP InfoNCE and SigLIP) over several modalities, with gathering across ranks.

Distributed form ("local loss"): every rank scores its own B rows against the N = W·B columns gathered from
all W ranks (equal batch sizes per rank are required; the loaders guarantee it). The gather keeps gradients:
its backward sums the gradients of every rank's loss with respect to each rank's slice.

Normalisation, chosen so that DDP reproduces single-process training on the global batch: with P the set of
materials (over the global batch) where both modalities of a pair are present, the global loss is
``L = (1/|P|) Σ_{i∈P} ℓ_i`` and rank r returns ``L_r = (W/|P|) Σ_{i∈P, i on r} ℓ_i`` (|P| is known on every
rank from the gathered masks, so no extra collective). Then ``mean_r L_r = L``; because the gather's backward
sums over ranks, rank r's parameter gradient is ``∂(Σ_r' L_r')/∂θ`` restricted to the paths through its own
rows, and DDP's average ``(1/W) Σ_r`` of those equals ``∂L/∂θ`` exactly (the logit scale, used only locally,
also averages to ``∂L/∂θ``). Gradients with respect to a rank's local features are ``W · ∂L/∂x``.

Presence masks: a material lacking modality b neither is a positive nor a negative for b: in the
a → b direction columns whose b is absent are masked out of the softmax and rows lacking a or b are left out
of the mean; rows whose a is present but b absent stay as negatives in the b → a direction. Masked logits are
filled with a large finite negative value (not -inf), so fully masked rows give zero loss and zero, finite
gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LogitScale",
    "MultimodalContrastiveLoss",
    "clip_loss",
    "feature_spread_loss",
    "gather_with_grad",
    "siglip_loss",
]

#: Fill value for masked logits: exp of it is 0 in float32, but it stays finite.
_MASKED = -1.0e9


def _dist_info() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0 (no autograd)."""
    world = dist.get_world_size()
    x = x.contiguous()
    if dist.get_backend() == "nccl":
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x)
        return out
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient for the local slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        ctx.rank, ctx.world = _dist_info()
        ctx.local = x.shape[0]
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = grad.new_empty((ctx.local, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.local : (ctx.rank + 1) * ctx.local]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` (B, ...) from every rank into (W·B, ...), keeping gradients for the local slice.

    The backward sums, over ranks, the gradients with respect to this rank's slice (reduce-scatter), so a loss
    computed on each rank from gathered tensors back-propagates into every rank's features. Every rank must
    pass the same shape (equal batch sizes per rank). Identity without an initialised process group or with
    world size 1.

    Args:
        x: Local tensor, first dimension the local batch.

    Returns:
        The rank-ordered concatenation; rank r's rows are ``[r·B, (r+1)·B)``.

    """
    _, world = _dist_info()
    if world == 1:
        return x
    return _gather_with_grad_eager(x)


@torch.compiler.disable
def _gather_with_grad_eager(x: Tensor) -> Tensor:
    """The collective of :func:`gather_with_grad`, never inside a compiled graph.

    In a compiled step (``engine.cuda_graphs`` under DDP) the gather is a graph break: the collective runs
    eagerly between the captured graphs, on every rank in the same order, instead of inside a CUDA graph.
    """
    return _GatherWithGrad.apply(x)


def _gather_mask(mask: Tensor) -> Tensor:
    """All-gather a boolean mask (no gradient); identity on one process."""
    _, world = _dist_info()
    if world == 1:
        return mask
    return _gather_mask_eager(mask)


@torch.compiler.disable
def _gather_mask_eager(mask: Tensor) -> Tensor:
    """The collective of :func:`_gather_mask`, never inside a compiled graph."""
    return _all_gather(mask.to(torch.uint8)).bool()


class LogitScale(nn.Module):
    """Learnable logit scale ``exp(t)`` (inverse temperature), clamped at ``max_scale``; optional SigLIP bias.

    The clamp is applied in :meth:`forward` (the parameter itself is never modified), so above the cap the
    scale is constant and receives no gradient.

    Args:
        init_scale: Initial scale; ``t`` starts at ``ln(init_scale)`` (default ``1/0.07``, as in CLIP).
        max_scale: Upper bound of the scale (default 100, i.e. ``t ≤ ln 100``).
        bias: Whether to hold a learnable logit bias (SigLIP).
        init_bias: Initial bias (default -10, as in SigLIP).

    """

    def __init__(
        self,
        init_scale: float = 1 / 0.07,
        max_scale: float = 100.0,
        bias: bool = False,
        init_bias: float = -10.0,
    ) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale), dtype=torch.float32))
        self.max_log_scale = math.log(max_scale)
        self.bias = nn.Parameter(torch.tensor(float(init_bias), dtype=torch.float32)) if bias else None

    def forward(self) -> tuple[Tensor, Tensor | None]:
        """Return ``(scale, bias)``: ``exp(min(t, ln max_scale))`` and the bias (None without one)."""
        return self.log_scale.clamp(max=self.max_log_scale).exp(), self.bias


def _pair_terms(
    kind: str,
    a: Tensor,
    b: Tensor,
    a_all: Tensor,
    b_all: Tensor,
    ma_all: Tensor,
    mb_all: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    rank: int,
    world: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss share of this rank and statistics for one modality pair, from local and gathered features.

    Args:
        kind: "clip" or "siglip".
        a, b: Local features (B, d), already L2-normalised and zero on absent rows.
        a_all, b_all: Gathered features (N, d), N = world·B (``a_all`` only used by "clip" and for stats).
        ma_all, mb_all: Gathered presence masks (N,) bool.
        scale: Logit scale (scalar tensor).
        bias: Logit bias (scalar tensor) for "siglip".
        rank, world: Rank and world size.

    Returns:
        ``(L_r, stats)``: this rank's W-scaled share (the mean over ranks is the global loss) and detached
        ``acc_ab``, ``acc_ba`` (top-1 accuracy, scaled the same way) and ``n`` (global count of
        present pairs).

    """
    n_local = a.shape[0]
    idx = torch.arange(n_local, device=a.device) + rank * n_local
    both_all = ma_all & mb_all
    n = both_all.sum()
    denom = n.clamp(min=1).to(torch.float32)
    w = both_all[idx].to(torch.float32)

    if kind == "clip":
        logits_ab = (scale * (a @ b_all.T).float()).masked_fill(~mb_all[None, :], _MASKED)
        logits_ba = (scale * (b @ a_all.T).float()).masked_fill(~ma_all[None, :], _MASKED)
        ce = F.cross_entropy(logits_ab, idx, reduction="none") + F.cross_entropy(
            logits_ba, idx, reduction="none"
        )
        loss = world * (ce * w).sum() / (2 * denom)
    elif kind == "siglip":
        if bias is None:
            raise ValueError("siglip needs a logit bias (LogitScale(bias=True))")
        logits_ab = scale * (a @ b_all.T).float() + bias
        sign = torch.full_like(logits_ab, -1.0)
        sign[torch.arange(n_local, device=a.device), idx] = 1.0
        valid = ma_all[idx][:, None] & mb_all[None, :]
        nll = -F.logsigmoid(sign * logits_ab) * valid
        loss = world * nll.sum() / denom * (n > 0)
        with torch.no_grad():
            logits_ab = logits_ab.masked_fill(~mb_all[None, :], _MASKED)
            logits_ba = (b @ a_all.T).float().masked_fill(~ma_all[None, :], _MASKED)
    else:
        raise ValueError(f"unknown contrastive loss kind {kind!r} (expected 'clip' or 'siglip')")

    with torch.no_grad():
        acc_ab = world * ((logits_ab.argmax(1) == idx).float() * w).sum() / denom
        acc_ba = world * ((logits_ba.argmax(1) == idx).float() * w).sum() / denom
    return loss, {"acc_ab": acc_ab, "acc_ba": acc_ba, "n": n.detach()}


def _prepare(a: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Default an absent mask to all-present and zero the absent rows (guards against non-finite padding)."""
    if mask is None:
        mask = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
    mask = mask.to(device=a.device, dtype=torch.bool)
    return a.masked_fill(~mask[:, None], 0.0), mask


def clip_loss(
    a: Tensor, b: Tensor, logit_scale: Tensor, mask_a: Tensor | None = None, mask_b: Tensor | None = None
) -> Tensor:
    """Symmetric InfoNCE between two modalities, local rows against the columns gathered from all ranks.

    Args:
        a: Local features of modality a (B, d), L2-normalised by the caller.
        b: Local features of modality b (B, d), L2-normalised by the caller; row i is the same material as
            row i of ``a``.
        logit_scale: Scalar multiplier of the cosine similarities (e.g. the scale from :class:`LogitScale`).
        mask_a: (B,) bool, True where modality a is present (default: all present).
        mask_b: (B,) bool, likewise for b.

    Returns:
        This rank's share ``L_r`` (scalar); the mean over ranks equals the mean, over the global present
        pairs, of ``(CE(a→b) + CE(b→a)) / 2``. Zero (no NaN) when no material has both modalities.

    """
    rank, world = _dist_info()
    a, mask_a = _prepare(a, mask_a)
    b, mask_b = _prepare(b, mask_b)
    ab_all = gather_with_grad(torch.cat([a, b], dim=1))
    m_all = _gather_mask(torch.stack([mask_a, mask_b], dim=1))
    d = a.shape[1]
    loss, _ = _pair_terms(
        "clip", a, b, ab_all[:, :d], ab_all[:, d:], m_all[:, 0], m_all[:, 1], logit_scale, None, rank, world
    )
    return loss


def siglip_loss(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    mask_a: Tensor | None = None,
    mask_b: Tensor | None = None,
) -> Tensor:
    """Sigmoid loss over every (a_i, b_j) pair, local rows of a against the b columns of all ranks.

    Each pair with a_i and b_j present contributes ``-log σ(z_ij (s·a_i·b_j + bias))``, z = +1 for the same
    material and -1 otherwise; the sum is divided by the global count of materials with both modalities.

    Args:
        a: Local features of modality a (B, d), L2-normalised by the caller.
        b: Local features of modality b (B, d), L2-normalised by the caller.
        logit_scale: Scalar multiplier of the cosine similarities.
        logit_bias: Scalar logit bias.
        mask_a: (B,) bool, True where modality a is present (default: all present).
        mask_b: (B,) bool, likewise for b.

    Returns:
        This rank's share ``L_r`` (scalar); the mean over ranks equals the global loss. Zero (no NaN) when no
        material has both modalities.

    """
    rank, world = _dist_info()
    a, mask_a = _prepare(a, mask_a)
    b, mask_b = _prepare(b, mask_b)
    ab_all = gather_with_grad(torch.cat([a, b], dim=1))
    m_all = _gather_mask(torch.stack([mask_a, mask_b], dim=1))
    d = a.shape[1]
    loss, _ = _pair_terms(
        "siglip",
        a,
        b,
        ab_all[:, :d],
        ab_all[:, d:],
        m_all[:, 0],
        m_all[:, 1],
        logit_scale,
        logit_bias,
        rank,
        world,
    )
    return loss


class MultimodalContrastiveLoss(nn.Module):
    """Contrastive alignment of several modality embeddings, pair by pair, with one shared logit scale.

    The total is the weighted mean of the pair losses over the pairs that have at least one material with
    both modalities in the global batch (the same set on every rank); pairs without any contribute nothing.
    Every rank must pass the same modality keys (all embeddings are gathered in one collective).

    Args:
        anchor: Anchor modality for ``mode="anchor"`` (and first in the pair order).
        mode: "anchor" (every modality against the anchor) or "all_pairs" (every unordered pair).
        kind: "clip" (InfoNCE) or "siglip" (sigmoid loss; adds a learnable bias).
        weights: Optional pair weights keyed "a-b" (either order) or, in anchor mode, by the non-anchor
            modality; missing pairs weigh 1.
        init_scale: Initial logit scale; default ``1/0.07`` for "clip" and 10 for "siglip" (SigLIP paper).
        max_scale: Cap of the logit scale (default 100).
        init_bias: Initial SigLIP bias (default -10).

    """

    def __init__(
        self,
        anchor: str = "crystal",
        mode: str = "anchor",
        kind: str = "clip",
        weights: Mapping[str, float] | None = None,
        init_scale: float | None = None,
        max_scale: float = 100.0,
        init_bias: float = -10.0,
    ) -> None:
        super().__init__()
        if mode not in ("anchor", "all_pairs"):
            raise ValueError(f"mode must be 'anchor' or 'all_pairs', got {mode!r}")
        if kind not in ("clip", "siglip"):
            raise ValueError(f"kind must be 'clip' or 'siglip', got {kind!r}")
        self.anchor, self.mode, self.kind = anchor, mode, kind
        self.weights = dict(weights or {})
        if init_scale is None:
            init_scale = 1 / 0.07 if kind == "clip" else 10.0
        self.logit_scale = LogitScale(init_scale, max_scale, bias=kind == "siglip", init_bias=init_bias)

    def pairs(self, modalities: list[str]) -> list[tuple[str, str]]:
        """The modality pairs, in a fixed order (anchor first, then the others sorted by name)."""
        others = sorted(m for m in modalities if m != self.anchor)
        if self.mode == "anchor":
            if self.anchor not in modalities:
                raise KeyError(
                    f"anchor modality {self.anchor!r} not among the embeddings {sorted(modalities)}"
                )
            return [(self.anchor, m) for m in others]
        order = ([self.anchor] if self.anchor in modalities else []) + others
        return [(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))]

    def inactive(self, modalities: list[str]) -> bool:
        """True when every pair among ``modalities`` has weight 0: the loss is then 0 and trains nothing."""
        return all(self._weight(a, b) == 0.0 for a, b in self.pairs(list(modalities)))

    def _weight(self, a: str, b: str) -> float:
        for key in (f"{a}-{b}", f"{b}-{a}") + ((b,) if self.mode == "anchor" else ()):
            if key in self.weights:
                return float(self.weights[key])
        return 1.0

    def forward(
        self, embeddings: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total contrastive loss of this rank and per-pair statistics for logging.

        Args:
            embeddings: Modality -> (B, d) features, L2-normalised, same d and B for every modality.
            present: Modality -> (B,) bool presence; a modality without an entry counts as present everywhere.

        Returns:
            ``(total, logs)``. ``total`` is this rank's share (mean over ranks = global loss, see the module
            docstring). ``logs`` (detached, same W-scaled convention, so a mean over ranks gives the global
            value): ``loss/a-b``, ``acc/a_to_b``, ``acc/b_to_a``, ``n_pairs/a-b`` (global count, not scaled),
            ``logit_scale`` and, for SigLIP, ``logit_bias``.

        """
        present = present or {}
        names = list(embeddings)
        pairs = self.pairs(names)
        pair_keys = {f"{a}-{b}" for a, b in pairs} | {f"{b}-{a}" for a, b in pairs}
        if self.mode == "anchor":
            pair_keys |= {b for _, b in pairs}
        unknown = set(self.weights) - pair_keys
        if unknown:
            raise ValueError(f"weights name no pair of {sorted(names)}: {sorted(unknown)}")

        rank, world = _dist_info()
        feats, masks = [], []
        for m in names:
            f, mk = _prepare(embeddings[m], present.get(m))
            feats.append(f)
            masks.append(mk)
        local = torch.stack(feats, dim=1)  # (B, M, d)
        gathered = gather_with_grad(local)  # (N, M, d)
        m_all = _gather_mask(torch.stack(masks, dim=1))  # (N, M)
        col = {m: i for i, m in enumerate(names)}

        scale, bias = self.logit_scale()
        logs: dict[str, Tensor] = {"logit_scale": scale.detach()}
        if bias is not None:
            logs["logit_bias"] = bias.detach()
        num = scale.new_zeros(())
        den = scale.new_zeros(())
        for a, b in pairs:
            ia, ib = col[a], col[b]
            loss, st = _pair_terms(
                self.kind,
                local[:, ia],
                local[:, ib],
                gathered[:, ia],
                gathered[:, ib],
                m_all[:, ia],
                m_all[:, ib],
                scale,
                bias,
                rank,
                world,
            )
            w = self._weight(a, b)
            num = num + w * loss
            den = den + w * (st["n"] > 0).to(den.dtype)
            logs[f"loss/{a}-{b}"] = loss.detach()
            logs[f"acc/{a}_to_{b}"] = st["acc_ab"]
            logs[f"acc/{b}_to_{a}"] = st["acc_ba"]
            logs[f"n_pairs/{a}-{b}"] = st["n"]
        total = num / den.clamp(min=1e-12)
        return total, logs


def feature_spread_loss(
    h: Tensor, gamma: float = 1.0, decorrelation: float = 1.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """A penalty that keeps a batch of features from collapsing onto a few directions.

    VICReg's variance term, and a scale-free decorrelation term in the spirit of Barlow Twins' redundancy
    reduction. ``variance``: mean over features of ``relu(gamma - std)``; ``correlation``: mean square of the
    off-diagonal entries of the features' correlation matrix over the batch. Returns ``variance +
    decorrelation × correlation`` and both terms (detached) for logging. Local to the rank's batch; needs at
    least 2 rows.

    Args:
        h: (B, D) features (before any projection or normalisation).
        gamma: Target standard deviation of every feature.
        decorrelation: Weight of the correlation term.

    """
    h = h.float()
    centred = h - h.mean(dim=0)
    std = torch.sqrt(centred.var(dim=0) + 1e-4)
    variance = F.relu(gamma - std).mean()
    z = centred / std
    corr = z.T @ z / max(h.shape[0] - 1, 1)
    d = corr.shape[0]
    off = corr - torch.diag_embed(torch.diagonal(corr))
    correlation = off.square().sum() / max(d * (d - 1), 1)
    return variance + decorrelation * correlation, {"variance": variance.detach(), "correlation": correlation.detach()}
