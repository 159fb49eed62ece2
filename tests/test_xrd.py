import math
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.analysis.diffraction.xrd import XRDCalculator
from pymatgen.core import Lattice, Structure

from mmmat.data.xrd import (
    CU_KA,
    DEFAULT_FWHM,
    MO_KA,
    NUM_POINTS,
    TWO_THETA,
    TWO_THETA_STEP,
    MeasuredPattern,
    compute_peaks,
    d_to_two_theta,
    read_cif_powder,
    read_pattern,
    read_xy,
    render_profile,
    render_profile_torch,
    resample,
    two_theta_to_d,
    xrd_profile,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MEASURED_TAR = SHARED_DATA / "xrd_measured" / "iucr_rietveld_cifs_cdvae_xrd" / "cif_files.tar.xz"

FINE_GRID = np.arange(5.0, 90.0 + 1e-9, 0.002)


# ---------------------------------------------------------------------------------------------- fixtures
def nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def zno() -> Structure:
    return Structure.from_spacegroup(
        "P6_3mc", Lattice.hexagonal(3.25, 5.21), ["Zn", "O"], [[1 / 3, 2 / 3, 0.0], [1 / 3, 2 / 3, 0.382]]
    )


def triclinic() -> Structure:
    lattice = Lattice.from_parameters(5.1, 6.3, 7.2, 82.0, 95.0, 103.0)
    return Structure(
        lattice,
        ["Ca", "Ti", "O", "O", "O"],
        [[0.1, 0.2, 0.3], [0.55, 0.45, 0.7], [0.3, 0.8, 0.1], [0.7, 0.1, 0.45], [0.9, 0.6, 0.85]],
    )


CRYSTALS = {"NaCl": nacl, "ZnO": zno, "triclinic": triclinic}


def isolated(two_theta: np.ndarray, gap: float = 1.0) -> np.ndarray:
    """Mask of peaks with no other peak within ``gap`` degrees."""
    diffs = np.abs(two_theta[:, None] - two_theta[None, :])
    np.fill_diagonal(diffs, np.inf)
    return diffs.min(axis=1) > gap


def local_maxima(profile: np.ndarray, threshold: float) -> np.ndarray:
    p = profile
    idx = np.flatnonzero((p[1:-1] > p[:-2]) & (p[1:-1] >= p[2:]) & (p[1:-1] > threshold)) + 1
    return idx


# ---------------------------------------------------------------------------------------------- grid
def test_grid_constants():
    assert TWO_THETA.dtype == np.float32
    assert TWO_THETA.shape == (NUM_POINTS,) == (1701,)
    assert TWO_THETA[0] == 5.0 and TWO_THETA[-1] == 90.0
    assert np.allclose(np.diff(TWO_THETA), TWO_THETA_STEP, atol=1e-5)
    assert CU_KA == 1.54184


def test_bragg_round_trip():
    d = np.array([0.5, 1.0, 2.0, 5.64, 20.0])
    tt = d_to_two_theta(d, CU_KA)
    assert np.isnan(tt[0])  # λ/(2d) > 1: unreachable
    assert np.allclose(two_theta_to_d(tt[1:], CU_KA), d[1:], rtol=1e-12)
    # Bragg's law itself: λ = 2 d sin θ
    assert np.allclose(2 * d[1:] * np.sin(np.radians(tt[1:] / 2)), CU_KA)


# ---------------------------------------------------------------------------------------------- peaks
@pytest.mark.parametrize("name", sorted(CRYSTALS))
def test_peaks_match_pymatgen(name):
    structure = CRYSTALS[name]()
    ref = XRDCalculator(wavelength="CuKa").get_pattern(structure, two_theta_range=(5, 90))
    peaks = compute_peaks(structure)
    assert peaks.dtype == np.float32 and peaks.ndim == 2 and peaks.shape[1] == 2
    assert len(peaks) == len(ref.x)
    assert np.all(np.diff(peaks[:, 0]) < 0)  # decreasing d
    assert peaks[:, 1].max() == pytest.approx(100.0)
    # peaks -> d -> 2θ round trip (d stored as float32)
    # decreasing d is increasing 2θ, the order of pymatgen's pattern
    tt = d_to_two_theta(peaks[:, 0], CU_KA)
    assert np.all(np.diff(ref.x) > 0)
    assert np.allclose(tt, ref.x, atol=2e-4)
    assert np.allclose(peaks[:, 1], ref.y, rtol=1e-5, atol=1e-4)


def test_no_peak_in_range():
    # a 1 Å cube: its largest d (1 Å) needs 2θ > 90° at Cu Kα
    tiny = Structure(Lattice.cubic(1.0), ["H"], [[0, 0, 0]])
    peaks = compute_peaks(tiny)
    assert peaks.shape == (0, 2)
    profile = render_profile(peaks)
    assert profile.shape == (NUM_POINTS,) and not profile.any()


# ---------------------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("name", sorted(CRYSTALS))
def test_profile_maxima_at_pymatgen_peaks(name):
    structure = CRYSTALS[name]()
    ref = XRDCalculator(wavelength="CuKa").get_pattern(structure, two_theta_range=(5, 90))
    ref_tt, ref_i = np.asarray(ref.x), np.asarray(ref.y)
    profile, peaks = xrd_profile(structure)
    assert profile.shape == (NUM_POINTS,) and profile.dtype == np.float32
    assert profile.max() == pytest.approx(1.0)
    iso = isolated(ref_tt) & (ref_i > 1.0)
    assert iso.sum() >= 3
    # every isolated peak: the profile's maximum near it lies within one grid step
    for t in ref_tt[iso]:
        window = np.flatnonzero(np.abs(TWO_THETA - t) < 0.5)
        top = TWO_THETA[window[np.argmax(profile[window])]]
        assert abs(top - t) <= TWO_THETA_STEP + 1e-6
    # every local maximum of the profile above 1 % sits within one grid step of a pymatgen peak
    for j in local_maxima(profile, 0.01):
        assert np.abs(ref_tt - TWO_THETA[j]).min() <= TWO_THETA_STEP + 1e-6


@pytest.mark.parametrize("name", sorted(CRYSTALS))
def test_profile_heights_match_pymatgen(name):
    structure = CRYSTALS[name]()
    ref = XRDCalculator(wavelength="CuKa").get_pattern(structure, two_theta_range=(5, 90))
    ref_tt, ref_i = np.asarray(ref.x), np.asarray(ref.y)
    peaks = compute_peaks(structure)
    iso = isolated(ref_tt) & (ref_i > 2.0)
    # fine grid: the profile's height at each isolated peak is its relative intensity
    fine = render_profile(peaks, grid=FINE_GRID)
    heights = np.array([fine[np.abs(FINE_GRID - t) < 0.3].max() for t in ref_tt[iso]])
    k = np.argmax(ref_i[iso])
    assert np.allclose(heights / heights[k], ref_i[iso] / ref_i[iso][k], rtol=0.02, atol=0.005)
    # default grid: the sample nearest each isolated peak is the Gaussian at that offset (exact rendering)
    coarse = render_profile(peaks)
    scale = None
    for t, i in zip(ref_tt[iso], ref_i[iso]):
        j = int(np.argmin(np.abs(TWO_THETA - t)))
        expected = i * math.exp(-4 * math.log(2) * ((TWO_THETA[j] - t) / DEFAULT_FWHM) ** 2)
        scale = coarse[j] / expected if scale is None else scale
        assert coarse[j] == pytest.approx(scale * expected, rel=1e-3, abs=1e-5)


def test_pseudo_voigt_shape_and_cutoff():
    peaks = np.array([[two_theta_to_d(40.0, CU_KA), 100.0]])
    grid = np.arange(30.0, 50.0, 0.01)
    g = render_profile(peaks, grid=grid, fwhm=0.2, eta=0.0)
    lor = render_profile(peaks, grid=grid, fwhm=0.2, eta=1.0)
    half = np.abs(grid - 40.1) < 1e-6  # half width at half maximum away from the centre
    assert g[half][0] == pytest.approx(0.5, abs=1e-3)
    assert lor[half][0] == pytest.approx(0.5, abs=1e-3)
    far = np.abs(grid - 40.0) > 10 * 0.2 + 1e-6
    assert not g[far].any() and not lor[far].any()  # nothing beyond 10 FWHM
    assert lor[np.abs(grid - 41.0) < 1e-6][0] > g[np.abs(grid - 41.0) < 1e-6][0]  # Lorentzian tails


def _padded(peak_list):
    pmax = max(len(p) for p in peak_list)
    d = torch.zeros(len(peak_list), pmax, dtype=torch.float64)
    inten = torch.zeros_like(d)
    mask = torch.zeros(len(peak_list), pmax, dtype=torch.bool)
    for b, p in enumerate(peak_list):
        d[b, : len(p)] = torch.as_tensor(p[:, 0], dtype=torch.float64)
        inten[b, : len(p)] = torch.as_tensor(p[:, 1], dtype=torch.float64)
        mask[b, : len(p)] = True
    return d, inten, mask


def test_torch_matches_numpy():
    peak_list = [compute_peaks(CRYSTALS[n]()) for n in sorted(CRYSTALS)]
    d, inten, mask = _padded(peak_list)
    # padding slots hold junk that the mask must hide
    inten[~mask] = 50.0
    for eta in (0.0, 0.5):
        fwhm = torch.tensor([0.1, 0.15, 0.08])
        out = render_profile_torch(d.float(), inten.float(), mask, fwhm=fwhm, eta=eta)
        assert out.shape == (3, NUM_POINTS) and out.dtype == torch.float32
        for b, p in enumerate(peak_list):
            ref = render_profile(p, fwhm=float(fwhm[b]), eta=eta)
            assert np.abs(out[b].numpy() - ref).max() < 1e-4
    # zero strain and zero shift change nothing
    zero = torch.zeros(3)
    out0 = render_profile_torch(d, inten, mask, strain=zero, shift=zero)
    for b, p in enumerate(peak_list):
        assert np.abs(out0[b].numpy() - render_profile(p)).max() < 1e-4


def test_torch_strain_moves_peaks():
    structure = nacl()
    peaks = compute_peaks(structure)
    d, inten, mask = _padded([peaks])
    out = render_profile_torch(d, inten, mask, strain=torch.tensor([0.01]))[0].numpy()
    strained = peaks.astype(np.float64).copy()
    strained[:, 0] *= 1.01
    assert np.abs(out - render_profile(strained)).max() < 1e-4
    # every peak moved to the 2θ of d·1.01 (within one grid step), away from the unstrained 2θ
    tt_new = d_to_two_theta(peaks[:, 0] * 1.01, CU_KA)
    tt_old = d_to_two_theta(peaks[:, 0], CU_KA)
    for t_new, t_old in zip(tt_new, tt_old):
        window = np.flatnonzero(np.abs(TWO_THETA - t_new) < 0.3)
        top = TWO_THETA[window[np.argmax(out[window])]]
        assert abs(top - t_new) <= TWO_THETA_STEP + 1e-6
        assert t_old - t_new > 0.1  # expansion lowers 2θ
    maxima = TWO_THETA[local_maxima(out, 0.01)]
    assert all(np.abs(tt_new - m).min() <= TWO_THETA_STEP + 1e-6 for m in maxima)


def test_torch_shift_and_batch_augment():
    peaks = compute_peaks(zno())
    d, inten, mask = _padded([peaks, peaks])
    out = render_profile_torch(d, inten, mask, shift=torch.tensor([0.0, 0.3]), fwhm=0.1).numpy()
    shifted = peaks.astype(np.float64).copy()
    shifted[:, 0] = two_theta_to_d(d_to_two_theta(peaks[:, 0], CU_KA) + 0.3, CU_KA)
    assert np.abs(out[0] - render_profile(peaks)).max() < 1e-4
    assert np.abs(out[1] - render_profile(shifted)).max() < 1e-4
    # an empty row stays zero
    empty = render_profile_torch(d, inten, torch.zeros_like(mask))
    assert not empty.any()


# ---------------------------------------------------------------------------------------------- readers
def _peak_pattern(two_theta: np.ndarray, centres, heights, width=0.1, background=0.0):
    y = np.full_like(two_theta, background, dtype=float)
    for c, h in zip(centres, heights):
        y += h * np.exp(-4 * math.log(2) * ((two_theta - c) / width) ** 2)
    return y


def test_read_xy_header_comments(tmp_path):
    tt = np.arange(10.0, 20.0, 0.02)
    y = _peak_pattern(tt, [15.0], [1000.0], background=50.0)
    lines = ["# measured on a lab diffractometer", "! instrument: test", "2theta intensity esd"]
    lines += [f"{a:.3f} {b:.2f} {math.sqrt(b):.2f}" for a, b in zip(tt, y)]
    path = tmp_path / "pattern.xye"
    path.write_text("\n".join(lines) + "\n")
    pat = read_xy(path, wavelength=CU_KA)
    assert isinstance(pat, MeasuredPattern)
    assert len(pat) == tt.size and pat.wavelength == CU_KA and pat.source == str(path)
    assert np.allclose(pat.two_theta, tt, atol=1e-3) and np.allclose(pat.intensity, y, atol=0.01)
    # the same via read_pattern, and from the text itself
    assert np.allclose(read_pattern(path).intensity, pat.intensity)
    assert read_pattern(path).wavelength is None
    assert np.allclose(read_xy(path.read_text()).two_theta, pat.two_theta)


def test_read_csv_and_semicolons(tmp_path):
    tt = np.arange(20.0, 25.0, 0.05)
    y = _peak_pattern(tt, [22.0], [10.0])
    csv = tmp_path / "scan.csv"
    csv.write_text("two_theta,intensity\n" + "\n".join(f"{a:.2f},{b:.4f}" for a, b in zip(tt, y)))
    pat = read_xy(csv)
    assert len(pat) == tt.size and np.allclose(pat.intensity, y, atol=1e-4)
    # semicolons with decimal commas, descending scan, esd in parentheses
    semi = tmp_path / "scan.txt"
    semi.write_text("\n".join(f"{a:.2f};{b:.4f}(3)".replace(".", ",") for a, b in zip(tt[::-1], y[::-1])))
    pat2 = read_xy(semi)
    assert np.allclose(pat2.two_theta, tt, atol=1e-6) and np.allclose(pat2.intensity, y, atol=1e-4)


def test_read_xy_errors(tmp_path):
    one = tmp_path / "one.xy"
    one.write_text("\n".join(str(v) for v in range(50)))
    with pytest.raises(ValueError, match=r"one\.xy: need two numeric columns .*found 1"):
        read_xy(one)
    short = tmp_path / "short.dat"
    short.write_text("\n".join(f"{10 + i} {i}" for i in range(5)))
    with pytest.raises(ValueError, match=r"short\.dat: need at least 10 data rows"):
        read_xy(short)
    shuffled = tmp_path / "shuffled.xy"
    shuffled.write_text("\n".join(f"{t} 1" for t in [10, 11, 12, 11.5, 13, 14, 15, 16, 17, 18, 19]))
    with pytest.raises(ValueError, match=r"shuffled\.xy: 2θ is not strictly monotonic"):
        read_xy(shuffled)
    nan = tmp_path / "nan.xy"
    nan.write_text("\n".join(f"{t} 1" for t in ["10", "11", "nan"] + [str(12 + i) for i in range(10)]))
    with pytest.raises(ValueError, match=r"nan\.xy: 2θ is not a finite number"):
        read_xy(nan)


TINY_CIF = """\
data_structure
_cell_length_a 5.64
_cell_length_b 5.64
_cell_length_c 5.64
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
Na1 0 0 0
Cl1 0.5 0.5 0.5

data_profile
_pd_block_id test_profile
_diffrn_radiation_wavelength 1.5406(1)
{range}
loop_
{columns}
{rows}
"""


def test_read_cif_powder_meas_loop(tmp_path):
    tt = np.round(np.arange(10.0, 30.0, 0.02), 2)
    counts = np.round(_peak_pattern(tt, [20.0], [5000.0], background=100.0)).astype(int)
    calc = counts * 0.9
    rows = "\n".join(f"{a:.2f} {c}({int(math.sqrt(c))}) {k:.1f}" for a, c, k in zip(tt, counts, calc))
    text = TINY_CIF.format(
        range="", columns="_pd_meas_2theta_scan\n_pd_meas_counts_total\n_pd_calc_intensity_total", rows=rows
    )
    pat = read_cif_powder(text)
    assert pat.wavelength == pytest.approx(1.5406)
    assert np.allclose(pat.two_theta, tt) and np.array_equal(pat.intensity, counts)  # measured, esd stripped
    assert "_pd_meas_counts_total" in pat.source and "data_profile" in pat.source
    path = tmp_path / "tiny.cif"
    path.write_text(text)
    assert np.array_equal(read_pattern(path).intensity, counts)
    assert read_pattern(path, wavelength=0.7).wavelength == 0.7

    # intensities only: 2θ from the range items
    ranged = TINY_CIF.format(
        range="\n".join(
            [
                "_pd_meas_2theta_range_min 10.00",
                "_pd_meas_2theta_range_max 29.98",
                "_pd_meas_2theta_range_inc 0.02",
            ]
        ),
        columns="_pd_meas_intensity_total",
        rows="\n".join(str(c) for c in counts),
    )
    pat2 = read_cif_powder(ranged)
    assert np.allclose(pat2.two_theta, tt, atol=1e-9) and np.array_equal(pat2.intensity, counts)

    # processed 2θ and net intensity
    proc = TINY_CIF.format(
        range="",
        columns="_pd_proc_point_id\n_pd_proc_2theta_corrected\n_pd_proc_intensity_net",
        rows="\n".join(f"{i + 1} {a:.2f} {c}" for i, (a, c) in enumerate(zip(tt, counts))),
    )
    assert np.array_equal(read_cif_powder(proc).intensity, counts)


def test_read_cif_without_profile(tmp_path):
    path = tmp_path / "structure_only.cif"
    path.write_text(nacl().to(fmt="cif"))
    with pytest.raises(ValueError, match=r"structure_only\.cif: no powder profile"):
        read_cif_powder(path)
    with pytest.raises(ValueError, match=r"structure_only\.cif"):
        read_pattern(path)


# ---------------------------------------------------------------------------------------------- resampling
def test_resample_across_wavelengths():
    d = 2.5
    tt_mo = float(d_to_two_theta(d, MO_KA))
    tt_cu = float(d_to_two_theta(d, CU_KA))
    grid_mo = np.arange(3.0, 45.0, 0.01)
    y = _peak_pattern(grid_mo, [tt_mo], [1000.0], width=0.05, background=200.0) + 0.5 * grid_mo
    pat = MeasuredPattern(grid_mo, y, MO_KA, source="synthetic Mo")
    prof = resample(pat)
    assert prof.shape == (NUM_POINTS,) and prof.dtype == np.float32 and prof.max() == pytest.approx(1.0)
    assert abs(TWO_THETA[np.argmax(prof)] - tt_cu) <= TWO_THETA_STEP
    assert abs(tt_cu - tt_mo) > 10  # it really moved
    # background removed: far from the peak the profile is ~0
    far = np.abs(TWO_THETA - tt_cu) > 2
    assert prof[far].max() < 0.02
    # Mo 2θ up to 45° reaches d = 0.93 Å, beyond Cu's 90° limit: the whole top of the grid is covered;
    # 3° Mo is d = 13.6 Å, 6.5° at Cu: below it the profile is 0
    assert not prof[TWO_THETA < 6.4].any()
    # same wavelength: no conversion
    same = resample(MeasuredPattern(grid_mo, _peak_pattern(grid_mo, [30.0], [1.0]), CU_KA, source="cu"))
    assert abs(TWO_THETA[np.argmax(same)] - 30.0) <= TWO_THETA_STEP


def test_resample_outside_range_is_zero():
    tt = np.arange(40.0, 50.0, 0.01)
    pat = MeasuredPattern(tt, _peak_pattern(tt, [45.0], [100.0], background=10.0), None, source="no wavelength")
    prof = resample(pat)
    assert not prof[(TWO_THETA < 40.0) | (TWO_THETA > 50.0)].any()
    assert abs(TWO_THETA[np.argmax(prof)] - 45.0) <= TWO_THETA_STEP


# ---------------------------------------------------------------------------------------------- measured data
def test_measured_iucr_cifs(tmp_path):
    if not MEASURED_TAR.exists():
        pytest.skip(f"../shared/data not present: {MEASURED_TAR} missing")
    with tarfile.open(MEASURED_TAR) as tar:
        tar.extractall(tmp_path, filter="data")
    files = sorted(tmp_path.rglob("*.cif"))
    assert len(files) == 15
    from pymatgen.io.cif import CifParser

    structures = 0
    for path in files:
        pat = read_pattern(path)
        assert pat.wavelength is not None and 0.4 < pat.wavelength < 1.6, path.name
        prof = resample(pat)
        # the measured range seen at Cu Kα through d-spacing (d below Cu's reach: up to 180°)
        d = pat.d_spacing()
        lo, hi = d_to_two_theta(d.max(), CU_KA), np.nan_to_num(d_to_two_theta(d.min(), CU_KA), nan=180.0)
        covered = (TWO_THETA >= lo) & (TWO_THETA <= hi)
        assert covered.sum() > 100, path.name
        assert (prof > 0).sum() > 100, path.name
        assert np.isfinite(prof.max()) and prof.max() == pytest.approx(1.0), path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structures += len(CifParser(path).parse_structures(primitive=False)) > 0
    assert structures == 15
