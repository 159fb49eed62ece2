"""Batched kinematic powder X-ray diffraction in torch: the pattern of a crystal computed from its structure.

The physics follows pymatgen's ``XRDCalculator`` (the reference used by :func:`mmmat.data.xrd.compute_peaks`),
written for batches of crystals on any device:

Reflections
    Every reciprocal-lattice point g = h b1 + k b2 + l b3 (crystallographic reciprocal basis, a_i · b_j =
    δ_ij, so |g| = 1/d in Å⁻¹) with 2 sin(θ_min)/λ ≤ |g| ≤ 2 sin(θ_max)/λ is a reflection.  Because
    |h| = |g · a1| ≤ |g| |a1|, each crystal's h, k, l ranges follow from its lattice-vector lengths.  Only
    one Friedel half-space is enumerated (h > 0, or h = 0 and k > 0, or h = k = 0 and l > 0; this also
    drops 000) and intensities are doubled: without anomalous dispersion F(-g) = F(g)*.  Symmetry-equivalent
    reflections are all enumerated, so multiplicities come out by themselves, and reflections at the same
    2θ simply add when rendered.

Intensity
    ``I(g) = 2 |F(g)|² (1 + cos² 2θ) / (sin² θ cos θ)`` with ``F(g) = Σ_j occ_j f_j(s) exp(2πi g · r_j)``,
    s = |g| / 2 = sin θ / λ, and atomic scattering factors ``f(s) = Z - 41.78214 s² Σ_k a_k exp(-b_k s²)``
    from the coefficients pymatgen ships (``atomic_scattering_params.json``, loaded once).  No Debye-Waller
    factor.  Elements without coefficients there (Z = 99 and above) scatter as Z electrons at every angle.

Rendering
    Each reflection is broadened by the pseudo-Voigt of :mod:`mmmat.data.xrd` (same shape, same cutoff of
    :data:`mmmat.data.xrd.CUTOFF_FWHM` FWHMs), placed at its Bragg angle, summed onto the grid and each
    row max-normalised to 1: the profile :func:`mmmat.data.xrd.render_profile` draws from
    :func:`mmmat.data.xrd.compute_peaks`, without pymatgen's drop of peaks below 0.001 % of the strongest.

Invariances
    Only the reciprocal metric (lengths and angles), integer indices and fractional phases enter, so the
    pattern does not change under rotation or reflection of the cell, translation of all atoms, reordering of
    atoms, or another choice of unit cell (supercells add reflections whose structure factors vanish; a
    unimodular change of basis relabels the same reciprocal-lattice points).

Memory
    Work is ragged (no padding to the largest crystal) and split into chunks so that no intermediate holds
    more than about ``max_pairs`` (reflection, atom) or (reflection, grid point) pairs: cost grows with
    cell volume × atoms, so one large cell does not blow up a batch of small ones.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmmat.data.profile import render_lines
from mmmat.data.xrd import (
    CU_KA,
    CUTOFF_FWHM,
    DEFAULT_FWHM,
    TWO_THETA,
    TWO_THETA_MAX,
    TWO_THETA_MIN,
    _wavelength_value,
)

#: Largest atomic number of the scattering-factor table (index 0 scatters nothing).
MAX_Z = 118
#: Default bound on the pairs held by one intermediate tensor (about 16 MB per float32 tensor).
MAX_PAIRS = 1 << 22
#: The constant of pymatgen's scattering-factor formula, ``f = Z - 41.78214 s² Σ a exp(-b s²)``.
_SCATTER_CONST = 41.78214


@dataclass
class Reflections:
    """Reflections of a batch of crystals, one Friedel half-space, ragged (ordered by crystal).

    Attributes:
        crystal: (P,) long, index of the crystal in the batch.
        hkl: (P, 3) long Miller indices (with respect to the given cell).
        d: (P,) d-spacing, Å.
        two_theta: (P,) Bragg angle 2θ, degrees at the given wavelength.
        intensity: (P,) ``2 |F|² · Lorentz-polarisation`` (the factor 2 counts the Friedel mate), unscaled.

    """

    crystal: Tensor
    hkl: Tensor
    d: Tensor
    two_theta: Tensor
    intensity: Tensor


# ====================================================================== scattering factors
@functools.lru_cache(maxsize=1)
def _scattering_table_np() -> np.ndarray:
    """(MAX_Z + 1, 4, 2) Cromer-Mann-type (a_k, b_k) by atomic number, from pymatgen's JSON; zeros if absent."""
    import pymatgen.analysis.diffraction as diffraction
    from pymatgen.core.periodic_table import Element

    path = Path(diffraction.__file__).parent / "atomic_scattering_params.json"
    params = json.loads(path.read_text(encoding="utf-8"))
    table = np.zeros((MAX_Z + 1, 4, 2), dtype=np.float64)
    for z in range(1, MAX_Z + 1):
        coeff = params.get(Element.from_Z(z).symbol)
        if coeff is not None:
            arr = np.asarray(coeff, dtype=np.float64).reshape(-1, 2)[:4]
            table[z, : arr.shape[0]] = arr
    return table


_TABLE_CACHE: dict[tuple[str, torch.dtype], Tensor] = {}


def scattering_table(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """(MAX_Z + 1, 4, 2) scattering-factor coefficients (a_k, b_k) on ``device`` (cached per device/dtype)."""
    key = (str(torch.device(device)), dtype)
    table = _TABLE_CACHE.get(key)
    if table is None:
        table = torch.as_tensor(_scattering_table_np(), dtype=dtype, device=device)
        _TABLE_CACHE[key] = table
    return table


def atomic_scattering_factor(z: Tensor, s2: Tensor, table: Tensor | None = None) -> Tensor:
    """X-ray atomic scattering factor f (electrons) of elements ``z`` at ``s2`` = (sin θ / λ)² in Å⁻².

    ``z`` and ``s2`` broadcast against each other; Z = 0 gives 0.
    """
    if table is None:
        table = scattering_table(s2.device, s2.dtype)
    coeff = table[z]  # (..., 4, 2)
    acc = torch.zeros_like(s2 * coeff[..., 0, 0])
    for k in range(coeff.shape[-2]):
        acc = acc + coeff[..., k, 0] * torch.exp(-coeff[..., k, 1] * s2)
    return z.to(s2.dtype) - _SCATTER_CONST * s2 * acc


# ====================================================================== helpers
def _ragged_arange(counts: Tensor) -> tuple[Tensor, Tensor]:
    """For counts (B,): (owner (T,), local index (T,)) enumerating 0..counts[b]-1 for every b."""
    owner = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(owner.shape[0], device=counts.device) - starts[owner]
    return owner, local


def _chunks(cost: Tensor, budget: int) -> list[tuple[int, int]]:
    """Split 0..len(cost) into contiguous [start, stop) ranges whose summed cost stays within ``budget``.

    An item costlier than the budget gets a range of its own.
    """
    n = int(cost.shape[0])
    if n == 0:
        return []
    cum = torch.cumsum(cost.detach().to("cpu", torch.int64), 0).numpy()
    out = []
    start, base = 0, 0
    while start < n:
        stop = int(np.searchsorted(cum, base + budget, side="right"))
        stop = max(stop, start + 1)
        out.append((start, stop))
        base = int(cum[stop - 1])
        start = stop
    return out


def _g_range(wavelength: float, two_theta_range: tuple[float, float]) -> tuple[float, float]:
    """(|g|_min, |g|_max) in Å⁻¹ of a 2θ range (degrees) at ``wavelength`` (Å)."""
    lo, hi = (float(t) for t in two_theta_range)
    if not 0.0 <= lo < hi <= 180.0:
        raise ValueError(f"two_theta_range must satisfy 0 <= min < max <= 180 degrees, got {two_theta_range}")
    return (2.0 * math.sin(math.radians(lo / 2.0)) / wavelength, 2.0 * math.sin(math.radians(hi / 2.0)) / wavelength)


# ====================================================================== reflections
def reflections_torch(
    lattice: Tensor,
    frac: Tensor,
    z: Tensor,
    batch: Tensor,
    wavelength: float | str = CU_KA,
    two_theta_range: tuple[float, float] = (TWO_THETA_MIN, TWO_THETA_MAX),
    occupancy: Tensor | None = None,
    max_pairs: int = MAX_PAIRS,
    scattering: Callable[[Tensor, Tensor], Tensor] | None = None,
    polarisation: bool = True,
) -> Reflections:
    """Every reflection of every crystal in a 2θ range, with its kinematic intensity (no Debye-Waller).

    Args:
        lattice: (B, 3, 3) lattice vectors as rows, Å.
        frac: (N, 3) fractional coordinates.
        z: (N,) atomic numbers (0..118).
        batch: (N,) crystal index of each atom.
        wavelength: X-ray wavelength in Å, or a pymatgen name such as ``"CuKa"``.
        two_theta_range: 2θ range in degrees (inclusive) at ``wavelength``.
        occupancy: (N,) site occupancies (scattering weights), or None for 1.
        max_pairs: Bound on the (reflection, atom) pairs (and enumerated index triples) held at once.
        scattering: ``f(z, s2)``: scattering amplitude of elements ``z`` at ``s2`` = (sin θ / λ)² Å⁻²; None
            means X-ray form factors (:func:`atomic_scattering_factor`). A neutron pattern passes coherent
            scattering lengths here.
        polarisation: Multiply by the X-ray polarisation term (1 + cos² 2θ); False keeps the
            Lorentz factor 1 / (sin² θ cos θ) alone (neutrons, as pymatgen's ``NDCalculator``).

    Returns:
        The reflections of one Friedel half-space, ordered by crystal; intensities in ``frac``'s float
        dtype (at least float32), d and 2θ computed in float64 and cast to it.  A crystal with a degenerate
        or non-finite cell has none.

    """
    lam = _wavelength_value(wavelength)
    g_min, g_max = _g_range(lam, two_theta_range)
    device = frac.device
    dtype = frac.dtype if frac.dtype in (torch.float32, torch.float64) else torch.float32
    n_cryst = int(lattice.shape[0])
    batch = batch.to(device=device, dtype=torch.long)
    z = z.to(device=device, dtype=torch.long).clamp(0, MAX_Z)
    weight = None if occupancy is None else occupancy.to(device=device, dtype=dtype)

    # Atoms grouped by crystal (stable sort keeps the order inside each crystal).
    order = torch.argsort(batch, stable=True)
    frac_s = torch.remainder(frac.to(dtype).index_select(0, order), 1.0)
    z_s = z.index_select(0, order)
    w_s = None if weight is None else weight.index_select(0, order)
    counts = torch.bincount(batch, minlength=n_cryst)
    starts = torch.cumsum(counts, 0) - counts

    with torch.autocast(device_type=device.type, enabled=False):
        lat = lattice.detach().to(device=device, dtype=torch.float64)
        det = torch.linalg.det(lat) if n_cryst else lat.new_zeros(0)
        ok = torch.isfinite(lat).flatten(1).all(1) & (det.abs() > 1e-6) & (counts > 0)
        safe = torch.where(ok[:, None, None], lat, torch.eye(3, dtype=lat.dtype, device=device).expand_as(lat))
        recip = torch.linalg.inv(safe).transpose(1, 2)  # rows b_i with a_i . b_j = delta_ij
        metric = recip @ recip.transpose(1, 2)  # G*: |g|^2 = hkl G* hkl
        reach = torch.floor(g_max * safe.norm(dim=-1) * (1.0 + 1e-9)).long()  # (B, 3) max |h|, |k|, |l|
        reach = torch.where(ok[:, None], reach, torch.zeros_like(reach))
        nk, nl = 2 * reach[:, 1] + 1, 2 * reach[:, 2] + 1
        box = torch.where(ok, (reach[:, 0] + 1) * nk * nl, torch.zeros_like(nk))  # half-space box h >= 0

        parts: list[tuple[Tensor, Tensor, Tensor]] = []
        for c0, c1 in _chunks(box, max(max_pairs // 4, 1)):
            owner, local = _ragged_arange(box[c0:c1])
            owner = owner + c0
            knl = (nk * nl)[owner]
            h = torch.div(local, knl, rounding_mode="floor")
            rem = local - h * knl
            k = torch.div(rem, nl[owner], rounding_mode="floor")
            l_ = rem - k * nl[owner] - reach[owner, 2]
            k = k - reach[owner, 1]
            half = (h > 0) | ((h == 0) & (k > 0)) | ((h == 0) & (k == 0) & (l_ > 0))
            owner, h, k, l_ = owner[half], h[half], k[half], l_[half]
            m = metric[owner]
            hf, kf, lf = h.double(), k.double(), l_.double()
            g2 = (
                m[:, 0, 0] * hf * hf
                + m[:, 1, 1] * kf * kf
                + m[:, 2, 2] * lf * lf
                + 2.0 * (m[:, 0, 1] * hf * kf + m[:, 0, 2] * hf * lf + m[:, 1, 2] * kf * lf)
            )
            keep = (g2 >= g_min * g_min) & (g2 <= g_max * g_max)
            parts.append((owner[keep], torch.stack([h, k, l_], dim=1)[keep], g2[keep]))

        if parts:
            owner = torch.cat([p[0] for p in parts])
            hkl = torch.cat([p[1] for p in parts])
            g2 = torch.cat([p[2] for p in parts])
        else:
            owner = torch.zeros(0, dtype=torch.long, device=device)
            hkl = torch.zeros(0, 3, dtype=torch.long, device=device)
            g2 = torch.zeros(0, dtype=torch.float64, device=device)

        g = torch.sqrt(g2)
        sin_t = (lam * g / 2.0).clamp(max=1.0)
        theta = torch.asin(sin_t)
        cos_t = torch.cos(theta)
        lorentz = 1.0 / (sin_t * sin_t * cos_t)
        if polarisation:
            lorentz = lorentz * (1.0 + torch.cos(2.0 * theta) ** 2)
        s2 = (g2 / 4.0).to(dtype)

        # Structure factors: ragged (reflection, atom-of-its-crystal) pairs, in chunks of <= max_pairs.
        table = scattering_table(device, dtype)
        f_re = torch.zeros(owner.shape[0], dtype=dtype, device=device)
        f_im = torch.zeros_like(f_re)
        hkl_w = hkl.to(dtype)
        n_per = counts[owner]
        for r0, r1 in _chunks(n_per, max_pairs):
            refl, atom_local = _ragged_arange(n_per[r0:r1])
            atom = starts[owner[r0:r1]][refl] + atom_local
            refl_g = refl + r0
            dot = (hkl_w[refl_g] * frac_s[atom]).sum(-1)
            phase = (2.0 * math.pi) * torch.remainder(dot, 1.0)
            if scattering is None:
                f = atomic_scattering_factor(z_s[atom], s2[refl_g], table)
            else:
                f = scattering(z_s[atom], s2[refl_g])
            if w_s is not None:
                f = f * w_s[atom]
            f_re.index_add_(0, refl_g, f * torch.cos(phase))
            f_im.index_add_(0, refl_g, f * torch.sin(phase))

        intensity = 2.0 * (f_re * f_re + f_im * f_im) * lorentz.to(dtype)
        two_theta = torch.rad2deg(2.0 * theta)
    return Reflections(
        crystal=owner,
        hkl=hkl,
        d=(1.0 / g).to(dtype),
        two_theta=two_theta.to(dtype),
        intensity=intensity,
    )


# ====================================================================== rendering
def render_reflections_torch(
    refl: Reflections,
    num_crystals: int,
    fwhm: float | Tensor = DEFAULT_FWHM,
    grid: Any = None,
    eta: float = 0.0,
    max_pairs: int = MAX_PAIRS,
) -> Tensor:
    """Render ragged reflections as (num_crystals, L) profiles, each row max-normalised to 1.

    Drawn by :func:`mmmat.data.profile.render_lines`: a pseudo-Voigt of unit height (``eta`` Lorentzian
    fraction), scaled by the reflection's intensity, cut off beyond :data:`mmmat.data.xrd.CUTOFF_FWHM` FWHMs.

    Args:
        refl: Reflections from :func:`reflections_torch`.
        num_crystals: Number B of rows.
        fwhm: Full width at half maximum in degrees 2θ: a float or a (B,) tensor.
        grid: Ascending 2θ grid in degrees (array or tensor); None means :data:`mmmat.data.xrd.TWO_THETA`.
        eta: Lorentzian fraction of the pseudo-Voigt (0 = Gaussian).
        max_pairs: Bound on the (reflection, grid point) pairs held at once.

    Returns:
        (B, L) profiles in the reflections' dtype on their device; all-zero rows for crystals without a
        reflection on the grid.

    """
    device, dtype = refl.intensity.device, refl.intensity.dtype
    if isinstance(grid, Tensor):
        grid_t = grid.to(device=device, dtype=dtype)
    else:
        grid_t = torch.as_tensor(np.asarray(TWO_THETA if grid is None else grid, dtype=np.float64), device=device)
        grid_t = grid_t.to(dtype)
    n = int(grid_t.shape[0])
    min_step = float((grid_t[1:] - grid_t[:-1]).min()) if n > 1 else 1.0
    if isinstance(fwhm, Tensor):
        fw_all = fwhm.to(device=device, dtype=dtype).reshape(-1).expand(num_crystals)
        max_fwhm = float(fw_all.max()) if num_crystals else 0.0
    else:
        if not fwhm > 0:
            raise ValueError(f"fwhm must be positive (degrees 2θ), got {fwhm}")
        fw_all = torch.full((num_crystals,), float(fwhm), dtype=dtype, device=device)
        max_fwhm = float(fwhm)
    width = int(math.floor(2.0 * CUTOFF_FWHM * max_fwhm / min_step)) + 2
    out = render_lines(refl.two_theta, refl.intensity, fw_all[refl.crystal], refl.crystal, num_crystals, grid_t,
                       eta=eta, valid=torch.ones_like(refl.crystal, dtype=torch.bool), max_width=width,
                       max_pairs=max_pairs)
    top = out.amax(dim=1, keepdim=True) if n else out.new_zeros(num_crystals, 1)
    return torch.where(top > 0, out / top.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(out))


def powder_pattern_torch(
    lattice: Tensor,
    frac: Tensor,
    z: Tensor,
    batch: Tensor,
    wavelength: float | str = CU_KA,
    two_theta_range: tuple[float, float] = (TWO_THETA_MIN, TWO_THETA_MAX),
    fwhm: float | Tensor = DEFAULT_FWHM,
    grid: Any = None,
    eta: float = 0.0,
    occupancy: Tensor | None = None,
    max_pairs: int = MAX_PAIRS,
    scattering: Callable[[Tensor, Tensor], Tensor] | None = None,
    polarisation: bool = True,
) -> Tensor:
    """Powder profiles of a batch of crystals computed from their structures (kinematic, no Debye-Waller).

    Equivalent to ``render_profile(compute_peaks(structure), wavelength, fwhm, grid, eta)`` of
    :mod:`mmmat.data.xrd` per crystal, batched in torch on the inputs' device.

    Args:
        lattice: (B, 3, 3) lattice vectors as rows, Å.
        frac: (N, 3) fractional coordinates (float32 or float64: the working precision).
        z: (N,) atomic numbers.
        batch: (N,) crystal index of each atom.
        wavelength: X-ray wavelength in Å (default Cu Kα), or a pymatgen name such as ``"CuKa"``.
        two_theta_range: 2θ range in degrees whose reflections are kept (peaks outside it add nothing, as
            with :func:`mmmat.data.xrd.compute_peaks`).
        fwhm: Peak full width at half maximum, degrees 2θ: a float or a (B,) tensor.
        grid: Ascending 2θ grid in degrees; None means :data:`mmmat.data.xrd.TWO_THETA` (1701 points).
        eta: Lorentzian fraction of the pseudo-Voigt (0 = Gaussian, as the data set's profiles).
        occupancy: (N,) site occupancies, or None for fully occupied sites.
        max_pairs: Bound on the pairs one intermediate tensor holds (memory control).
        scattering: Scattering amplitude ``f(z, s2)`` (None: X-ray form factors), see :func:`reflections_torch`.
        polarisation: Apply the X-ray polarisation factor (False for neutrons).

    Returns:
        (B, L) profiles, each row max-normalised to 1 (zeros for a crystal without atoms, with a degenerate
        cell or without a reflection in range).

    """
    refl = reflections_torch(lattice, frac, z, batch, wavelength, two_theta_range, occupancy, max_pairs,
                             scattering, polarisation)
    return render_reflections_torch(refl, int(lattice.shape[0]), fwhm, grid, eta, max_pairs)


# ====================================================================== pymatgen input
def structure_tensors(
    structures: Sequence[Any], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """Flat tensors of pymatgen ``Structure`` objects for :func:`powder_pattern_torch`.

    Disordered sites become one entry per species with its occupancy as ``occupancy``.

    Returns:
        ``{"lattice": (B, 3, 3), "frac": (N, 3), "z": (N,), "batch": (N,), "occupancy": (N,)}``.

    """
    lattices, fracs, zs, owners, occ = [], [], [], [], []
    for i, s in enumerate(structures):
        lattices.append(np.asarray(s.lattice.matrix, dtype=np.float64))
        for site in s:
            for sp, amount in site.species.items():
                fracs.append(site.frac_coords)
                zs.append(int(sp.Z))
                owners.append(i)
                occ.append(float(amount))
    return {
        "lattice": torch.as_tensor(np.array(lattices).reshape(-1, 3, 3), dtype=dtype, device=device),
        "frac": torch.as_tensor(np.array(fracs).reshape(-1, 3), dtype=dtype, device=device),
        "z": torch.as_tensor(np.array(zs, dtype=np.int64), device=device),
        "batch": torch.as_tensor(np.array(owners, dtype=np.int64), device=device),
        "occupancy": torch.as_tensor(np.array(occ), dtype=dtype, device=device),
    }


def powder_pattern_structures(structures: Sequence[Any], **kwargs: Any) -> Tensor:
    """(B, L) profiles of pymatgen ``Structure`` objects; ``kwargs`` go to :func:`powder_pattern_torch`."""
    t = structure_tensors(structures)
    return powder_pattern_torch(t["lattice"], t["frac"], t["z"], t["batch"], occupancy=t["occupancy"], **kwargs)
