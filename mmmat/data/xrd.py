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
    :data:`CUTOFF_FWHM` FWHMs from its centre.

Measured patterns
    :func:`read_xy` (two-column text), :func:`read_cif_powder` (powder-profile loops in CIF) and
    :func:`read_pattern` (dispatch on suffix) return a :class:`MeasuredPattern` (2θ in degrees, intensity,
    wavelength in Å when known); :func:`resample` puts one on the grid (converted through d-spacing when the
    wavelength differs, background removed, max-normalised).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
    n = grid_t.shape[0]

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
    fw = fw.reshape(batch, 1, 1)
    cut = CUTOFF_FWHM * fw
    width = int(math.floor(2.0 * CUTOFF_FWHM * max_fwhm / min_step)) + 2

    lo = torch.searchsorted(grid_t, (pos - cut[:, :, 0]).contiguous())  # (B, P)
    idx = lo.unsqueeze(-1) + torch.arange(width, device=device)  # (B, P, W)
    idx_c = idx.clamp(max=n - 1)
    x = grid_t[idx_c] - pos.unsqueeze(-1)
    valid = (idx < n) & (x.abs() <= cut) & ok.unsqueeze(-1)
    values = intensity.unsqueeze(-1) * _pseudo_voigt(x, fw, eta)
    values = torch.where(valid, values, torch.zeros((), dtype=dtype, device=device))
    out = torch.zeros(batch, n, dtype=dtype, device=device)
    out = out.scatter_add(1, idx_c.reshape(batch, -1), values.reshape(batch, -1))
    top = out.amax(dim=1, keepdim=True)
    return torch.where(top > 0, out / top.clamp_min(torch.finfo(dtype).tiny), out)


# ====================================================================== measured patterns
@dataclass
class MeasuredPattern:
    """A measured powder pattern.

    Attributes:
        two_theta: (N,) ascending 2θ in degrees (at ``wavelength``).
        intensity: (N,) intensities (counts or arbitrary units).
        wavelength: X-ray wavelength in Å, None when the file does not say.
        source: Where it came from (file path, ``"<text>"``, plus the CIF block and item names).

    """

    two_theta: np.ndarray
    intensity: np.ndarray
    wavelength: float | None
    source: str

    def __len__(self) -> int:
        return int(self.two_theta.shape[0])

    def d_spacing(self) -> np.ndarray:
        """d-spacing in Å of every point (needs the wavelength)."""
        if self.wavelength is None:
            raise ValueError(f"{self.source}: wavelength unknown, cannot convert 2θ to d")
        return two_theta_to_d(self.two_theta, self.wavelength)


_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eEdD][+-]?\d+)?")


def _parse_number(token: str) -> float | None:
    """Float from a token such as ``12.5``, ``1234(5)``, ``2.2E+02``; None if it is not a number."""
    token = token.strip()
    if "(" in token:
        head, _, tail = token.partition("(")
        if not tail.rstrip(")").isdigit():
            return None
        token = head
    try:
        return float(token)
    except ValueError:
        if _NUMBER.fullmatch(token):  # Fortran exponent 1.0D+03
            return float(token.replace("d", "e").replace("D", "E"))
        return None


def _source_text(path_or_text: str | os.PathLike[str]) -> tuple[str, str]:
    """(name, text): a path is read, a string holding a newline is the text itself."""
    if isinstance(path_or_text, str) and ("\n" in path_or_text or "\r" in path_or_text):
        return "<text>", path_or_text
    path = Path(path_or_text)
    return str(path_or_text), path.read_text(encoding="utf-8", errors="replace")


def _check_two_theta(name: str, tt: np.ndarray, inten: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (2θ, intensity) pair; return them ascending with non-finite intensities dropped."""
    bad = np.flatnonzero(~np.isfinite(tt))
    if bad.size:
        raise ValueError(f"{name}: 2θ is not a finite number at data row {bad[0] + 1}")
    if tt.size < 10:
        raise ValueError(f"{name}: need at least 10 data rows (2θ, intensity), found {tt.size}")
    step = np.diff(tt)
    if not ((step > 0).all() or (step < 0).all()):
        k = int(np.flatnonzero(step <= 0)[0] if (step > 0).sum() >= (step < 0).sum() else
                np.flatnonzero(step >= 0)[0])
        raise ValueError(
            f"{name}: 2θ is not strictly monotonic (data row {k + 2}: {tt[k + 1]:g} after {tt[k]:g})"
        )
    if step[0] < 0:
        tt, inten = tt[::-1], inten[::-1]
    keep = np.isfinite(inten)
    tt, inten = tt[keep], inten[keep]
    if tt.size < 10:
        raise ValueError(f"{name}: need at least 10 rows with a finite intensity, found {tt.size}")
    return np.ascontiguousarray(tt), np.ascontiguousarray(inten)


def read_xy(path_or_text: str | os.PathLike[str], wavelength: float | None = None) -> MeasuredPattern:
    """Read a two-column powder pattern (``.xy``, ``.xye``, ``.csv``, ``.txt``, ``.dat``).

    Columns are separated by whitespace, commas or semicolons (with semicolons, a comma inside a number is
    read as a decimal comma).  Lines starting with ``#``, ``!`` or ``;`` are comments, lines without a
    leading number (headers) are skipped, columns after the second (esd) are ignored, ``1234(5)`` reads as
    1234.  A descending scan is reversed.

    Args:
        path_or_text: A file path, or the file's text itself (any string holding a newline).
        wavelength: Wavelength in Å to attach (the format does not carry one).

    Returns:
        The pattern, 2θ ascending.

    Raises:
        ValueError: (message names the file) fewer than two numeric columns, fewer than 10 rows, or a
            2θ column that is not finite and strictly monotonic.

    """
    name, text = _source_text(path_or_text)
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and ln[0] not in "#!;"]
    semicolon = any(";" in ln for ln in lines)
    splitter = re.compile(r"[;\s]+") if semicolon else re.compile(r"[,;\s]+")
    rows: list[list[float]] = []
    for ln in lines:
        values: list[float] = []
        for tok in splitter.split(ln):
            if not tok:
                continue
            v = _parse_number(tok.replace(",", ".") if semicolon else tok)
            if v is None:
                break
            values.append(v)
        if values:
            rows.append(values)
    if not rows:
        raise ValueError(f"{name}: no numeric data rows found")
    counts = np.array([len(r) for r in rows])
    ncols = int(np.bincount(counts).argmax())
    if ncols < 2:
        raise ValueError(f"{name}: need two numeric columns (2θ, intensity), found {ncols}")
    data = np.array([r[:2] for r in rows if len(r) >= 2], dtype=np.float64)
    tt, inten = _check_two_theta(name, data[:, 0], data[:, 1])
    return MeasuredPattern(tt, inten, None if wavelength is None else float(wavelength), name)


#: CIF items holding the profile's 2θ (degrees), most preferred first.
CIF_TWO_THETA_ITEMS = ("_pd_proc_2theta_corrected", "_pd_meas_2theta_scan", "_pd_meas_angle_2theta")
#: CIF items holding the profile's intensity, measured before processed before calculated.
CIF_INTENSITY_ITEMS = (
    "_pd_meas_counts_total",
    "_pd_meas_intensity_total",
    "_pd_proc_intensity_total",
    "_pd_proc_intensity_net",
    "_pd_calc_intensity_total",
    "_pd_calc_intensity_net",
)
#: CIF items holding the wavelength (Å).
CIF_WAVELENGTH_ITEMS = ("_diffrn_radiation_wavelength", "_pd_proc_wavelength")


def _cif_numbers(values: Any) -> np.ndarray:
    """Floats from CIF values (``1234(5)`` → 1234; ``.``/``?``/junk → NaN)."""
    if isinstance(values, str):
        values = [values]
    cleaned = [v.split("(", 1)[0] for v in values]
    try:
        return np.array([float(v) if v not in (".", "?", "") else math.nan for v in cleaned])
    except ValueError:
        return np.array([math.nan if (x := _parse_number(v)) is None else x for v in values], dtype=float)


def _cif_first_number(value: Any) -> float | None:
    arr = _cif_numbers(value)
    arr = arr[np.isfinite(arr)]
    return float(arr[0]) if arr.size else None


def _cif_range_two_theta(items: dict[str, Any], n: int) -> np.ndarray | None:
    """2θ of n points from ``_pd_proc_2theta_range_*`` or ``_pd_meas_2theta_range_*`` (min, max, inc)."""
    best: tuple[int, np.ndarray] | None = None
    for kind in ("proc", "meas"):
        lo = _cif_first_number(items.get(f"_pd_{kind}_2theta_range_min", "?"))
        hi = _cif_first_number(items.get(f"_pd_{kind}_2theta_range_max", "?"))
        inc = _cif_first_number(items.get(f"_pd_{kind}_2theta_range_inc", "?"))
        if lo is None or (hi is None and (inc is None or inc <= 0)):
            continue
        if hi is not None and hi > lo:
            implied = round((hi - lo) / inc) + 1 if inc and inc > 0 else n
            tt = np.linspace(lo, hi, n)
        elif inc is not None and inc > 0:
            implied = n
            tt = lo + inc * np.arange(n)
        else:
            continue
        mismatch = abs(implied - n)
        if best is None or mismatch < best[0]:
            best = (mismatch, tt)
    return None if best is None else best[1]


def read_cif_powder(path_or_text: str | os.PathLike[str]) -> MeasuredPattern:
    """Read the powder profile (2θ, intensity) from a CIF, e.g. an IUCr Rietveld CIF.

    Every data block is searched for a loop with an intensity item (:data:`CIF_INTENSITY_ITEMS`, measured
    preferred over calculated); among blocks, one with measured intensities and then the most points wins
    (so a structure-only block or a calculated pattern is passed over).  2θ comes from a loop item in the
    same loop (:data:`CIF_TWO_THETA_ITEMS`) or, when the loop carries only intensities, from
    ``_pd_proc_2theta_range_{min,max,inc}`` / ``_pd_meas_2theta_range_*``.  Values such as ``1234(5)`` are
    read without their esd.  The wavelength is the first value of ``_diffrn_radiation_wavelength`` or
    ``_pd_proc_wavelength`` in the profile block, else in the other blocks (blocks whose name contains
    ``simulated`` skipped), else None.

    Args:
        path_or_text: A file path, or the CIF text itself (any string holding a newline).

    Returns:
        The pattern, 2θ ascending; ``source`` names the file, block and intensity item.

    Raises:
        ValueError: (message names the file) unparseable CIF or no profile in it.

    """
    import warnings

    from pymatgen.io.cif import CifFile

    name, text = _source_text(path_or_text)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cif = CifFile.from_str(text)
    except Exception as exc:  # pymatgen raises many types on bad CIFs
        raise ValueError(f"{name}: unparseable CIF ({type(exc).__name__}: {str(exc)[:200]})") from None
    blocks = [
        (
            block_name,
            {k.lower(): v for k, v in block.data.items()},
            [[k.lower() for k in lp] for lp in block.loops],
        )
        for block_name, block in cif.data.items()
    ]

    candidates = []
    for order, (block_name, items, _) in enumerate(blocks):
        for rank, key in enumerate(CIF_INTENSITY_ITEMS):
            values = items.get(key)
            if not isinstance(values, list) or len(values) < 10:
                continue
            inten = _cif_numbers(values)
            if np.isfinite(inten).sum() < 10:
                continue
            measured = not key.startswith("_pd_calc")
            candidates.append((not measured, -inten.size, order, rank, block_name, key, inten))
            break
    if not candidates:
        raise ValueError(f"{name}: no powder profile (no loop with {', '.join(CIF_INTENSITY_ITEMS)})")
    candidates.sort(key=lambda c: c[:4])

    problems = []
    for _, _, order, _, block_name, key, inten in candidates:
        items, loops = blocks[order][1], blocks[order][2]
        loop = next((lp for lp in loops if key in lp), [key])
        tt = None
        for tt_key in CIF_TWO_THETA_ITEMS:
            if tt_key in loop and isinstance(items.get(tt_key), list):
                tt = _cif_numbers(items[tt_key])
                break
        if tt is None:
            tt = _cif_range_two_theta(items, inten.size)
        if tt is None:  # range given in another block (e.g. a separate instrument block)
            for other_name, other_items, _ in blocks:
                if other_name != block_name and "simulated" not in other_name.lower():
                    tt = _cif_range_two_theta(other_items, inten.size)
                    if tt is not None:
                        break
        if tt is None:
            problems.append(f"block {block_name!r} has {key} but no 2θ (loop item or *_2theta_range_*)")
            continue
        source = f"{name} [data_{block_name}: {key}]"
        try:
            tt, inten = _check_two_theta(source, tt, inten)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        return MeasuredPattern(tt, inten, _cif_wavelength(blocks, order), source)
    raise ValueError(f"{name}: no usable powder profile ({'; '.join(problems)})")


def _cif_wavelength(blocks: list[tuple[str, dict[str, Any], list[list[str]]]], order: int) -> float | None:
    """Wavelength (Å) from the profile block, else from the other non-simulated blocks."""
    rest = [b for i, b in enumerate(blocks) if i != order and "simulated" not in b[0].lower()]
    for _, items, _ in [blocks[order], *rest]:
        for key in CIF_WAVELENGTH_ITEMS:
            if key in items:
                value = _cif_first_number(items[key])
                if value is not None and 0.01 < value < 10.0:
                    return value
    return None


def read_pattern(path: str | os.PathLike[str], wavelength: float | None = None) -> MeasuredPattern:
    """Read a measured pattern, dispatching on the suffix (``.cif`` → :func:`read_cif_powder`, else xy).

    Args:
        path: File path.
        wavelength: Wavelength in Å; overrides the one found in the file.

    """
    if Path(path).suffix.lower() == ".cif":
        pattern = read_cif_powder(path)
        if wavelength is not None:
            pattern.wavelength = float(wavelength)
        return pattern
    return read_xy(path, wavelength=wavelength)


# ====================================================================== resampling
def _rolling(values: np.ndarray, window: int, reducer: Any) -> np.ndarray:
    """Centred rolling min/max/mean over ``window`` points (edges padded with the edge value)."""
    half = window // 2
    padded = np.pad(values, (half, half), mode="edge")
    return reducer(np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1), axis=1)


def estimate_background(two_theta: np.ndarray, intensity: np.ndarray, window: float = 4.0) -> np.ndarray:
    """Slowly varying background under a pattern.

    A morphological opening (rolling minimum, then rolling maximum) over ``window`` degrees 2θ, which
    removes every feature narrower than the window (the Bragg peaks) and never exceeds the data, then a
    rolling mean over half the window to smooth its corners.  The window is turned into a number of points
    through the median 2θ step.
    """
    if window <= 0 or intensity.size < 3:
        return np.zeros_like(intensity)
    step = float(np.median(np.diff(two_theta)))
    points = int(min(max(3, round(window / step)), 2 * (intensity.size // 2) - 1))
    opened = _rolling(_rolling(intensity, points, np.min), points, np.max)
    return _rolling(opened, max(3, points // 2), np.mean)


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
