"""Acquisition under a budget of oracle calls: random, greedy, UCB and batch log expected improvement.

Every objective is a window ``[min, max]`` on a property. A candidate's score is minus the sum over objectives of
its violation (distance outside the window divided by the objective's scale); 0 means inside every window.

- ``random``: a uniform sample.
- ``greedy``: the best score of the surrogate means.
- ``ucb``: the best optimistic score: each violation shrunk by ``kappa`` surrogate standard deviations.
- ``qei``: botorch's ``qLogExpectedImprovement`` on a Gaussian process (``SingleTaskGP``) over the candidates'
  embeddings together with their surrogate means and deviations, fitted to the scores of every candidate the
  oracle has verified (oracle values where the oracle measures the objective, surrogate means elsewhere);
  the batch is chosen with ``optimize_acqf_discrete`` among the ``max_choices`` best candidates by UCB. Until
  the oracle has verified four candidates it falls back to UCB (the report says so). The GP sees the inputs'
  first :data:`GP_DIMS` principal components (verified and candidate inputs together, after min-max scaling):
  an ARD kernel over a 128-d embedding fits and evaluates several times slower, and a round of 100 picks among
  1,000 candidates took minutes. It runs on the GPU when there is one.

Candidates beyond the distance-to-data threshold are penalised or excluded when the guard says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: principal components of the GP inputs kept for ``qei`` (0: every input)
GP_DIMS = 16
#: quasi-Monte Carlo samples of the ``qei`` acquisition
QEI_SAMPLES = 64


def violation(values: np.ndarray, objectives: Sequence, slack: np.ndarray | None = None) -> np.ndarray:
    """Summed scaled distance outside each window; ``values`` (N, K) in objective order, NaN = unknown (0)."""
    v = np.zeros(len(values))
    for k, o in enumerate(objectives):
        x = values[:, k]
        s = 0.0 if slack is None else slack[:, k]
        lo = -np.inf if o.min is None else o.min
        hi = np.inf if o.max is None else o.max
        d = np.maximum(0.0, np.maximum(lo - x - s, x - hi - s)) / max(o.scale, 1e-9)
        v += np.nan_to_num(d, nan=0.0)
    return v


def select(strategy: str, k: int, mean: np.ndarray, std: np.ndarray, embedding: np.ndarray, objectives: Sequence,
           rng: np.random.Generator, kappa: float = 1.0, penalty: np.ndarray | None = None,
           labelled: tuple[np.ndarray, np.ndarray] | None = None, max_choices: int = 1000,
           seed: int = 0) -> tuple[list[int], np.ndarray, str]:
    """Pick ``k`` candidates.

    Args:
        strategy: ``random``, ``greedy``, ``ucb`` or ``qei``.
        k: Picks.
        mean: (N, K) surrogate means per objective (NaN where no surrogate predicts it).
        std: (N, K) surrogate standard deviations.
        embedding: (N, D) candidate embeddings (``qei``).
        objectives: The objectives.
        rng: Random generator (``random``).
        kappa: UCB optimism.
        penalty: (N,) subtracted from the score (distance-to-data guard), or None.
        labelled: ``(X, y)`` GP inputs (embedding + means + deviations) and scores of verified candidates.
        max_choices: Candidates passed to the GP acquisition.
        seed: Seed of the GP fit and Monte Carlo samples.

    Returns:
        The picked indices in pick order, their acquisition values, and the strategy actually used.
    """
    n = len(mean)
    k = min(k, n)
    if k <= 0:
        return [], np.zeros(0), strategy
    pen = np.zeros(n) if penalty is None else np.asarray(penalty, dtype=float)
    if strategy == "random":
        idx = rng.permutation(n)[:k]
        return [int(i) for i in idx], np.zeros(k), "random"
    greedy = -violation(mean, objectives) - pen
    ucb = -violation(mean, objectives, slack=kappa * np.nan_to_num(std)) - pen
    if strategy == "greedy":
        order = np.lexsort((-ucb, -greedy))[:k]
        return [int(i) for i in order], greedy[order], "greedy"
    if strategy == "qei":
        if labelled is not None and len(labelled[1]) >= 4 and np.ptp(labelled[1]) > 0:
            x_c = gp_inputs(embedding, mean, std)
            choices = np.argsort(-ucb, kind="stable")[: max(max_choices, k)]
            choices = choices[np.isfinite(ucb[choices])]
            picked, vals = _qei(labelled[0], labelled[1], x_c[choices], k, seed)
            return [int(choices[i]) for i in picked], vals, "qei"
        order = np.argsort(-ucb, kind="stable")[:k]
        return [int(i) for i in order], ucb[order], "ucb (qei needs 4 verified candidates)"
    order = np.argsort(-ucb, kind="stable")[:k]
    return [int(i) for i in order], ucb[order], "ucb"


def gp_inputs(embedding: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """GP inputs: the embedding with the surrogate means and deviations appended (NaN as 0)."""
    return np.nan_to_num(np.concatenate([embedding, mean, std], 1).astype(np.float64))


def reduce_inputs(x_train: np.ndarray, x_cand: np.ndarray, dims: int = GP_DIMS) -> tuple[np.ndarray, np.ndarray]:
    """The GP inputs of :func:`_qei`: both sets min-max scaled over their union (constant columns dropped).

    Then projected on the union's first ``dims`` principal components (kept whole when ``dims`` is 0 or not
    smaller than the columns).
    """
    allx = np.concatenate([x_train, x_cand])
    lo, hi = allx.min(0), allx.max(0)
    keep = (hi - lo) > 1e-9
    z = (allx[:, keep] - lo[keep]) / (hi[keep] - lo[keep])
    if 0 < dims < z.shape[1]:
        zc = z - z.mean(0)
        _, _, vt = np.linalg.svd(zc, full_matrices=False)
        z = zc @ vt[:dims].T
    return z[: len(x_train)], z[len(x_train) :]


def _qei(
    x_train: np.ndarray, y_train: np.ndarray, x_cand: np.ndarray, q: int, seed: int
) -> tuple[list[int], np.ndarray]:
    import torch
    from botorch.acquisition.logei import qLogExpectedImprovement
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Normalize, Standardize
    from botorch.optim import optimize_acqf_discrete
    from botorch.sampling import SobolQMCNormalSampler
    from gpytorch.mlls import ExactMarginalLogLikelihood

    torch.manual_seed(seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    zt, zc = reduce_inputs(x_train, x_cand)
    # a common scale for train and candidates: bounds over both, then the GP normalises to [0, 1]
    allz = np.concatenate([zt, zc])
    xt = torch.as_tensor(zt, dtype=torch.float64, device=dev)
    xc = torch.as_tensor(zc, dtype=torch.float64, device=dev)
    yt = torch.as_tensor(y_train, dtype=torch.float64, device=dev).reshape(-1, 1)
    bounds = torch.as_tensor(np.stack([allz.min(0), allz.max(0) + 1e-9]), dtype=torch.float64, device=dev)
    model = SingleTaskGP(xt, yt, input_transform=Normalize(xt.shape[1], bounds=bounds),
                         outcome_transform=Standardize(1))
    try:
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    except Exception:  # noqa: BLE001 - an unconverged fit still gives a usable posterior
        pass
    sampler = SobolQMCNormalSampler(torch.Size([QEI_SAMPLES]), seed=seed)
    acq = qLogExpectedImprovement(model, best_f=yt.max(), sampler=sampler)
    q = min(q, len(xc))
    cand, vals = optimize_acqf_discrete(acq, q=q, choices=xc, unique=True)
    picked: list[int] = []
    for row in cand:
        hit = torch.nonzero((xc == row).all(1)).flatten().tolist()
        j = next((h for h in hit if h not in picked), None)
        if j is not None:
            picked.append(j)
    v = vals.detach().cpu().numpy().reshape(-1)
    if v.size != len(picked):
        v = np.full(len(picked), float(v.reshape(-1)[-1]) if v.size else 0.0)
    return picked, v
