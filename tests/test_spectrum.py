import math

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from mmmat.data.augment import BENCHMARK_CASES, XRDAugment, corrupt_profile
from mmmat.data.batch import Collator
from mmmat.data.schema import MaterialRecord
from mmmat.data.xrd import (
    CU_KA,
    NUM_POINTS,
    TWO_THETA,
    TWO_THETA_STEP,
    MeasuredPattern,
    compute_peaks,
    d_to_two_theta,
    estimate_background,
    render_profile,
    render_profile_torch,
    resample,
)
from mmmat.encoders import create_encoder
from mmmat.encoders.spectrum import LogDResampler, XRDCNNEncoder, remove_background_torch

SMALL = dict(out_dim=16, num_bins=512, widths=[8, 16], depths=[1, 1], hidden_dim=32, groups=4)


# ---------------------------------------------------------------------------------------------- fixtures
def _structures() -> dict[str, Structure]:
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    zno = Structure.from_spacegroup(
        "P6_3mc", Lattice.hexagonal(3.25, 5.21), ["Zn", "O"], [[1 / 3, 2 / 3, 0.0], [1 / 3, 2 / 3, 0.382]]
    )
    tric = Structure(
        Lattice.from_parameters(5.1, 6.3, 7.2, 82.0, 95.0, 103.0),
        ["Ca", "Ti", "O", "O", "O"],
        [[0.1, 0.2, 0.3], [0.55, 0.45, 0.7], [0.3, 0.8, 0.1], [0.7, 0.1, 0.45], [0.9, 0.6, 0.85]],
    )
    return {"NaCl": nacl, "ZnO": zno, "tric": tric}


@pytest.fixture(scope="module")
def peaks() -> dict[str, np.ndarray]:
    return {name: compute_peaks(s) for name, s in _structures().items()}


@pytest.fixture(scope="module")
def batch(peaks):
    records = []
    for name, s in _structures().items():
        p = peaks[name]
        records.append(MaterialRecord.from_structure(s, name, xrd=render_profile(p), xrd_peaks=p))
    return Collator(build_graph=False)(records)


def _padded(peaks: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(p) for p in peaks.values())
    out = torch.zeros(len(peaks), n, 2)
    mask = torch.zeros(len(peaks), n, dtype=torch.bool)
    for i, p in enumerate(peaks.values()):
        out[i, : len(p)] = torch.from_numpy(p)
        mask[i, : len(p)] = True
    return out, mask


def _strongest(p: np.ndarray, k: int) -> np.ndarray:
    """d-spacings of the k strongest peaks that are isolated (no other peak within 0.6° 2θ)."""
    tt = d_to_two_theta(p[:, 0])
    isolated = [i for i in range(len(p)) if np.sum(np.abs(tt - tt[i]) < 0.6) == 1 and 8 < tt[i] < 87]
    order = sorted(isolated, key=lambda i: -p[i, 1])[:k]
    return p[order, 0]


def _centroid(profile: np.ndarray, centre: float, half: float = 0.25) -> float:
    """Intensity-weighted mean 2θ of the profile within centre ± half degrees."""
    sel = np.abs(TWO_THETA - centre) <= half
    w = np.clip(profile[sel], 0, None)
    return float((TWO_THETA[sel] * w).sum() / w.sum())


# ---------------------------------------------------------------------------------------------- XRDAugment
def test_augment_shape_max_finite(batch):
    aug = XRDAugment()
    out = aug(batch, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, NUM_POINTS) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.amax(dim=1), torch.ones(3))


def test_augment_off_equals_render(batch):
    out = XRDAugment.off(fwhm=0.1)(batch, generator=torch.Generator().manual_seed(1))
    ref = render_profile_torch(
        batch.xrd["peaks"][..., 0], batch.xrd["peaks"][..., 1], batch.xrd["peak_mask"], fwhm=0.1
    )
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # and the torch renderer agrees with the numpy one stored in the batch
    torch.testing.assert_close(out, batch.xrd["profile"], atol=1e-4, rtol=0)


def test_augment_strain_follows_bragg(peaks):
    pk, mask = _padded(peaks)
    aug = XRDAugment.off(fwhm=0.1, p_strain=1.0, max_strain=0.03)
    out, params = aug(
        peaks=pk, peak_mask=mask, generator=torch.Generator().manual_seed(3), return_params=True
    )
    eps = params["strain"].numpy()
    assert np.abs(eps).max() <= 0.03 and np.abs(eps).max() > 0.005
    moved = 0
    for row, p in enumerate(peaks.values()):
        for d in _strongest(p, 3):
            expected = float(d_to_two_theta(d * (1 + eps[row])))
            assert abs(_centroid(out[row].numpy(), expected) - expected) < 0.01
            moved += abs(expected - float(d_to_two_theta(d))) > 0.1
    assert moved >= 3  # the strain moved peaks measurably


def test_augment_deterministic_under_generator(batch):
    aug = XRDAugment()
    a = aug(batch, generator=torch.Generator().manual_seed(7))
    b = aug(batch, generator=torch.Generator().manual_seed(7))
    c = aug(batch, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_augment_ranges_respected(peaks):
    pk, mask = _padded(peaks)
    pk, mask = pk.repeat(20, 1, 1), mask.repeat(20, 1)
    aug = XRDAugment(max_strain=0.02, max_shift=0.1, fwhm_min=0.2, fwhm_max=0.3, max_noise=0.01)
    out, prm = aug(peaks=pk, peak_mask=mask, generator=torch.Generator().manual_seed(0), return_params=True)
    assert prm["strain"].abs().max() <= 0.02 and (prm["strain"] == 0).any() and (prm["strain"] != 0).any()
    assert prm["shift"].abs().max() <= 0.1
    assert ((prm["fwhm"] >= 0.2) & (prm["fwhm"] <= 0.3)).all()
    assert prm["noise"].max() <= 0.01 and prm["background"].max() <= 0.1
    assert torch.isfinite(out).all()


def test_augment_max_peaks_keeps_strongest(peaks):
    p = peaks["tric"]
    pk, mask = _padded({"tric": p})
    out = XRDAugment.off(fwhm=0.1, max_peaks=5)(peaks=pk, peak_mask=mask)
    top = p[np.argsort(-p[:, 1])[:5]]
    np.testing.assert_allclose(out[0].numpy(), render_profile(top, fwhm=0.1), atol=1e-4)
    assert len(p) > 5


def test_augment_without_peaks(peaks):
    pk, mask = _padded(peaks)
    mask[1] = False  # one sample without any peak
    aug = XRDAugment(
        p_strain=1, p_aniso=1, p_shift=1, p_intensity=1, p_drop=1, p_impurity=1, p_background=1, p_noise=1
    )
    out = aug(peaks=pk, peak_mask=mask, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(NUM_POINTS))
    torch.testing.assert_close(out[[0, 2]].amax(dim=1), torch.ones(2))
    empty = aug(peaks=torch.zeros(2, 1, 2), peak_mask=torch.zeros(2, 1, dtype=torch.bool))
    assert torch.equal(empty, torch.zeros(2, NUM_POINTS))


def test_augment_impurity_and_background_change_profile(peaks):
    pk, mask = _padded(peaks)
    g = torch.Generator().manual_seed(0)
    base = XRDAugment.off(fwhm=0.1)(peaks=pk, peak_mask=mask)
    imp = XRDAugment.off(fwhm=0.1, p_impurity=1.0, max_impurity_peaks=3, max_impurity_intensity=10.0)(
        peaks=pk, peak_mask=mask, generator=g
    )
    # 1 to 3 impurity peaks of at most 10 % each: never more than 0.3 above the clean profile
    diff = imp - base
    assert (diff.amax(dim=1) > 0.005).all() and diff.max() < 0.3 + 1e-4
    bg = XRDAugment.off(fwhm=0.1, p_background=1.0, max_background=0.1)(peaks=pk, peak_mask=mask, generator=g)
    assert (bg.amin(dim=1) >= 0).all()
    # background is smooth: far from any peak, the profile is positive
    assert ((bg > 0).float().mean(dim=1) > 0.5).all()


# ------------------------------------------------------------------------------------------- corrupt_profile
def test_corrupt_profile_clean_equals_render(peaks):
    p = peaks["ZnO"]
    out = corrupt_profile(p[:, 0], p[:, 1], fwhm=0.1)
    assert out.shape == (NUM_POINTS,)
    np.testing.assert_allclose(out.numpy(), render_profile(p, fwhm=0.1), atol=1e-5)


@pytest.mark.parametrize("strain", [0.01, 0.02])
def test_corrupt_profile_strain_positions(peaks, strain):
    p = peaks["tric"]
    out = corrupt_profile(p[:, 0], p[:, 1], strain=strain).numpy()
    for d in _strongest(p, 4):
        expected = float(d_to_two_theta(d * (1 + strain)))
        assert abs(_centroid(out, expected) - expected) < 0.01
        assert expected < float(d_to_two_theta(d)) - 0.05  # larger d, lower angle


def test_corrupt_profile_shift_positions(peaks):
    p = peaks["NaCl"]
    clean = corrupt_profile(p[:, 0], p[:, 1]).numpy()
    shifted = corrupt_profile(p[:, 0], p[:, 1], shift=0.1).numpy()
    steps = round(0.1 / TWO_THETA_STEP)
    np.testing.assert_allclose(shifted[steps:-steps], clean[: -2 * steps], atol=1e-4)
    for d in _strongest(p, 3):
        tt = float(d_to_two_theta(d))
        assert abs(_centroid(shifted, tt + 0.1) - _centroid(clean, tt) - 0.1) < 1e-3


def test_corrupt_profile_background_slope(peaks):
    p = peaks["NaCl"]
    clean = corrupt_profile(p[:, 0], p[:, 1], normalize=False).numpy()
    t = (TWO_THETA - TWO_THETA[0]) / (TWO_THETA[-1] - TWO_THETA[0])
    up = corrupt_profile(p[:, 0], p[:, 1], background_slope=0.05, normalize=False).numpy()
    np.testing.assert_allclose(up - clean, 0.05 * t, atol=1e-6)
    down = corrupt_profile(p[:, 0], p[:, 1], background_slope=-0.05, normalize=False).numpy()
    np.testing.assert_allclose(down - clean, 0.05 * (1 - t), atol=1e-6)
    normed = corrupt_profile(p[:, 0], p[:, 1], background_slope=0.05).numpy()
    assert normed.max() == pytest.approx(1.0)
    np.testing.assert_allclose(normed * up.max(), up, atol=1e-5)


def test_corrupt_profile_noise_sigma_and_seeds(peaks):
    p = peaks["NaCl"]
    clean = corrupt_profile(p[:, 0], p[:, 1], normalize=False).numpy()
    noisy = corrupt_profile(p[:, 0], p[:, 1], noise=0.02, seed=5, normalize=False).numpy()
    resid = noisy - clean
    assert resid.std() == pytest.approx(0.02, rel=0.1)
    assert abs(resid.mean()) < 0.003
    again = corrupt_profile(p[:, 0], p[:, 1], noise=0.02, seed=5, normalize=False).numpy()
    assert np.array_equal(noisy, again)
    # per-row seeds: a row's query does not depend on the batch it is built in
    d2 = np.stack([p[:, 0], p[:, 0]])
    i2 = np.stack([p[:, 1], p[:, 1]])
    both = corrupt_profile(d2, i2, noise=0.02, seed=[5, 6], normalize=False)
    assert both.shape == (2, NUM_POINTS)
    single = corrupt_profile(p[:, 0], p[:, 1], noise=0.02, seed=[6], normalize=False)
    torch.testing.assert_close(both[1], single)
    assert not torch.allclose(both[0], both[1])


def test_benchmark_cases_run(peaks):
    p = peaks["tric"]
    for name, kw in BENCHMARK_CASES.items():
        out = corrupt_profile(p[:, 0], p[:, 1], seed=0, **kw)
        assert torch.isfinite(out).all() and out.max() == pytest.approx(1.0), name
    combined = corrupt_profile(p[:, 0], p[:, 1], seed=0, **BENCHMARK_CASES["strain_1pct_shift_noise_bg"])
    # the 5 % slope shows at the high-angle end, where the tric pattern has weak peaks on average
    assert combined[-200:].mean() > combined[:200].mean()


# ---------------------------------------------------------------------------------------------- ln d grid
def test_resampler_grid_and_weights():
    rs = LogDResampler(num_bins=1024)
    d_hi, d_lo = (float(CU_KA / (2 * math.sin(math.radians(t / 2)))) for t in (TWO_THETA[0], TWO_THETA[-1]))
    assert rs.log_d[0] > math.log(d_lo) and rs.log_d[-1] < math.log(d_hi)
    assert rs.step == pytest.approx((math.log(d_hi) - math.log(d_lo)) / 1024)
    torch.testing.assert_close(rs.weight.sum(dim=1), torch.ones(1024))
    assert rs.index.shape[1] <= 8  # sparse: a few taps per bin
    ones = rs(torch.ones(2, NUM_POINTS))
    torch.testing.assert_close(ones, torch.ones(2, 1024))


def test_resampler_keeps_narrow_high_angle_peaks():
    rs = LogDResampler(num_bins=1024)
    # a narrow peak at high angle, where several 2θ points fall in one ln d bin: its area (in u) survives
    for tt in (80.0, 80.02, 80.04):
        d = CU_KA / (2 * math.sin(math.radians(tt / 2)))
        prof = render_profile_torch(
            torch.tensor([[d]]), torch.tensor([[100.0]]), torch.ones(1, 1, dtype=torch.bool), fwhm=0.05
        )
        out = rs(prof)[0]
        dudtt = math.radians(0.5) / math.tan(math.radians(tt / 2))  # |du/d(2θ)| per degree
        area_tt = float(prof.sum()) * TWO_THETA_STEP * dudtt
        assert float(out.sum()) * rs.step == pytest.approx(area_tt, rel=0.03)
        assert float(rs.log_d[out.argmax()]) == pytest.approx(math.log(d), abs=rs.step)


@pytest.mark.parametrize("name", ["NaCl", "tric"])
def test_strain_is_translation_in_log_d(peaks, name):
    rs = LogDResampler(num_bins=2048)
    p = torch.from_numpy(peaks[name])[None]
    mask = torch.ones(p.shape[:2], dtype=torch.bool)
    clean = render_profile_torch(p[..., 0], p[..., 1], mask, fwhm=0.1)
    strained = render_profile_torch(p[..., 0], p[..., 1], mask, fwhm=0.1, strain=torch.tensor([0.01]))
    a, b = rs(clean)[0], rs(strained)[0]
    expected = math.log(1.01) / rs.step  # about 7.3 bins
    lags = list(range(-30, 31))
    corr = [
        float((a[max(0, -k) : len(a) - max(0, k)] * b[max(0, k) : len(b) - max(0, -k)]).sum()) for k in lags
    ]
    best = lags[int(np.argmax(corr))]
    assert abs(best - expected) <= 1.0
    # in 2θ no single shift aligns the patterns: the best 2θ-lag correlation is clearly worse
    a2, b2 = clean[0], strained[0]
    corr2 = [
        float((a2[max(0, -k) : len(a2) - max(0, k)] * b2[max(0, k) : len(b2) - max(0, -k)]).sum())
        for k in range(-40, 41)
    ]
    assert max(corr2) / float((a2 * a2).sum()) < 0.9 * max(corr) / float((a * a).sum())


def test_background_removal_matches_numpy():
    rng = np.random.default_rng(0)
    t = (TWO_THETA - 5) / 85
    prof = render_profile(np.array([[3.0, 100.0], [2.1, 40.0], [1.3, 20.0]]), fwhm=0.2)
    prof = prof + 0.1 * (1 - t) + 0.01 * rng.random(NUM_POINTS)
    ref = np.clip(prof - estimate_background(TWO_THETA.astype(np.float64), prof, 4.0), 0, None)
    ref /= ref.max()
    out = remove_background_torch(torch.from_numpy(prof.astype(np.float64))[None], 80)[0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-9)
    assert out[: NUM_POINTS // 10].mean() < 0.05  # the sloped background is gone


# ---------------------------------------------------------------------------------------------- encoder
def test_encoder_registry_forward_backward(batch):
    enc = create_encoder("xrd/cnn", **SMALL)
    assert isinstance(enc, XRDCNNEncoder) and enc.out_dim == 16
    out = enc(batch)
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    out.square().sum().backward()
    grads = [p.grad for p in enc.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # residual branches start as zero (last norm's scale is 0): their scales get gradient, the rest flows
    named = dict(enc.named_parameters())
    zero_init = [n for n in named if n.endswith("norm2.weight")]
    assert zero_init and all(named[n].grad.abs().sum() > 0 for n in zero_init)
    for n in ("stem.0.weight", "head.1.weight", "head.4.weight", "pos_proj.0.weight", "pos_proj.1.weight"):
        assert named[n].grad.abs().sum() > 0, n
    # an explicit profile (e.g. augmented) replaces the batch's profiles, and gradients reach it
    prof = XRDAugment()(batch, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out2 = enc(batch, profile=prof)
    assert out2.shape == (3, 16) and not torch.allclose(out, out2)
    out2.sum().backward()
    assert prof.grad is not None and torch.isfinite(prof.grad).all() and prof.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "cfg",
    [
        dict(norm="batch", intensity="log"),
        dict(intensity="none", background_window=0.0, num_pos_freqs=-1),
        dict(num_pos_freqs=0, kernel_size=3, dropout=0.1),
    ],
)
def test_encoder_variants(batch, cfg):
    enc = create_encoder("xrd/cnn", **{**SMALL, **cfg})
    out = enc(batch)
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    out.sum().backward()
    enc.eval()
    with torch.no_grad():
        assert torch.isfinite(enc(batch)).all()


def test_encoder_zero_rows_and_measured_input(peaks):
    enc = create_encoder("xrd/cnn", **SMALL).eval()
    # a measured-like pattern (other step and range, sloped background), through resample
    tt = np.arange(10.0, 80.0, 0.02)
    y = render_profile(peaks["ZnO"], grid=tt, fwhm=0.15) * 1000 + 50 + 0.5 * tt
    measured = resample(MeasuredPattern(tt, y, CU_KA, source="synthetic"))
    prof = torch.stack([torch.from_numpy(measured), torch.zeros(NUM_POINTS)])
    with torch.no_grad():
        out = enc(profile=prof)
        assert out.shape == (2, 16) and torch.isfinite(out).all()
        # rows are independent (GroupNorm): the measured row does not depend on the zero row
        torch.testing.assert_close(enc(profile=prof[:1]), out[:1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="points"):
        enc(profile=torch.zeros(2, 100))


def test_encoder_default_size():
    enc = XRDCNNEncoder()
    n = sum(p.numel() for p in enc.parameters())
    assert 1_000_000 < n < 5_000_000
    assert enc.resampler.num_bins == 2048 and enc.out_dim == 256


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_augment_and_encoder_bf16(batch):
    dev = torch.device("cuda")
    b = batch.to(dev)
    prof = XRDAugment().to(dev)(b, generator=torch.Generator(device=dev).manual_seed(0))
    assert prof.device.type == "cuda" and torch.isfinite(prof).all()
    again = XRDAugment().to(dev)(b, generator=torch.Generator(device=dev).manual_seed(0))
    torch.testing.assert_close(prof, again, atol=1e-5, rtol=0)  # scatter_add atomics: equal to rounding
    cpu = XRDAugment.off()(batch)
    torch.testing.assert_close(XRDAugment.off().to(dev)(b).cpu(), cpu, atol=1e-5, rtol=0)
    enc = create_encoder("xrd/cnn", **SMALL).to(dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = enc(b, profile=prof)
    assert out.shape == (3, 16) and torch.isfinite(out.float()).all()
    out.float().sum().backward()


@pytest.mark.parametrize("length", [7, 8, 1024, 1025])
def test_window_max_is_maxpool(length):
    """The CNN's stem pooling gives nn.MaxPool1d's output and, without ties, its gradient."""
    from torch import nn

    from mmmat.encoders.spectrum import WindowMax1d

    x = torch.randn(3, 4, length, generator=torch.Generator().manual_seed(length))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = nn.MaxPool1d(3, stride=2, padding=1)(xa), WindowMax1d(3, stride=2, padding=1)(xb)
    assert a.shape == b.shape and torch.equal(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    assert torch.equal(xa.grad, xb.grad)
