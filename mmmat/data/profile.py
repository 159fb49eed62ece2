"""The one peak-to-profile renderer and the one background estimator, in torch (CPU or GPU).

Every diffraction profile the project draws goes through :func:`render_lines`: a ragged list of lines (a
position on the grid's axis, a height, a full width at half maximum, the row it belongs to) becomes rows of
pseudo-Voigt peaks on an ascending grid.  The axis is whatever the caller's positions are in: degrees 2θ for
X-ray and constant-wavelength neutron powder diffraction, or any other monotonic axis (d, time of flight);
nothing in the renderer knows about X-rays.  Callers:

* :func:`mmmat.data.xrd.render_profile_torch`: padded peak tables (d, I) with strain and zero shift
  (augmentation);
* :func:`mmmat.data.xrd_torch.render_reflections_torch`: reflections computed from structures in torch;
* :func:`mmmat.xrd.instrument.bragg_profiles`: the instrument model (per-line widths and Lorentzian fractions,
  axial-divergence asymmetry).

:func:`mmmat.data.xrd.render_profile` is the numpy path, kept only where torch is not wanted (building shards
in worker processes, plotting); a test checks that it agrees with :func:`render_lines`.

The background under a measured pattern is estimated by :func:`background` (a morphological opening, then a
rolling mean); :func:`mmmat.data.xrd.estimate_background` (numpy in and out) and
:func:`mmmat.encoders.spectrum.remove_background_torch` both call it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmmat.data.xrd import CUTOFF_FWHM  # a line reaches this many FWHMs from its centre (unless told otherwise)

#: Bound on the (line, grid point) pairs held at once.
MAX_PAIRS = 1 << 22

_FOUR_LN2 = 4.0 * math.log(2.0)


def pseudo_voigt(x: Tensor, fwhm: Tensor | float, eta: Tensor | float = 0.0) -> Tensor:
    """Pseudo-Voigt of unit height at ``x = 0``: ``eta·L + (1 - eta)·G``, both of full width ``fwhm``."""
    u = (x / fwhm) ** 2
    gauss = torch.exp(-_FOUR_LN2 * u)
    if isinstance(eta, float | int) and eta == 0.0:
        return gauss
    return eta / (1.0 + 4.0 * u) + (1.0 - eta) * gauss


def render_lines(
    pos: Tensor,
    height: Tensor,
    fwhm: Tensor,
    owner: Tensor,
    num_rows: int,
    grid: Tensor,
    eta: Tensor | float = 0.0,
    asymmetry: Tensor | None = None,
    cutoff: Tensor | None = None,
    valid: Tensor | None = None,
    max_width: int | None = None,
    max_pairs: int = MAX_PAIRS,
) -> Tensor:
    """Sum pseudo-Voigt lines into ``num_rows`` profiles on ``grid`` (not normalised).

    Line ``k`` adds ``height[k]·pv(x - pos[k])`` to row ``owner[k]`` at every grid point ``x`` within
    ``cutoff[k]`` of ``pos[k]``, where ``pv`` is :func:`pseudo_voigt` of unit height.  With ``asymmetry`` ``a``
    the low side of a line has width ``fwhm·(1 + a)`` and the high side ``fwhm·(1 - a)``.

    Args:
        pos: Line centres on the grid's axis (any shape; flattened with the other per-line tensors).
        height: Peak heights (same shape as ``pos``).
        fwhm: Full widths at half maximum, axis units (broadcastable to ``pos``).
        owner: Row of each line, integers in ``[0, num_rows)`` (broadcastable to ``pos``).
        num_rows: Number of output rows.
        grid: (L,) ascending grid.
        eta: Lorentzian fraction, a float or per line (broadcastable to ``pos``).
        asymmetry: Per-line asymmetry ``a`` (broadcastable to ``pos``), or None for symmetric lines.
        cutoff: Per-line reach in axis units; default :data:`CUTOFF_FWHM`·``fwhm``·(1 + |a|).
        valid: Bool mask of real lines (padding False); None: every line with a positive height.
        max_width: Grid points a line's window spans, when the caller knows a bound (no read-back from the
            device: every line gets this window).  None: each line gets its own window from ``cutoff`` (lines
            are compacted and sorted by window, which reads values back from the device).
        max_pairs: Bound on the (line, grid point) pairs held at once.

    Returns:
        (num_rows, L) tensor in ``height``'s floating dtype on its device.

    """
    dtype = height.dtype if height.is_floating_point() else torch.float32
    device = pos.device
    grid = grid.to(device=device, dtype=dtype)
    n = int(grid.shape[0])
    shape = pos.shape
    pos = pos.to(dtype).reshape(-1)
    m = pos.shape[0]

    def per_line(t: Tensor | float, kind: torch.dtype = dtype) -> Tensor:
        t = torch.as_tensor(t, device=device)
        t = t.to(kind) if t.dtype != kind else t
        if t.numel() == 1 or t.shape == pos.shape:
            return t.reshape(-1).expand(pos.shape)
        return t.expand(*shape).reshape(-1)

    height_f = per_line(height)
    fw = per_line(fwhm)
    rows = per_line(owner, torch.long)
    scalar_eta = isinstance(eta, float | int)
    eta_f = float(eta) if scalar_eta else per_line(eta)
    a = per_line(asymmetry) if asymmetry is not None else None
    if cutoff is None:
        cutoff = CUTOFF_FWHM * fw * (1.0 + a.abs()) if a is not None else CUTOFF_FWHM * fw
    cut = per_line(cutoff)
    ok = per_line(valid, torch.bool) if valid is not None else height_f > 0
    out = torch.zeros(num_rows * n, dtype=dtype, device=device)
    if m == 0 or n == 0 or num_rows == 0:
        return out.view(num_rows, n)

    def add(sl: Any, w: int) -> None:
        p, c = pos[sl], cut[sl]
        lo = torch.searchsorted(grid, (p - c).contiguous())
        idx = lo.unsqueeze(-1) + torch.arange(w, device=device)
        idx_c = idx.clamp(max=n - 1)
        x = grid[idx_c] - p.unsqueeze(-1)
        width = fw[sl].unsqueeze(-1)
        if a is not None:
            width = torch.where(x < 0, width * (1.0 + a[sl].unsqueeze(-1)), width * (1.0 - a[sl].unsqueeze(-1)))
        e = eta_f if scalar_eta else eta_f[sl].unsqueeze(-1)
        keep = (idx < n) & (x.abs() <= c.unsqueeze(-1)) & ok[sl].unsqueeze(-1)
        values = torch.where(keep, height_f[sl].unsqueeze(-1) * pseudo_voigt(x, width, e), torch.zeros((), dtype=dtype,
                                                                                                      device=device))
        out.index_add_(0, (rows[sl].unsqueeze(-1) * n + idx_c).reshape(-1), values.reshape(-1))

    with torch.autocast(device_type=device.type, enabled=False):
        if max_width is not None:
            w = max(int(max_width), 1)
            step = max(max_pairs // w, 1)
            for r0 in range(0, m, step):
                add(slice(r0, min(r0 + step, m)), w)
            return out.view(num_rows, n)
        # own window per line: compact the visible lines, sort by window, chunk under max_pairs
        keep = ok & (pos + cut >= grid[0]) & (pos - cut <= grid[-1])
        sel = torch.nonzero(keep).reshape(-1)
        if sel.numel() == 0:
            return out.view(num_rows, n)
        min_step = float((grid[1:] - grid[:-1]).min()) if n > 1 else 1.0
        widths = torch.ceil(2.0 * cut[sel] / min_step).long() + 2
        order = torch.argsort(widths)
        sel, widths = sel[order], widths[order]
        start, total = 0, int(sel.numel())
        while start < total:
            w = int(widths[min(start + max(max_pairs // int(widths[start]), 1), total) - 1])
            stop = min(start + max(max_pairs // w, 1), total)
            add(sel[start:stop], w)
            start = stop
    return out.view(num_rows, n)


def background(y: Tensor, points: int) -> Tensor:
    """Slowly varying background under (B, L) patterns: a morphological opening, then a rolling mean.

    A rolling minimum then a rolling maximum over ``points`` grid points (``2·(points // 2) + 1`` wide, edges
    padded with the edge value) removes every feature narrower than the window (the Bragg peaks) and never
    exceeds the data; a rolling mean over ``max(3, points // 2)`` points smooths its corners.

    Args:
        y: (B, L) patterns (float32 or float64).
        points: Opening window in grid points.

    Returns:
        (B, L) background, same dtype and device.

    """
    half = int(points) // 2
    x = y.unsqueeze(1)
    k = 2 * half + 1
    low = -F.max_pool1d(F.pad(-x, (half, half), mode="replicate"), k, stride=1)
    opened = F.max_pool1d(F.pad(low, (half, half), mode="replicate"), k, stride=1)
    mhalf = max(3, int(points) // 2) // 2
    return F.avg_pool1d(F.pad(opened, (mhalf, mhalf), mode="replicate"), 2 * mhalf + 1, stride=1).squeeze(1)


__all__ = ["CUTOFF_FWHM", "MAX_PAIRS", "background", "pseudo_voigt", "render_lines"]
