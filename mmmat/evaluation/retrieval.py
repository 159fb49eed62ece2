"""Cross-modal retrieval metrics (recall@k, median rank, mean reciprocal rank) over embedding pools.

Similarities are cosine similarities (inputs are L2-normalised unless ``normalize=False``), computed in
chunks of query rows so that pools of tens of thousands fit in CPU memory. Ties are counted pessimistically:
the rank of the true item is 1 + the number of other gallery items scoring at least as high, so a constant
embedding never looks good.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cross_modal_retrieval", "rank_of_true", "retrieval_metrics"]


def rank_of_true(
    query: Tensor, gallery: Tensor, true_index: Tensor, chunk: int = 4096, normalize: bool = True
) -> Tensor:
    """Rank (1 = best) of each query's true gallery item, ties counted pessimistically.

    Args:
        query: (Nq, d) query embeddings.
        gallery: (Ng, d) gallery embeddings.
        true_index: (Nq,) index into ``gallery`` of each query's match.
        chunk: Query rows per similarity block (memory ≈ chunk · Ng · 4 bytes).
        normalize: L2-normalise both sides first (cosine similarity); otherwise plain dot products.

    Returns:
        (Nq,) int64 ranks in ``[1, Ng]``: 1 + the number of other gallery items with similarity
        ≥ the true one.

    """
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query {tuple(query.shape)} and gallery {tuple(gallery.shape)} must be (N, d) alike"
        )
    true_index = true_index.to(device=query.device, dtype=torch.long)
    if true_index.shape != (query.shape[0],):
        raise ValueError(f"true_index must have shape ({query.shape[0]},), got {tuple(true_index.shape)}")
    if true_index.numel() and (int(true_index.min()) < 0 or int(true_index.max()) >= gallery.shape[0]):
        raise ValueError(f"true_index out of range for a gallery of {gallery.shape[0]}")
    query = query.detach().float()
    gallery = gallery.detach().float().to(query.device)
    for name, emb in (("query", query), ("gallery", gallery)):
        # a NaN similarity compares false with everything, which would rank every query first
        bad = int((~torch.isfinite(emb).all(dim=1)).sum())
        if bad:
            raise ValueError(f"{bad} of {emb.shape[0]} {name} embeddings are not finite (NaN or Inf): no ranks")
    if normalize:
        query = F.normalize(query, dim=-1)
        gallery = F.normalize(gallery, dim=-1)
    ranks = torch.empty(query.shape[0], dtype=torch.long, device=query.device)
    for start in range(0, query.shape[0], max(1, chunk)):
        stop = min(start + max(1, chunk), query.shape[0])
        sims = query[start:stop] @ gallery.T  # (c, Ng)
        true_sim = sims.gather(1, true_index[start:stop, None])  # the same numbers as in the row
        ranks[start:stop] = (sims >= true_sim).sum(dim=1)  # counts the true item itself: rank 1 = best
    return ranks


def retrieval_metrics(
    query: Tensor,
    gallery: Tensor,
    true_index: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 4096,
    normalize: bool = True,
) -> dict[str, float]:
    """Recall@k, median rank and mean reciprocal rank of retrieving each query's true gallery item.

    Args:
        query: (Nq, d) query embeddings.
        gallery: (Ng, d) gallery embeddings.
        true_index: (Nq,) index into ``gallery`` of each query's match.
        ks: Cut-offs for recall@k.
        chunk: Query rows per similarity block.
        normalize: L2-normalise both sides first (cosine similarity).

    Returns:
        ``{"R@k": fraction with rank ≤ k, ..., "median_rank": median (midpoint of the two middle ranks for an
        even count), "mrr": mean of 1/rank, "n_queries": Nq, "n_gallery": Ng}``; metrics are NaN when Nq = 0.

    """
    ranks = rank_of_true(query, gallery, true_index, chunk=chunk, normalize=normalize)
    out: dict[str, float] = {}
    nan = float("nan")
    for k in ks:
        out[f"R@{k}"] = (ranks <= k).double().mean().item() if ranks.numel() else nan
    out["median_rank"] = torch.quantile(ranks.double(), 0.5).item() if ranks.numel() else nan
    out["mrr"] = (1.0 / ranks.double()).mean().item() if ranks.numel() else nan
    out["n_queries"] = float(ranks.numel())
    out["n_gallery"] = float(gallery.shape[0])
    return out


def cross_modal_retrieval(
    embeddings: Mapping[str, Tensor],
    present: Mapping[str, Tensor] | None = None,
    pairs: Iterable[tuple[str, str]] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 4096,
    normalize: bool = True,
) -> dict[str, float]:
    """Retrieval metrics for ordered modality pairs over a whole pool of materials.

    For a pair (q, t) the queries are the materials where q is present (and t too: otherwise there is no
    match to find), the gallery is every material where t is present, and the true match of a query is the
    same material's t embedding.

    Args:
        embeddings: Modality -> (N, d) embeddings; row i of every modality is material i.
        present: Modality -> (N,) bool presence; a modality without an entry counts as present everywhere.
        pairs: Ordered (query, target) modality pairs; default every ordered pair of distinct modalities.
        ks: Cut-offs for recall@k.
        chunk: Query rows per similarity block.
        normalize: L2-normalise embeddings first (cosine similarity).

    Returns:
        Flat dict keyed ``"{q}_to_{t}_{metric}"`` with the metrics of :func:`retrieval_metrics` (e.g.
        ``"xrd_to_crystal_R@1"``); pairs without any query are left out.

    """
    present = present or {}
    names = list(embeddings)
    if pairs is None:
        pairs = [(q, t) for q in names for t in names if q != t]
    out: dict[str, float] = {}
    for q, t in pairs:
        if q not in embeddings or t not in embeddings:
            raise KeyError(f"pair ({q!r}, {t!r}) names a modality not among {sorted(names)}")
        eq, et = embeddings[q], embeddings[t]
        n = eq.shape[0]
        if et.shape[0] != n:
            raise ValueError(f"{q} has {n} rows but {t} has {et.shape[0]}")
        mq = _mask(present.get(q), n, eq.device)
        mt = _mask(present.get(t), n, eq.device)
        queries = mq & mt
        if not bool(queries.any()):
            continue
        gallery_pos = torch.cumsum(mt.long(), 0) - 1  # position of each material inside the gallery
        metrics = retrieval_metrics(
            eq[queries], et[mt], gallery_pos[queries], ks=ks, chunk=chunk, normalize=normalize
        )
        for name, value in metrics.items():
            out[f"{q}_to_{t}_{name}"] = value
    return out


def _mask(mask: Tensor | None, n: int, device: torch.device) -> Tensor:
    """Presence mask as a (n,) bool tensor; all present when ``mask`` is None."""
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    mask = mask.to(device=device, dtype=torch.bool)
    if mask.shape != (n,):
        raise ValueError(f"presence mask must have shape ({n},), got {tuple(mask.shape)}")
    return mask
