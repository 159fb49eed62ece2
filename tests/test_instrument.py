"""The torch instrument model against hand-computed single-peak cases."""

from __future__ import annotations

import math

import pytest
import torch

from mmmat.xrd.instrument import (
    InstrumentParams,
    InstrumentRanges,
    march_dollase,
    orientation_cosines,
    render,
    sample_params,
    tch_pseudo_voigt,
    uniform_grid,
)

LAM1, LAM2, D = 1.5406, 1.5444, 2.0
TT1 = math.degrees(2 * math.asin(LAM1 / (2 * D)))  # 45.30°
F64 = torch.float64


def _one(**values):
    grid = uniform_grid(20.0, 70.0, 0.001, dtype=F64)
    p = InstrumentParams.fixed(1, dtype=F64, **values)
    d = torch.tensor([[D]], dtype=F64)
    y = render(d, torch.ones(1, 1, dtype=F64), torch.ones(1, 1, dtype=torch.bool), p, grid, normalize=False,
               noise=False)
    return grid, y[0]


def _fwhm(grid, y, around=TT1, span=3.0):
    sel = (grid - around).abs() < span
    g, v = grid[sel], y[sel]
    top = int(v.argmax())
    half = v[top] / 2
    left = g[:top][v[:top] < half][-1]
    right = g[top:][v[top:] < half][0]
    return float(g[top]), float(right - left), float(g[top] - left), float(right - g[top])


def test_position_width_area_gaussian():
    grid, y = _one()
    peak, fwhm, _, _ = _fwhm(grid, y)
    assert peak == pytest.approx(TT1, abs=0.001)
    assert fwhm == pytest.approx(0.1, abs=0.003)  # sqrt(W) with W = 0.01
    assert float(y.max()) == 1.0  # scaled to the strongest peak before background


def test_unit_area_peaks():
    # equal intensities at angles of different width (Caglioti U) and shape (size): equal areas
    grid = uniform_grid(20.0, 110.0, 0.001, dtype=F64)
    p = InstrumentParams.fixed(1, dtype=F64, U=0.05, size_nm=30.0)
    d = torch.tensor([[2.0, 1.0]], dtype=F64)
    y = render(d, torch.ones(1, 2, dtype=F64), torch.ones(1, 2, dtype=torch.bool), p, grid, noise=False)[0]
    mid = math.degrees(2 * math.asin(LAM1 / 3.0))
    a1, a2 = float(y[grid < mid].sum()), float(y[grid >= mid].sum())
    assert a1 == pytest.approx(a2, rel=0.02)
    assert float(y.max()) == 1.0 and float(y[grid >= mid].max()) < 0.7  # the wider peak is lower


def test_caglioti_and_scherrer_widths():
    U, V, W = 0.02, -0.01, 0.005
    th = math.radians(TT1 / 2)
    want = math.sqrt(U * math.tan(th) ** 2 + V * math.tan(th) + W)
    grid, y = _one(U=U, V=V, W=W)
    assert _fwhm(grid, y)[1] == pytest.approx(want, abs=0.003)
    # size broadening alone (Gaussian width negligible): Lorentzian FWHM = 0.9 λ / (L cos θ)
    size = 20.0
    want_l = math.degrees(0.9 * LAM1 / (size * 10 * math.cos(th)))
    grid, y = _one(W=1e-8, size_nm=size)
    assert _fwhm(grid, y, span=5)[1] == pytest.approx(want_l, rel=0.02)
    h, eta = tch_pseudo_voigt(torch.tensor(0.0), torch.tensor(want_l))
    assert float(eta) == pytest.approx(1.0, abs=1e-3) and float(h) == pytest.approx(want_l)


def test_ka2_doublet():
    grid, y = _one(ka2_ratio=0.5, W=0.0004)  # 0.02° peaks resolve the doublet at 45°
    tt2 = math.degrees(2 * math.asin(LAM2 / (2 * D)))
    i1 = int(torch.argmin((grid - TT1).abs()))
    i2 = int(torch.argmin((grid - tt2).abs()))
    assert float(y[i2] / y[i1]) == pytest.approx(0.5, abs=0.02)
    assert abs(tt2 - TT1 - 0.115) < 0.01  # hand value: Δ2θ = 2 Δλ/λ tan θ


def test_displacement_and_zero_shift():
    s, R, z = 0.2, 240.0, 0.03
    th = math.radians(TT1 / 2)
    want = TT1 + math.degrees(-2 * s * math.cos(th) / R) + z
    grid, y = _one(displacement_mm=s, radius_mm=R, zero_shift=z)
    assert _fwhm(grid, y)[0] == pytest.approx(want, abs=0.0015)


def test_asymmetry_splits_the_halves():
    A = 0.2
    a = A / math.tan(math.radians(TT1))  # 0.198
    grid, y = _one(asymmetry=A)
    _, fwhm, left, right = _fwhm(grid, y)
    assert left / right == pytest.approx((1 + a) / (1 - a), rel=0.05)
    assert fwhm == pytest.approx(0.1, abs=0.004)  # halves 0.05(1 + a) + 0.05(1 - a)


def test_march_dollase_values():
    r = torch.tensor(0.7)
    assert float(march_dollase(torch.tensor(1.0), r)) == pytest.approx(0.7**-3)
    assert float(march_dollase(torch.tensor(0.0), r)) == pytest.approx(0.7**1.5)
    assert float(march_dollase(torch.tensor(0.3), torch.tensor(1.0))) == pytest.approx(1.0)
    lat = torch.eye(3).unsqueeze(0).repeat(2, 1, 1) * 4.0
    cos = orientation_cosines(torch.tensor([[0, 0, 1], [1, 1, 0]]), lat, torch.tensor([[0, 0, 1], [0, 0, 1]]))
    assert torch.allclose(cos, torch.tensor([1.0, 0.0]), atol=1e-6)


def test_background_hump_range_and_noise():
    grid, y = _one(background=[0.1, 0.0, 0.0, 0.0], hump_height=0.2, hump_center=30.0, hump_fwhm=8.0,
                   two_theta_min=25.0, two_theta_max=60.0)
    i30 = int(torch.argmin((grid - 30).abs()))
    assert float(y[i30]) == pytest.approx(0.3, abs=1e-3)  # flat 0.1 + hump 0.2 at its centre
    i34 = int(torch.argmin((grid - 34).abs()))
    assert float(y[i34]) == pytest.approx(0.1 + 0.2 * 0.5, abs=1e-3)  # half the hump at half its FWHM
    assert not y[grid < 25].any() and not y[grid > 60].any()
    # Poisson: mean kept, variance = mean / counts on a flat background
    flat = InstrumentParams.fixed(64, dtype=F64, background=torch.full((64, 1), 0.5, dtype=F64), counts=400.0)
    gen = torch.Generator().manual_seed(0)
    g = uniform_grid(20.0, 40.0, 0.05, dtype=F64)
    out = render(torch.full((64, 1), 10.0, dtype=F64), torch.ones(64, 1, dtype=F64),
                 torch.ones(64, 1, dtype=torch.bool), flat, g, normalize=False, generator=gen)
    assert float(out.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(out.var()) == pytest.approx(0.5 / 400, rel=0.1)


def test_sampled_batch_renders():
    ranges = InstrumentRanges.from_dict({"size_nm": [10, 100], "counts": [1e3, 1e4]})
    gen = torch.Generator().manual_seed(1)
    p = sample_params(ranges, 8, gen)
    assert float(p.size_nm.min()) >= 10 and float(p.size_nm.max()) <= 100
    d = torch.rand(8, 30, generator=gen) * 4 + 1
    y = render(d, torch.rand(8, 30, generator=gen), torch.ones(8, 30, dtype=torch.bool), p,
               uniform_grid(5, 90, 0.02), generator=gen)
    assert y.shape == (8, 4251) and torch.isfinite(y).all() and torch.allclose(y.amax(1), torch.ones(8))
    with pytest.raises(ValueError, match="unknown instrument range"):
        InstrumentRanges.from_dict({"sizes": [1, 2]})
