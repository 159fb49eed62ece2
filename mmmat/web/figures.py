"""Plotly figures of the pages: a rotatable 3D crystal, pattern overlays, fits, maps and run plots."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np


@functools.lru_cache(maxsize=1)
def _jmol_colors() -> dict[str, str]:
    import importlib.resources

    import yaml

    text = importlib.resources.files("pymatgen.vis").joinpath("ElementColorSchemes.yaml").read_text()
    return {el: "rgb({},{},{})".format(*rgb) for el, rgb in yaml.safe_load(text)["Jmol"].items()}


def _empty(message: str) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(xaxis={"visible": False}, yaxis={"visible": False}, height=320, margin={"t": 20})
    return fig


def empty_figure(message: str = "nothing to show yet") -> Any:
    """A blank figure carrying one line of text."""
    return _empty(message)


def structure_figure(structure: Any, title: str = "", bond_scale: float = 1.15) -> Any:
    """A rotatable 3D view of a crystal: atoms (Jmol colours), bonds, and the unit cell.

    Atoms on cell faces, edges and corners are repeated on the opposite sides, as crystal viewers show them.
    Bonds join atoms closer than ``bond_scale`` times the sum of their atomic radii (Å).
    """
    import plotly.graph_objects as go
    from pymatgen.core import Element

    colors = _jmol_colors()
    lat = structure.lattice.matrix
    frac, species = [], []
    for site in structure:
        f = np.mod(site.frac_coords, 1.0)
        f[np.isclose(f, 1.0, atol=1e-4)] = 0.0
        shifts = [[]]
        for x in f:
            shifts = [s + [d] for s in shifts for d in ((0, 1) if abs(x) < 1e-3 else (0,))]
        for sh in shifts:
            frac.append(f + np.asarray(sh, float))
            species.append(site.specie.symbol)
    frac = np.asarray(frac)
    cart = frac @ lat
    radius = {}
    for el in set(species):
        r = Element(el).atomic_radius
        radius[el] = float(r) if r is not None else 1.0
    # bonds among the drawn atoms (images included), by distance
    bx, by, bz = [], [], []
    if len(cart) <= 600:
        d = np.linalg.norm(cart[:, None, :] - cart[None, :, :], axis=-1)
        rs = np.array([radius[e] for e in species])
        lim = bond_scale * (rs[:, None] + rs[None, :])
        ii, jj = np.nonzero(np.triu((d > 0.3) & (d < lim), 1))
        for i, j in zip(ii, jj):
            bx += [cart[i, 0], cart[j, 0], None]
            by += [cart[i, 1], cart[j, 1], None]
            bz += [cart[i, 2], cart[j, 2], None]
    traces = []
    if bx:
        traces.append(go.Scatter3d(x=bx, y=by, z=bz, mode="lines", line={"color": "#999", "width": 4},
                                   hoverinfo="skip", showlegend=False))
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    ex, ey, ez = [], [], []
    for a in range(8):
        for b in range(a + 1, 8):
            if np.abs(corners[a] - corners[b]).sum() == 1:
                p, q = corners[a] @ lat, corners[b] @ lat
                ex += [p[0], q[0], None]
                ey += [p[1], q[1], None]
                ez += [p[2], q[2], None]
    traces.append(go.Scatter3d(x=ex, y=ey, z=ez, mode="lines", line={"color": "#333", "width": 2},
                               hoverinfo="skip", name="unit cell", showlegend=False))
    for el in sorted(set(species)):
        m = np.array([s == el for s in species])
        traces.append(go.Scatter3d(
            x=cart[m, 0], y=cart[m, 1], z=cart[m, 2], mode="markers", name=el,
            marker={"size": 6 + 10 * radius[el], "color": colors.get(el, "rgb(255,20,147)"),
                    "line": {"color": "#222", "width": 1}, "opacity": 1.0},
            text=[f"{el} ({x:.3f}, {y:.3f}, {z:.3f})" for x, y, z in frac[m]], hoverinfo="text",
        ))
    fig = go.Figure(traces)
    a, b, c = structure.lattice.abc
    al, be, ga = structure.lattice.angles
    subtitle = f"a={a:.3f} b={b:.3f} c={c:.3f} Å, α={al:.1f} β={be:.1f} γ={ga:.1f}°"
    fig.update_layout(
        title={"text": f"{title}<br><sub>{subtitle}</sub>" if title else subtitle, "font": {"size": 13}},
        scene={"aspectmode": "data", "xaxis": {"visible": False}, "yaxis": {"visible": False},
               "zaxis": {"visible": False}},
        margin={"l": 0, "r": 0, "t": 50, "b": 0}, height=420, uirevision="structure",
        legend={"itemsizing": "constant"},
    )
    return fig


def computed_profile(structure: Any, two_theta: np.ndarray, wavelength: float, fwhm: float = 0.1) -> np.ndarray:
    """The powder profile of ``structure`` at ``wavelength`` (Å) on the grid ``two_theta`` (degrees), max 1.

    Peaks are computed once as d-spacings (pymatgen's XRDCalculator) and placed at their Bragg angles for
    the given wavelength, so a pattern measured with any anode is compared through d-spacing.
    """
    from mmmat.data.xrd import compute_peaks, render_profile

    peaks = compute_peaks(structure)
    grid = np.asarray(two_theta, float)
    order = np.argsort(grid)
    out = np.zeros_like(grid)
    out[order] = render_profile(peaks, wavelength=wavelength, fwhm=fwhm, grid=grid[order])
    return out


def pattern_overlay_figure(
    pattern: Any, structure: Any | None, label: str = "", wavelength: float | None = None
) -> Any:
    """The measured pattern (normalised to 1) over a hit's computed pattern at the measured wavelength."""
    import plotly.graph_objects as go

    from mmmat.data.xrd import CU_KA

    tt = np.asarray(pattern.two_theta, float)
    y = np.asarray(pattern.intensity, float)
    y = (y - np.nanmin(y)) / (np.nanmax(y) - np.nanmin(y) or 1.0)
    lam = float(wavelength or pattern.wavelength or CU_KA)
    fig = go.Figure([go.Scatter(x=tt, y=y, mode="lines", name=f"measured ({pattern.source})",
                                line={"color": "black", "width": 1})])
    if structure is not None:
        fig.add_trace(go.Scatter(x=tt, y=computed_profile(structure, tt, lam), mode="lines",
                                 name=f"computed {label}", line={"color": "crimson", "width": 1}))
    fig.update_layout(
        xaxis_title=f"2θ (degrees, λ = {lam:.5f} Å)", yaxis_title="intensity (normalised)", height=340,
        margin={"t": 30}, legend={"orientation": "h", "y": 1.12},
    )
    return fig


def fit_figure(result: dict) -> Any:
    """Measured, fitted, residual and each phase of an identification result (``IdentifyResult.to_dict()``)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    tt = np.asarray(result["two_theta"], float)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.78, 0.22], vertical_spacing=0.03)
    fig.add_trace(go.Scatter(x=tt, y=result["measured"], mode="lines", name="measured",
                             line={"color": "black", "width": 1}), row=1, col=1)
    fig.add_trace(go.Scatter(x=tt, y=result["fitted"], mode="lines", name="fitted",
                             line={"color": "crimson", "width": 1}), row=1, col=1)
    for mid, ys in (result.get("contributions") or {}).items():
        fig.add_trace(go.Scatter(x=tt, y=ys, mode="lines", name=str(mid), line={"width": 1, "dash": "dot"}),
                      row=1, col=1)
    fig.add_trace(go.Scatter(x=tt, y=result["residual"], mode="lines", name="residual",
                             line={"color": "grey", "width": 1}), row=2, col=1)
    rwp = result.get("rwp")
    fig.update_layout(title=f"Rwp {rwp:.2f} %" if isinstance(rwp, int | float) else None, height=460,
                      margin={"t": 40}, legend={"orientation": "h", "y": -0.15})
    fig.update_xaxes(title_text="2θ (degrees)", row=2, col=1)
    fig.update_yaxes(title_text="intensity", row=1, col=1)
    return fig


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The first two principal components of ``vectors`` (N, d) → (N, 2)."""
    x = np.asarray(vectors, np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    if len(x) < 2:
        return np.zeros((len(x), 2))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T if vt.shape[0] >= 2 else np.c_[x @ vt[:1].T, np.zeros(len(x))]


def latent_map_figure(xy: np.ndarray, meta: Any, color: str | None = None) -> Any:
    """Scatter of 2D embedding coordinates, hover with id and formula, coloured by a meta column."""
    import plotly.graph_objects as go

    c = None
    if color and color in meta.columns:
        c = meta[color].to_numpy(dtype=float, na_value=np.nan)
    text = [f"{m} {f}" for m, f in zip(meta["material_id"], meta["formula"])]
    marker: dict[str, Any] = {"size": 5}
    if c is not None:
        from mmmat.plots import unit_of

        unit = unit_of(color)
        marker.update(color=c, colorscale="Viridis", showscale=True,
                      colorbar={"title": f"{color} ({unit})" if unit else color})
    fig = go.Figure(go.Scattergl(x=xy[:, 0], y=xy[:, 1], mode="markers", marker=marker, text=text,
                                 hoverinfo="text"))
    fig.update_layout(xaxis_title="PC 1", yaxis_title="PC 2", height=480, margin={"t": 30})
    return fig


def pareto_mask(x: Sequence[float], y: Sequence[float], minimise_x: bool = True, maximise_y: bool = True) -> np.ndarray:
    """True for points no other point beats on both axes (NaN points are never on the front)."""
    a = np.asarray(x, float) * (1 if minimise_x else -1)
    b = np.asarray(y, float) * (-1 if maximise_y else 1)
    ok = np.isfinite(a) & np.isfinite(b)
    front = np.zeros(len(a), bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (a <= a[i]) & (b <= b[i]) & ((a < a[i]) | (b < b[i]))
        front[i] = not dominated.any()
    return front
