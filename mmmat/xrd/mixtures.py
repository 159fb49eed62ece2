"""Synthetic multi-phase scans from peak tables: the instrument model applied to a weighted mixture.

A mixture of phases p with weight fractions w_p is one list of lines: each phase's d-spacings times its
lattice scale, and its per-cell intensities times the scale S_p = w_p / (Z M V)_p (Hill & Howard, the
inverse of the relation :mod:`mmmat.xrd.identify` uses), rendered by :func:`mmmat.xrd.instrument.render`
with the Lorentz-polarisation factor at the instrument's wavelength.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mmmat.io import Pattern
from mmmat.xrd.instrument import InstrumentParams, render
from mmmat.xrd.phases import PhaseTable


def mixture_lines(table: PhaseTable, rows: Sequence[int], fractions: Sequence[float],
                  scales: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(d in Å, intensity) of a mixture: phases' lines scaled by lattice scale and w/(ZMV)."""
    scales = [1.0] * len(rows) if scales is None else scales
    ds, ins = [], []
    for r, w, s in zip(rows, fractions, scales):
        d, inten = table.peaks(int(r))
        ds.append(d.astype(np.float64) * s)
        ins.append(inten.astype(np.float64) * w / (table.mass[r] * table.volume[r]))
    return np.concatenate(ds), np.concatenate(ins)


def render_mixtures(table: PhaseTable, mixtures: Sequence[tuple[Sequence[int], Sequence[float], Sequence[float]]],
                    params: InstrumentParams, grid: torch.Tensor, generator: torch.Generator | None = None,
                    counts_scale: bool = True) -> torch.Tensor:
    """Render mixtures ``(rows, weight fractions, lattice scales)`` with one instrument setting each: (B, L).

    With ``counts_scale`` the patterns are in counts (the strongest Bragg peak at ``params.counts``), as a
    diffractometer writes them; else max-normalised.
    """
    lines = [mixture_lines(table, r, w, s) for r, w, s in mixtures]
    width = max(x[0].size for x in lines)
    d = np.ones((len(lines), width))
    inten = np.zeros((len(lines), width))
    for i, (dl, il) in enumerate(lines):
        d[i, : dl.size], inten[i, : il.size] = dl, il
    dt = torch.as_tensor(d, dtype=grid.dtype)
    it = torch.as_tensor(inten, dtype=grid.dtype)
    y = render(dt, it, it > 0, params, grid, lp=True, normalize=not counts_scale, generator=generator)
    if counts_scale:
        y = y * params.counts.reshape(-1, 1).to(y.dtype)
    return y


def as_pattern(two_theta: torch.Tensor, y: torch.Tensor, params: InstrumentParams, i: int, name: str) -> Pattern:
    """Row ``i`` of rendered scans as a :class:`mmmat.io.Pattern` carrying its instrument's wavelengths."""
    ratio = float(params.ka2_ratio[i])
    return Pattern(two_theta.double().numpy(), y[i].double().numpy(), float(params.wavelength[i]),
                   float(params.wavelength2[i]) if ratio > 0 else None, ratio if ratio > 0 else None, source=name)
