"""PNG plots people expect from the command line: parity with error distribution, latent map, pattern overlay.

matplotlib with the Agg backend (no display needed). Axis labels carry units.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Units of the properties the built-in sources carry (label units of a fine-tuned head).
PROPERTY_UNITS = {
    "formation_energy_per_atom": "eV/atom",
    "e_above_hull": "eV/atom",
    "energy_per_atom": "eV/atom",
    "heat_all": "eV/atom",
    "heat_ref": "eV/atom",
    "band_gap": "eV",
    "dir_gap": "eV",
    "ind_gap": "eV",
    "density": "g/cm³",
    "volume_per_atom": "Å³/atom",
    "bulk_modulus": "GPa",
    "shear_modulus": "GPa",
}


def unit_of(name: str) -> str:
    """The unit of a property by name ("" when unknown)."""
    return PROPERTY_UNITS.get(name, "")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def parity_error_plot(
    y: Sequence[float], pred: Sequence[float], path: str | Path, name: str, unit: str | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, float]:
    """Predicted against true values beside the distribution of errors (predicted - true); PNG.

    Args:
        y: True values.
        pred: Predictions, same length.
        path: PNG to write.
        name: Property name (axis labels).
        unit: Its unit (default: :func:`unit_of`).
        std: Predicted standard deviations (colour the points) or None.

    Returns:
        ``{"n", "mae", "rmse", "r2"}`` over the finite pairs.

    """
    plt = _plt()
    unit = unit_of(name) if unit is None else unit
    u = f" ({unit})" if unit else ""
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    ok = np.isfinite(y) & np.isfinite(pred)
    err = pred[ok] - y[ok]
    n = int(ok.sum())
    mae = float(np.abs(err).mean()) if n else float("nan")
    rmse = float(np.sqrt((err**2).mean())) if n else float("nan")
    ss = float(((y[ok] - y[ok].mean()) ** 2).sum()) if n else 0.0
    r2 = 1.0 - float((err**2).sum()) / ss if ss > 0 else float("nan")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4.2), dpi=120)
    c = None if std is None else np.asarray(std, float)[ok]
    sc = a.scatter(y[ok], pred[ok], s=8, c=c, cmap="viridis", alpha=0.7, linewidths=0)
    if c is not None and n:
        fig.colorbar(sc, ax=a, label=f"predicted std{u}")
    if n:
        lo, hi = float(min(y[ok].min(), pred[ok].min())), float(max(y[ok].max(), pred[ok].max()))
        pad = 0.03 * (hi - lo or 1.0)
        a.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
        a.set_xlim(lo - pad, hi + pad)
        a.set_ylim(lo - pad, hi + pad)
    a.set_xlabel(f"true {name}{u}")
    a.set_ylabel(f"predicted {name}{u}")
    a.set_title(f"MAE {mae:.4g}{u}  RMSE {rmse:.4g}  R² {r2:.3f}  n={n}", fontsize=9)
    b.hist(err, bins=max(5, min(60, n // 3 or 5)), color="#4c72b0")
    b.axvline(0, color="k", lw=0.8)
    b.set_xlabel(f"error (predicted - true){u}")
    b.set_ylabel("count")
    b.set_title("error distribution", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"n": n, "mae": mae, "rmse": rmse, "r2": r2}


def latent_map_plot(
    vectors: np.ndarray, path: str | Path, values: Sequence[float] | None = None, label: str = "",
    title: str = "",
) -> Path:
    """The first two principal components of embeddings, coloured by ``values`` (a property); PNG."""
    from mmmat.web.figures import pca_2d

    plt = _plt()
    xy = pca_2d(np.asarray(vectors))
    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    c = None if values is None else np.asarray(values, float)
    sc = ax.scatter(xy[:, 0], xy[:, 1], s=6, c=c, cmap="viridis", linewidths=0)
    if c is not None:
        u = unit_of(label)
        fig.colorbar(sc, ax=ax, label=label + (f" ({u})" if u else ""))
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title or f"{len(xy)} embeddings", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def pattern_overlay_plot(
    two_theta: np.ndarray, intensity: np.ndarray, wavelength: float, structure: Any, path: str | Path,
    label: str = "", source: str = "measured",
) -> Path:
    """A measured pattern (normalised) over a crystal's computed one at the same wavelength (Å); PNG."""
    from mmmat.web.figures import computed_profile

    plt = _plt()
    tt = np.asarray(two_theta, float)
    y = np.asarray(intensity, float)
    y = (y - y.min()) / ((y.max() - y.min()) or 1.0)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
    ax.plot(tt, y, "k-", lw=0.8, label=source)
    ax.plot(tt, computed_profile(structure, tt, wavelength), "-", color="crimson", lw=0.8,
            label=f"computed {label}".strip())
    ax.set_xlabel(f"2θ (degrees, λ = {wavelength:.5f} Å)")
    ax.set_ylabel("intensity (normalised)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
