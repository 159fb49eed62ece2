"""The one peak-to-profile renderer (torch) against the numpy path, and the one background estimator."""

import numpy as np
import pytest
import torch

from mmmat.data.profile import background, render_lines
from mmmat.data.xrd import TWO_THETA, d_to_two_theta, estimate_background, render_profile
from mmmat.encoders.spectrum import remove_background_torch


def _peaks(seed, n=25):
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(1.0, 6.0, n), rng.uniform(1.0, 100.0, n)])


@pytest.mark.parametrize(("fwhm", "eta"), [(0.1, 0.0), (0.35, 0.5), (0.05, 1.0)])
def test_numpy_path_agrees_with_the_torch_renderer(fwhm, eta):
    peaks = [_peaks(s) for s in range(3)]
    pos = torch.tensor(np.concatenate([d_to_two_theta(p[:, 0]) for p in peaks]))
    height = torch.tensor(np.concatenate([p[:, 1] for p in peaks]))
    owner = torch.repeat_interleave(torch.arange(3), 25)
    grid = torch.tensor(TWO_THETA, dtype=torch.float64)
    for max_width in (None, 2 * int(10 * fwhm / 0.05) + 2):  # own window per line, or one bound for all
        out = render_lines(pos, height, torch.tensor(fwhm, dtype=torch.float64), owner, 3, grid, eta=eta,
                           valid=torch.isfinite(pos), max_width=max_width)
        out = (out / out.amax(dim=1, keepdim=True)).numpy()
        for b, p in enumerate(peaks):
            np.testing.assert_allclose(out[b], render_profile(p, fwhm=fwhm, eta=eta), atol=2e-6)


def test_asymmetric_lines_keep_their_area_and_lean():
    grid = torch.linspace(20.0, 40.0, 4001, dtype=torch.float64)
    pos, h = torch.tensor([30.0, 30.0], dtype=torch.float64), torch.tensor([0.3, 0.3], dtype=torch.float64)
    out = render_lines(pos, torch.ones(2, dtype=torch.float64), h, torch.tensor([0, 1]), 2, grid,
                       asymmetry=torch.tensor([0.0, 0.3], dtype=torch.float64))
    area = torch.trapezoid(out, grid, dim=1).tolist()
    assert area[1] == pytest.approx(area[0], rel=1e-3)  # the halves trade width, not area
    below = out[:, grid < 30.0].sum(dim=1)
    assert below[1] > 1.2 * below[0]  # a = 0.3 widens the low-angle side


def _opening_reference(y, points):
    """The opening background written out with numpy windows (the estimator's definition)."""
    def rolling(v, window, reducer):
        half = window // 2
        padded = np.pad(v, (half, half), mode="edge")
        return reducer(np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1), axis=1)

    opened = rolling(rolling(y, points, np.min), points, np.max)
    return rolling(opened, max(3, points // 2), np.mean)


def test_one_background_estimator_for_numpy_and_torch_callers():
    rng = np.random.default_rng(0)
    tt = TWO_THETA.astype(np.float64)
    y = render_profile(_peaks(4), fwhm=0.2).astype(np.float64) + 0.2 + 0.002 * tt + rng.normal(0, 0.01, tt.size)
    ref = _opening_reference(y, 80)
    np.testing.assert_allclose(estimate_background(tt, y, 4.0), ref, atol=1e-12)
    np.testing.assert_allclose(background(torch.from_numpy(y)[None], 80)[0].numpy(), ref, atol=1e-12)
    removed = remove_background_torch(torch.from_numpy(y)[None], 80)[0].numpy()
    expect = np.clip(y - ref, 0, None)
    np.testing.assert_allclose(removed, expect / expect.max(), atol=1e-12)
