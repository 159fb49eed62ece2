"""Powder X-ray diffraction: peaks from a crystal, rendered profiles, and readers for measured patterns.

The fixed grid
    Every profile in the project lives on one grid: 2θ from :data:`TWO_THETA_MIN` = 5° to
    :data:`TWO_THETA_MAX` = 90° in steps of :data:`TWO_THETA_STEP` = 0.05°, both ends included
    (:data:`NUM_POINTS` = 1701 points, :data:`TWO_THETA`, float32), for Cu Kα radiation
    (:data:`CU_KA` = 1.54184 Å, pymatgen's ``"CuKa"``, the Kα1/Kα2 weighted mean).  A profile is a (1701,)
    float32 array, max-normalised to 1.

Peaks
    :func:`compute_peaks` stores a crystal's reflections as (d-spacing in Å, relative intensity 0..100),
    computed by pymatgen's ``XRDCalculator`` (the reference).  Peak positions stored as d are independent
    of the wavelength, so a pattern can be re-rendered later under isotropic lattice strain
    (d → d·(1+ε)), a zero shift, or another wavelength.  The relative intensities keep the
    Lorentz-polarisation factor of the wavelength they were computed at (Cu Kα by default): re-rendering at
    another wavelength puts the peaks at the right 2θ, with intensities only approximately right.

Rendering
    :func:`render_profile` (numpy) and :func:`render_profile_torch` (batched, CPU or GPU, for on-the-fly
    augmentation) convert d to 2θ by Bragg's law (λ = 2 d sin θ) and broaden each peak by a pseudo-Voigt of
    a given full width at half maximum (degrees 2θ); a peak contributes nothing further than
    :data:`CUTOFF_FWHM` FWHMs from its centre.  The torch one draws through the project's one renderer,
    :func:`mmmat.data.profile.render_lines`; the numpy one is kept for shard building and plots (no torch),
    and a test checks that the two agree.

Measured patterns
    The readers are in :mod:`mmmat.io` (:func:`mmmat.io.read_pattern` reads every supported format into a
    :class:`mmmat.io.Pattern`; ``MeasuredPattern``, ``read_xy``, ``read_cif_powder`` and ``read_pattern``
    stay importable from here); :func:`resample` puts one on the grid (converted through d-spacing when the
    wavelength differs, background removed, max-normalised).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# The readers live in mmmat.io; these names stay importable from here.
from mmmat.io import (  # noqa: F401
    CIF_INTENSITY_ITEMS,
    CIF_TWO_THETA_ITEMS,
    CIF_WAVELENGTH_ITEMS,
    InputError,
    Pattern,
    read_cif_powder,
    read_pattern,
    read_xy,
)

#: The measured-pattern type (an alias of :class:`mmmat.io.Pattern`).
MeasuredPattern = Pattern

#: Cu Kα wavelength in Å (pymatgen's ``"CuKa"``: weighted mean of Kα1 and Kα2).
CU_KA = 1.54184
#: Mo Kα wavelength in Å (pymatgen's ``"MoKa"``).
MO_KA = 0.71073

#: First point of the grid, degrees 2θ (Cu Kα).
TWO_THETA_MIN = 5.0
#: Last point of the grid, degrees 2θ (Cu Kα).
TWO_THETA_MAX = 90.0
#: Grid step, degrees 2θ.
TWO_THETA_STEP = 0.05
#: Number of grid points: (90 - 5) / 0.05 + 1.
NUM_POINTS = 1701
#: The grid: 2θ in degrees (Cu Kα), float32, shape (1701,).
TWO_THETA = np.linspace(TWO_THETA_MIN, TWO_THETA_MAX, NUM_POINTS).astype(np.float32)

#: Default peak full width at half maximum, degrees 2θ.
DEFAULT_FWHM = 0.1
#: A peak contributes nothing further than this many FWHMs from its centre.
CUTOFF_FWHM = 10.0

_FOUR_LN2 = 4.0 * math.log(2.0)


# ====================================================================== Bragg's law
def d_to_two_theta(d: Any, wavelength: float = CU_KA) -> np.ndarray:
    """2θ in degrees of d-spacings ``d`` (Å) at ``wavelength`` (Å); NaN where λ/(2d) > 1 (unreachable)."""
    d = np.asarray(d, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = wavelength / (2.0 * d)
        ok = (d > 0) & (s <= 1.0)
        return np.where(ok, np.degrees(2.0 * np.arcsin(np.where(ok, s, 0.0))), np.nan)


def two_theta_to_d(two_theta: Any, wavelength: float = CU_KA) -> np.ndarray:
    """d-spacing in Å of 2θ values (degrees) at ``wavelength`` (Å); NaN (or inf at 2θ = 0) where undefined."""
    tt = np.asarray(two_theta, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return wavelength / (2.0 * np.sin(np.radians(tt) / 2.0))


def _wavelength_value(wavelength: float | str) -> float:
    if isinstance(wavelength, str):
        from pymatgen.analysis.diffraction.xrd import WAVELENGTHS

        if wavelength not in WAVELENGTHS:
            raise ValueError(f"unknown wavelength {wavelength!r}; known: {sorted(WAVELENGTHS)}")
        return float(WAVELENGTHS[wavelength])
    value = float(wavelength)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"wavelength must be a positive number of Å, got {wavelength!r}")
    return value


# ====================================================================== peaks from a crystal
def compute_peaks(
    structure: Any,
    wavelength: float | str = CU_KA,
    two_theta_range: tuple[float, float] = (TWO_THETA_MIN, TWO_THETA_MAX),
) -> np.ndarray:
    """Powder peaks of a crystal, from pymatgen's ``XRDCalculator``.

    Args:
        structure: A pymatgen ``Structure``.
        wavelength: X-ray wavelength in Å, or a pymatgen name such as ``"CuKa"``.
        two_theta_range: Range of 2θ (degrees, at ``wavelength``) whose peaks are kept.

    Returns:
        (P, 2) float32 array of (d-spacing in Å, relative intensity 0..100, the strongest peak in the range
        being 100), sorted by decreasing d; shape (0, 2) when no peak falls in the range.

    """
    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    lam = _wavelength_value(wavelength)
    calc = XRDCalculator(wavelength=lam)
    try:
        pattern = calc.get_pattern(structure, scaled=False, two_theta_range=tuple(two_theta_range))
    except ValueError:
        if not _has_reflection(structure, lam, two_theta_range):
            return np.zeros((0, 2), dtype=np.float32)
        raise
    d = np.asarray(pattern.d_hkls, dtype=np.float64)
    intensity = np.asarray(pattern.y, dtype=np.float64)
    if d.size == 0 or not np.isfinite(intensity).any() or intensity.max() <= 0:
        return np.zeros((0, 2), dtype=np.float32)
    intensity = 100.0 * intensity / intensity.max()
    order = np.argsort(-d, kind="stable")
    return np.stack([d[order], intensity[order]], axis=1).astype(np.float32)


def _has_reflection(structure: Any, wavelength: float, two_theta_range: tuple[float, float]) -> bool:
    """Whether any reciprocal-lattice point other than the origin lies in the 2θ range."""
    lo, hi = (2.0 * math.sin(math.radians(t / 2.0)) / wavelength for t in two_theta_range)
    recip = structure.lattice.reciprocal_lattice_crystallographic
    points = recip.get_points_in_sphere([[0, 0, 0]], [0, 0, 0], hi)
    return any(lo <= pt[1] and pt[1] > 1e-12 for pt in points)


# ====================================================================== rendering (numpy)
def _pseudo_voigt(x: Any, fwhm: Any, eta: float) -> Any:
    """Pseudo-Voigt of unit height at x = 0 (works on numpy arrays and torch tensors)."""
    u = (x / fwhm) ** 2
    gauss = (-_FOUR_LN2 * u).exp() if hasattr(u, "exp") else np.exp(-_FOUR_LN2 * u)
    if eta == 0.0:
        return gauss
    return eta / (1.0 + 4.0 * u) + (1.0 - eta) * gauss


def render_profile(
    peaks: np.ndarray,
    wavelength: float = CU_KA,
    fwhm: float = DEFAULT_FWHM,
    grid: np.ndarray = TWO_THETA,
    eta: float = 0.0,
) -> np.ndarray:
    """Render peaks as a powder profile on a 2θ grid.

    Each peak (d in Å, relative intensity) is placed at its Bragg angle for ``wavelength`` and broadened by
    a pseudo-Voigt of unit height scaled by its intensity: ``eta·L + (1 - eta)·G`` with Lorentzian ``L``
    and Gaussian ``G`` of the same FWHM.  Peaks contribute nothing beyond :data:`CUTOFF_FWHM`·FWHM.

    Args:
        peaks: (P, 2) array of (d-spacing Å, relative intensity), e.g. from :func:`compute_peaks`.
        wavelength: X-ray wavelength in Å.
        fwhm: Full width at half maximum, degrees 2θ.
        grid: Ascending 2θ grid in degrees.
        eta: Lorentzian fraction of the pseudo-Voigt, 0 (Gaussian) to 1 (Lorentzian).

    Returns:
        (L,) float32 profile, max-normalised to 1; all zeros when no peak reaches the grid.

    """
    grid = np.asarray(grid, dtype=np.float64)
    peaks = np.asarray(peaks, dtype=np.float64).reshape(-1, 2)
    if fwhm <= 0:
        raise ValueError(f"fwhm must be positive (degrees 2θ), got {fwhm}")
    n = grid.shape[0]
    pos = d_to_two_theta(peaks[:, 0], wavelength)
    inten = peaks[:, 1]
    cut = CUTOFF_FWHM * fwhm
    keep = np.isfinite(pos) & np.isfinite(inten) & (inten > 0)
    keep &= (pos + cut >= grid[0]) & (pos - cut <= grid[-1])
    pos, inten = pos[keep], inten[keep]
    if pos.size == 0:
        return np.zeros(n, dtype=np.float32)
    # each peak touches the grid points in [pos - cut, pos + cut]: a (P, W) window of indices
    lo = np.searchsorted(grid, pos - cut, side="left")
    hi = np.searchsorted(grid, pos + cut, side="right")
    width = int((hi - lo).max())
    idx = lo[:, None] + np.arange(max(width, 1))[None, :]
    valid = idx < hi[:, None]
    idx = np.minimum(idx, n - 1)
    values = inten[:, None] * _pseudo_voigt(grid[idx] - pos[:, None], fwhm, eta) * valid
    profile = np.bincount(idx.ravel(), weights=values.ravel(), minlength=n)
    top = profile.max()
    if top > 0:
        profile = profile / top
    return profile.astype(np.float32)


def xrd_profile(structure: Any, fwhm: float = DEFAULT_FWHM) -> tuple[np.ndarray, np.ndarray]:
    """Cu Kα profile on :data:`TWO_THETA` and the peaks it was rendered from: ``(profile, peaks)``."""
    peaks = compute_peaks(structure)
    return render_profile(peaks, fwhm=fwhm), peaks


# ====================================================================== rendering (torch)
def render_profile_torch(
    d: Any,
    intensity: Any,
    mask: Any,
    wavelength: float = CU_KA,
    fwhm: float | Any = DEFAULT_FWHM,
    strain: Any = None,
    shift: Any = None,
    grid: Any = None,
    eta: float = 0.0,
    max_fwhm: float | None = None,
    min_step: float | None = None,
) -> Any:
    """Batched, differentiable-in-intensity profile rendering in torch (CPU or GPU), for augmentation.

    Padded peak tables through the one renderer, :func:`mmmat.data.profile.render_lines`.

    Args:
        d: (B, P) d-spacings in Å, padded.
        intensity: (B, P) relative intensities, padded.
        mask: (B, P) bool, True for real peaks.
        wavelength: X-ray wavelength in Å.
        fwhm: Full width at half maximum in degrees 2θ: a float or a (B,) tensor.
        strain: (B,) isotropic lattice strain ε (d → d·(1+ε)), or None.
        shift: (B,) zero shift in degrees 2θ added to every peak position, or None.
        grid: Ascending 2θ grid in degrees (numpy array or tensor); None means :data:`TWO_THETA`.
        eta: Lorentzian fraction of the pseudo-Voigt (0 = Gaussian).
        max_fwhm: An upper bound of ``fwhm`` (degrees 2θ) when it is a tensor; sizes the peak window without
            reading the tensor back from the device (a larger bound only widens the window: same result).
        min_step: The smallest step of ``grid`` (degrees) when it is a tensor, for the same reason.

    Returns:
        (B, L) tensor on ``d``'s device, each row max-normalised to 1 (zeros where no peak reaches the grid).

    """
    import torch

    from mmmat.data.profile import render_lines

    dtype = d.dtype if d.is_floating_point() else torch.float32
    device = d.device
    if grid is None:
        grid = TWO_THETA
    if isinstance(grid, torch.Tensor):
        grid_t = grid.to(device=device, dtype=dtype)
        if min_step is None:
            min_step = float((grid_t[1:] - grid_t[:-1]).min()) if grid_t.numel() > 1 else 1.0
    else:
        grid_np = np.asarray(grid, dtype=np.float64)
        grid_t = torch.as_tensor(grid_np, dtype=dtype, device=device)
        min_step = float(np.diff(grid_np).min()) if grid_np.size > 1 else 1.0

    d = d.to(dtype)
    batch = d.shape[0]
    intensity = intensity.to(device=device, dtype=dtype)
    mask = mask.to(device=device, dtype=torch.bool)
    if strain is not None:
        d = d * (1.0 + torch.as_tensor(strain, dtype=dtype, device=device).reshape(-1, 1))
    s = wavelength / (2.0 * d)
    ok = mask & (d > 0) & (s <= 1.0) & (intensity > 0)
    pos = torch.rad2deg(2.0 * torch.asin(torch.where(ok, s, torch.full_like(s, 0.5))))
    if shift is not None:
        pos = pos + torch.as_tensor(shift, dtype=dtype, device=device).reshape(-1, 1)

    if isinstance(fwhm, torch.Tensor):
        fw = fwhm.to(device=device, dtype=dtype).reshape(-1)
        fw = fw.expand(batch) if fw.numel() == 1 else fw
        if max_fwhm is None:
            max_fwhm = float(fw.max())
    else:
        fw = torch.full((batch,), float(fwhm), dtype=dtype, device=device)
        max_fwhm = float(fwhm)
    width = int(math.floor(2.0 * CUTOFF_FWHM * max_fwhm / min_step)) + 2
    owner = torch.arange(batch, device=device).reshape(-1, 1).expand_as(pos)
    out = render_lines(pos, intensity, fw.reshape(batch, 1).expand_as(pos), owner, batch, grid_t, eta=eta,
                       valid=ok, max_width=width)
    top = out.amax(dim=1, keepdim=True)
    return torch.where(top > 0, out / top.clamp_min(torch.finfo(dtype).tiny), out)


# ====================================================================== resampling
def estimate_background(two_theta: np.ndarray, intensity: np.ndarray, window: float = 4.0) -> np.ndarray:
    """Slowly varying background under a pattern.

    A morphological opening (rolling minimum, then rolling maximum) over ``window`` degrees 2θ, which
    removes every feature narrower than the window (the Bragg peaks) and never exceeds the data, then a
    rolling mean over half the window to smooth its corners.  The window is turned into a number of points
    through the median 2θ step.  Computed by :func:`mmmat.data.profile.background` (the one estimator; the
    model's :func:`mmmat.encoders.spectrum.remove_background_torch` uses it too).
    """
    import torch

    from mmmat.data.profile import background

    if window <= 0 or intensity.size < 3:
        return np.zeros_like(intensity)
    step = float(np.median(np.diff(two_theta)))
    points = int(min(max(3, round(window / step)), 2 * (intensity.size // 2) - 1))
    y = torch.from_numpy(np.ascontiguousarray(intensity, dtype=np.float64))[None]
    return background(y, points)[0].numpy().astype(np.result_type(intensity.dtype, np.float32), copy=False)


def resample(
    pattern: MeasuredPattern,
    grid: np.ndarray = TWO_THETA,
    wavelength: float = CU_KA,
    background_window: float = 4.0,
) -> np.ndarray:
    """Put a measured pattern on a 2θ grid at ``wavelength``, background removed, max-normalised.

    When the pattern's wavelength differs from ``wavelength`` (by more than 1e-4 Å), each 2θ is converted
    to d (Bragg) and back to 2θ at ``wavelength``; points whose d is out of reach at ``wavelength``
    (λ/(2d) > 1) are dropped.  A pattern without a wavelength is taken to be at ``wavelength``.  The
    background (:func:`estimate_background`, window ``background_window`` degrees 2θ at the target
    wavelength; 0 turns it off) is subtracted and negative values clipped to 0; the result is linearly
    interpolated onto ``grid``, 0 outside the measured range, and divided by its maximum.

    Returns:
        (L,) float32 profile; all zeros when nothing of the pattern lands on the grid.

    """
    grid = np.asarray(grid, dtype=np.float64)
    tt = np.asarray(pattern.two_theta, dtype=np.float64)
    y = np.asarray(pattern.intensity, dtype=np.float64)
    keep = np.isfinite(tt) & np.isfinite(y)
    tt, y = tt[keep], y[keep]
    if pattern.wavelength is not None and abs(pattern.wavelength - wavelength) > 1e-4:
        tt = d_to_two_theta(two_theta_to_d(tt, pattern.wavelength), wavelength)
        keep = np.isfinite(tt)
        tt, y = tt[keep], y[keep]
    out = np.zeros(grid.shape[0], dtype=np.float32)
    if tt.size < 2:
        return out
    order = np.argsort(tt, kind="stable")
    tt, y = tt[order], y[order]
    y = np.clip(y - estimate_background(tt, y, background_window), 0.0, None)
    inside = (grid >= tt[0]) & (grid <= tt[-1])
    out[inside] = np.interp(grid[inside], tt, y)
    top = out.max()
    return out / top if top > 0 else out
