import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_effective_rank_counts_the_directions_used():
    from feature_probe import effective_rank

    rng = np.random.default_rng(0)
    full = rng.normal(size=(2000, 8))
    assert effective_rank(full) == pytest.approx(8, rel=0.05)
    collapsed = full[:, :2] @ rng.normal(size=(2, 8))  # rank 2 in 8 columns
    assert effective_rank(collapsed) < 2.01


def test_ridge_probe_recovers_a_linear_target_and_picks_its_penalty_without_the_validation_rows():
    from feature_probe import ridge_probe

    rng = np.random.default_rng(1)
    w = rng.normal(size=6)
    x, xv = rng.normal(size=(400, 6)), rng.normal(size=(200, 6))
    res = ridge_probe(x, x @ w + 3.0, xv, xv @ w + 3.0)
    assert res["val_mae"] < 0.05 and res["penalty"] <= 1.0
    noise = ridge_probe(x, rng.normal(size=400), xv, rng.normal(size=200))
    assert noise["penalty"] >= 100.0  # nothing to learn: the CV picks the strongest shrinkage
