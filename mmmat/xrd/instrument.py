"""A laboratory powder diffractometer in torch, batched: peaks (d, I) in, measured-like patterns out.

Every effect is a parameter of :class:`InstrumentParams` (one value per pattern, (B,) tensors) with a
range in :class:`InstrumentRanges` that :func:`sample_params` draws from; :func:`render` turns padded peak
tables into patterns on a 2θ grid on any device.  Angles are degrees 2θ, lengths Å unless named otherwise.

Effects, in the order they are applied to each reflection (d, I)
    * **Kα1/Kα2**: every reflection appears at 2θ₁ = 2 asin(λ₁/2d) with intensity I and, when
      ``ka2_ratio`` > 0, at 2θ₂ = 2 asin(λ₂/2d) with intensity ``ka2_ratio``·I.
    * **Lorentz-polarisation** (``lp=True``, for intensities stored without it):
      I·(1 + cos² 2θ)/(sin² θ cos θ).
    * **March–Dollase preferred orientation**: I·(r² cos² α + sin² α / r)^(-3/2), α the angle between the
      reflection's scattering vector and the orientation axis (``cos_alpha``), r = ``march_r`` (1: random).
    * **Sample displacement** s (mm) on a goniometer of radius R (mm): Δ2θ = -2 s cos θ / R (radians);
      **zero shift** z: Δ2θ = z (degrees).
    * **Peak shape**: a pseudo-Voigt of unit area whose Gaussian width follows Caglioti,
      H_G² = U tan² θ + V tan θ + W (degrees²), and whose Lorentzian width is Scherrer's size broadening,
      H_L = K λ / (L cos θ) (radians; K = 0.9, L the crystallite size); the two combine into one FWHM H and
      Lorentzian fraction η by Thompson, Cox & Hastings (J. Appl. Cryst. 20, 79, 1987).
    * **Axial-divergence asymmetry**: the low- and high-angle halves of each peak get widths H(1 + a) and
      H(1 - a) with a = ``asymmetry``/tan 2θ (clipped to ±0.5): a tail towards low angles below 90° 2θ
      and towards high angles above, the sign of the axial-divergence shift.
    * **Background**: after the Bragg signal is scaled to a maximum of 1, a Chebyshev polynomial in 2θ
      (coefficients ``background``, T_k of 2θ mapped onto [-1, 1] over the grid) plus an amorphous hump
      ``hump_height``·exp(-4 ln 2 ((2θ - ``hump_center``)/``hump_fwhm``)²).
    * **Counting noise**: Poisson with ``counts`` counts at the strongest Bragg peak, divided back.
    * **2θ range**: points outside [``two_theta_min``, ``two_theta_max``] are 0; the step is the grid's
      (:func:`uniform_grid`, :func:`interp_grid` to move a pattern between grids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from mmmat.data.profile import render_lines

#: Scherrer constant for spherical crystallites.
SCHERRER_K = 0.9
#: A peak contributes nothing further than this many FWHMs (of its wider half) from its centre.
CUTOFF_FWHM = 12.0
#: A peak contributes nothing further than this many degrees from its centre, whatever its width.
MAX_CUTOFF = 5.0
#: Default bound on (peak, grid point) pairs held at once.
MAX_PAIRS = 1 << 22
_FOUR_LN2 = 4.0 * math.log(2.0)


@dataclass
class InstrumentRanges:
    """The range each instrument parameter is drawn from, ``(low, high)``; equal ends fix a value.

    Units: wavelengths Å, U/V/W degrees², size nm (drawn log-uniform), displacement and radius mm, shifts
    and 2θ limits degrees, counts at the strongest peak (drawn log-uniform); ``background`` is the range of
    every Chebyshev coefficient (relative to the strongest Bragg peak), ``background_degree`` their number
    minus one.
    """

    wavelength: tuple[float, float] = (1.5406, 1.5406)
    wavelength2: tuple[float, float] = (1.5444, 1.5444)
    ka2_ratio: tuple[float, float] = (0.0, 0.5)
    U: tuple[float, float] = (0.0, 0.01)
    V: tuple[float, float] = (-0.005, 0.0)
    W: tuple[float, float] = (0.001, 0.008)
    size_nm: tuple[float, float] = (30.0, 300.0)
    asymmetry: tuple[float, float] = (0.0, 0.15)
    displacement_mm: tuple[float, float] = (-0.1, 0.1)
    radius_mm: tuple[float, float] = (240.0, 240.0)
    zero_shift: tuple[float, float] = (-0.05, 0.05)
    march_r: tuple[float, float] = (0.8, 1.0)
    background: tuple[float, float] = (0.0, 0.05)
    background_degree: int = 3
    hump_height: tuple[float, float] = (0.0, 0.1)
    hump_center: tuple[float, float] = (18.0, 30.0)
    hump_fwhm: tuple[float, float] = (6.0, 14.0)
    counts: tuple[float, float] = (2e3, 1e5)
    two_theta_min: tuple[float, float] = (5.0, 10.0)
    two_theta_max: tuple[float, float] = (80.0, 90.0)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None) -> InstrumentRanges:
        """Ranges from a config mapping (lists become tuples); an unknown key is an error."""
        cfg = dict(cfg or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"unknown instrument range(s) {unknown}; known: {sorted(names)}")
        out = {}
        for k, v in cfg.items():
            if k == "background_degree":
                out[k] = int(v)
            else:
                lo, hi = (float(v), float(v)) if isinstance(v, int | float) else (float(v[0]), float(v[1]))
                if hi < lo:
                    raise ValueError(f"instrument range {k}: high {hi} < low {lo}")
                out[k] = (lo, hi)
        return cls(**out)


@dataclass
class InstrumentParams:
    """One instrument setting per pattern: each field a (B,) tensor (``background`` is (B, K))."""

    wavelength: Tensor
    wavelength2: Tensor
    ka2_ratio: Tensor
    U: Tensor
    V: Tensor
    W: Tensor
    size_nm: Tensor
    asymmetry: Tensor
    displacement_mm: Tensor
    radius_mm: Tensor
    zero_shift: Tensor
    march_r: Tensor
    background: Tensor
    hump_height: Tensor
    hump_center: Tensor
    hump_fwhm: Tensor
    counts: Tensor
    two_theta_min: Tensor
    two_theta_max: Tensor

    @classmethod
    def fixed(cls, batch: int = 1, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              **values: Any) -> InstrumentParams:
        """A setting with every effect off except the ``values`` given (scalars or (B,) tensors).

        Off means: Kα1 only, 0.1° Gaussian peaks (W = 0.01), no asymmetry, shift, orientation, background
        or noise, the whole 2θ range.
        """
        base = {
            "wavelength": 1.5406, "wavelength2": 1.5444, "ka2_ratio": 0.0, "U": 0.0, "V": 0.0, "W": 0.01,
            "size_nm": math.inf, "asymmetry": 0.0, "displacement_mm": 0.0, "radius_mm": 240.0,
            "zero_shift": 0.0, "march_r": 1.0, "hump_height": 0.0, "hump_center": 20.0, "hump_fwhm": 10.0,
            "counts": math.inf, "two_theta_min": 0.0, "two_theta_max": 180.0,
        }
        unknown = sorted(set(values) - set(base) - {"background"})
        if unknown:
            raise ValueError(f"unknown instrument parameter(s) {unknown}")
        base.update(values)
        out: dict[str, Tensor] = {}
        for k, v in base.items():
            t = torch.as_tensor(v, dtype=dtype, device=device).reshape(-1)
            out[k] = t.expand(batch).clone() if t.numel() == 1 else t
        bg = values.get("background")
        out["background"] = (torch.zeros(batch, 1, dtype=dtype, device=device) if bg is None else
                             torch.as_tensor(bg, dtype=dtype, device=device).reshape(batch, -1))
        return cls(**out)


def sample_params(ranges: InstrumentRanges, batch: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> InstrumentParams:
    """Draw ``batch`` instrument settings, each parameter uniform in its range (size and counts log-uniform)."""
    def draw(lo_hi: tuple[float, float], log: bool = False, shape: tuple[int, ...] = (batch,)) -> Tensor:
        lo, hi = lo_hi
        u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        if log:
            return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        return lo + u * (hi - lo)

    out = {}
    for f in fields(InstrumentRanges):
        if f.name in ("background", "background_degree"):
            continue
        out[f.name] = draw(getattr(ranges, f.name), log=f.name in ("size_nm", "counts"))
    out["background"] = draw(ranges.background, shape=(batch, ranges.background_degree + 1))
    return InstrumentParams(**out)


# ====================================================================== pieces
def caglioti_fwhm(theta: Tensor, U: Tensor, V: Tensor, W: Tensor) -> Tensor:
    """Gaussian FWHM in degrees 2θ: sqrt(U tan² θ + V tan θ + W) (θ in radians, U/V/W in degrees²)."""
    t = torch.tan(theta)
    return torch.sqrt((U * t * t + V * t + W).clamp_min(1e-8))


def scherrer_fwhm(theta: Tensor, wavelength: Tensor, size_nm: Tensor) -> Tensor:
    """Lorentzian size-broadening FWHM in degrees 2θ: K λ / (L cos θ), L in nm (10 Å), K = 0.9."""
    return torch.rad2deg(SCHERRER_K * wavelength / (10.0 * size_nm * torch.cos(theta)))


def tch_pseudo_voigt(h_g: Tensor, h_l: Tensor) -> tuple[Tensor, Tensor]:
    """Thompson-Cox-Hastings: total FWHM and Lorentzian fraction η of a Voigt with widths H_G and H_L."""
    h = (h_g**5 + 2.69269 * h_g**4 * h_l + 2.42843 * h_g**3 * h_l**2 + 4.47163 * h_g**2 * h_l**3
         + 0.07842 * h_g * h_l**4 + h_l**5).clamp_min(1e-30) ** 0.2
    q = h_l / h
    eta = (1.36603 * q - 0.47719 * q * q + 0.11116 * q**3).clamp(0.0, 1.0)
    return h, eta


def march_dollase(cos_alpha: Tensor, r: Tensor) -> Tensor:
    """March-Dollase weight (r² cos² α + sin² α / r)^(-3/2); r = 1 gives 1 (random orientation)."""
    c2 = cos_alpha * cos_alpha
    return (r * r * c2 + (1.0 - c2) / r).clamp_min(1e-12) ** -1.5


def orientation_cosines(hkl: Tensor, lattice: Tensor, axis_hkl: Tensor) -> Tensor:
    """Cos α between each reflection's scattering vector and an orientation axis (both reciprocal vectors).

    Args:
        hkl: (P, 3) Miller indices.
        lattice: (P, 3, 3) lattice vectors (rows, Å) of each reflection's crystal.
        axis_hkl: (P, 3) Miller indices of the preferred-orientation axis (e.g. 0 0 1 for platelets).

    """
    recip = torch.linalg.inv(lattice.double()).transpose(1, 2)  # rows b_i
    g = torch.einsum("pi,pij->pj", hkl.double(), recip)
    a = torch.einsum("pi,pij->pj", axis_hkl.double(), recip)
    cos = (g * a).sum(-1) / (g.norm(dim=-1) * a.norm(dim=-1)).clamp_min(1e-12)
    return cos.to(torch.float32)


def lorentz_polarisation(two_theta_deg: Tensor) -> Tensor:
    """Unpolarised-beam Lorentz-polarisation factor (1 + cos² 2θ)/(sin² θ cos θ)."""
    th = torch.deg2rad(two_theta_deg) / 2.0
    return (1.0 + torch.cos(2.0 * th) ** 2) / (torch.sin(th) ** 2 * torch.cos(th)).clamp_min(1e-12)


def chebyshev(x: Tensor, coeff: Tensor) -> Tensor:
    """Σ_k c_k T_k(x) for x (L,) in [-1, 1] and coefficients (B, K): (B, L)."""
    terms = [torch.ones_like(x), x]
    for _ in range(2, coeff.shape[1]):
        terms.append(2.0 * x * terms[-1] - terms[-2])
    basis = torch.stack(terms[: coeff.shape[1]], dim=0)  # (K, L)
    return coeff @ basis


def uniform_grid(two_theta_min: float, two_theta_max: float, step: float, device: Any = "cpu",
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """2θ grid from min to max (included when it falls on a step) in ``step`` degrees."""
    n = int(math.floor((two_theta_max - two_theta_min) / step + 1e-6)) + 1
    return two_theta_min + step * torch.arange(n, device=device, dtype=torch.float64).to(dtype)


def interp_grid(y: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """Linear interpolation of (B, Ls) patterns on ascending ``src`` onto ``dst`` (0 outside ``src``)."""
    idx = torch.searchsorted(src, dst.contiguous()).clamp(1, src.shape[0] - 1)
    x0, x1 = src[idx - 1], src[idx]
    w = ((dst - x0) / (x1 - x0)).clamp(0.0, 1.0)
    out = y[:, idx - 1] * (1 - w) + y[:, idx] * w
    inside = (dst >= src[0]) & (dst <= src[-1])
    return out * inside


# ====================================================================== rendering
def peak_positions(d: Tensor, wavelength: Tensor, params: InstrumentParams) -> tuple[Tensor, Tensor]:
    """(2θ in degrees with displacement and zero shift, θ in radians of the unshifted peak) of (B, P) d."""
    s = (wavelength.reshape(-1, 1) / (2.0 * d)).clamp(max=1.0)
    theta = torch.asin(s)
    shift = torch.rad2deg(-2.0 * params.displacement_mm.reshape(-1, 1) * torch.cos(theta)
                          / params.radius_mm.reshape(-1, 1))
    return torch.rad2deg(2.0 * theta) + shift + params.zero_shift.reshape(-1, 1), theta


def bragg_profiles(
    d: Tensor,
    intensity: Tensor,
    mask: Tensor,
    params: InstrumentParams,
    grid: Tensor,
    cos_alpha: Tensor | None = None,
    lp: bool = False,
    max_pairs: int = MAX_PAIRS,
    cutoff_fwhm: float = CUTOFF_FWHM,
) -> Tensor:
    """The Bragg signal alone, unscaled: (B, L), each line of unit-area shape times its intensity.

    Arguments as :func:`render`; integrated intensities are kept (the area of a line on the grid is its
    intensity, times the Kα2 factor and, with ``lp``, the Lorentz-polarisation factor), so rows of several
    phases can be combined with scale factors.  ``cutoff_fwhm`` FWHMs bound each line's reach (fits may use
    fewer than :data:`CUTOFF_FWHM` for speed).
    """
    dtype = intensity.dtype if intensity.is_floating_point() else torch.float32
    device = d.device
    batch = d.shape[0]
    grid = grid.to(device=device, dtype=dtype)
    d = d.to(dtype)
    intensity = intensity.to(dtype)
    mask = mask.to(torch.bool) & (d > 0) & (intensity > 0)
    weight = intensity
    if cos_alpha is not None:
        weight = weight * march_dollase(cos_alpha.to(dtype), params.march_r.reshape(-1, 1).to(dtype))
    lines = [(params.wavelength, torch.ones_like(params.ka2_ratio))]
    if bool((params.ka2_ratio > 0).any()):
        lines.append((params.wavelength2, params.ka2_ratio))
    pos_l, th_l, amp_l, lam_l = [], [], [], []
    for lam, ratio in lines:
        lam = lam.to(dtype)
        pos, theta = peak_positions(d.clamp_min(1e-6), lam, params)
        ok = mask & (lam.reshape(-1, 1) / (2.0 * d.clamp_min(1e-6)) < 1.0)
        amp = weight * ratio.reshape(-1, 1).to(dtype)
        if lp:
            amp = amp * lorentz_polarisation(torch.rad2deg(2.0 * theta))
        pos_l.append(pos)
        th_l.append(theta)
        amp_l.append(torch.where(ok, amp, torch.zeros_like(amp)))
        lam_l.append(lam.reshape(-1, 1).expand_as(pos))
    pos, theta, amp, lam = (torch.cat(x, dim=1) for x in (pos_l, th_l, amp_l, lam_l))
    h_g = caglioti_fwhm(theta, params.U.reshape(-1, 1), params.V.reshape(-1, 1), params.W.reshape(-1, 1))
    h_l = scherrer_fwhm(theta, lam, params.size_nm.reshape(-1, 1).to(dtype))
    h_l = torch.where(torch.isfinite(h_l), h_l, torch.zeros_like(h_l))
    h, eta = tch_pseudo_voigt(h_g, h_l)
    a = (params.asymmetry.reshape(-1, 1) / torch.tan(2.0 * theta)).clamp(-0.5, 0.5)
    # unit area: the two halves of widths H(1 ± a) together have the area of a symmetric peak of width H
    area = eta * (math.pi / 2.0) * h + (1.0 - eta) * 0.5 * math.sqrt(math.pi / math.log(2.0)) * h
    height = amp / area

    # the visible lines through the one renderer, each with its own window
    cut = (cutoff_fwhm * h * (1.0 + a.abs())).clamp(max=MAX_CUTOFF)
    owner = torch.arange(batch, device=device).reshape(-1, 1).expand_as(pos)
    return render_lines(pos, height, h, owner, batch, grid, eta=eta, asymmetry=a, cutoff=cut, valid=height > 0,
                        max_pairs=max_pairs)


def render(
    d: Tensor,
    intensity: Tensor,
    mask: Tensor,
    params: InstrumentParams,
    grid: Tensor,
    cos_alpha: Tensor | None = None,
    lp: bool = False,
    noise: bool = True,
    normalize: bool = True,
    generator: torch.Generator | None = None,
    max_pairs: int = MAX_PAIRS,
    return_parts: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Render padded peak tables as measured-like patterns on ``grid`` (see the module docstring).

    Args:
        d: (B, P) d-spacings in Å (padded).
        intensity: (B, P) integrated intensities (any scale; ``lp=True`` when they lack the LP factor).
        mask: (B, P) bool, True for real peaks.
        params: The instrument setting of each pattern.
        grid: (L,) ascending 2θ grid in degrees.
        cos_alpha: (B, P) cos of the angle to the preferred-orientation axis, or None (no preferred
            orientation).
        lp: Multiply intensities by the Lorentz-polarisation factor at each line's 2θ.
        noise: Draw Poisson counting noise (patterns with infinite ``counts`` stay noiseless).
        normalize: Divide each pattern by its maximum (else the Bragg signal peaks at 1 before background
            and noise are added, and background/noise are added on that scale).
        generator: Random generator for the noise.
        max_pairs: Bound on (peak, grid point) pairs held at once.
        return_parts: Also return the Bragg signal alone (B, L), scaled as in the output before noise.

    Returns:
        (B, L) patterns (and the Bragg-only part when ``return_parts``).

    """
    bragg = bragg_profiles(d, intensity, mask, params, grid, cos_alpha, lp, max_pairs)
    dtype, device = bragg.dtype, bragg.device
    grid = grid.to(device=device, dtype=dtype)
    top = bragg.amax(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    bragg = bragg / top
    x = 2.0 * (grid - grid[0]) / (grid[-1] - grid[0]).clamp_min(1e-6) - 1.0
    bg = chebyshev(x, params.background.to(device=device, dtype=dtype))
    hump = params.hump_height.reshape(-1, 1) * torch.exp(
        -_FOUR_LN2 * ((grid - params.hump_center.reshape(-1, 1)) / params.hump_fwhm.reshape(-1, 1)) ** 2)
    y = bragg + bg.clamp_min(0.0) + hump
    if noise:
        counts = params.counts.reshape(-1, 1).to(dtype)
        finite = torch.isfinite(counts)
        c = torch.where(finite, counts, torch.ones_like(counts))
        noisy = torch.poisson((y * c).clamp_min(0.0), generator=generator) / c
        y = torch.where(finite, noisy, y)
    inside = (grid >= params.two_theta_min.reshape(-1, 1)) & (grid <= params.two_theta_max.reshape(-1, 1))
    y = y * inside
    bragg = bragg * inside
    if normalize:
        top = y.amax(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        y, bragg = y / top, bragg / top
    return (y, bragg) if return_parts else y
