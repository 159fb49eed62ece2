"""Simulated microscopy images: a fast Z-contrast (HAADF-like) projection of a crystal.

No real micrographs exist for the materials of this project: every image made here is *simulated* and its
metadata says so (``{"kind": "simulated_zcontrast", "simulated": True, ...}``). The model is the incoherent
column approximation: the crystal is projected along a zone axis [uvw] (a lattice direction), every atom
column becomes a Gaussian blob of width ``sigma`` Å, weighted by Z**exponent per atom in the column (per
repeat length along the axis), and the image is scaled so that its maximum is 255. There is no noise,
probe, thickness or channelling effect; for those a multislice simulation (e.g. abTEM) is needed.

Frame: the view is down the zone axis; the image x axis (columns, left to right) runs along the projection
of the first lattice vector (a, then b, then c) that is not parallel to the axis, the y axis (rows, bottom
to top) completes a right-handed frame with the viewing direction, and the field of view (``size`` ×
``pixel_size`` Å) is centred on the cell origin. Because the frame is fixed by the lattice, rotating the
whole crystal in 3-D leaves the image unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mmmat.data.schema import MAX_Z, MaterialRecord, RecordError

#: Image metadata ``kind`` of these images.
IMAGE_KIND = "simulated_zcontrast"

#: Blobs are cut off this many ``sigma`` from their centre.
_CUTOFF_SIGMAS = 5.0


def _zone_axis(zone_axis: Any) -> tuple[int, int, int]:
    try:
        uvw = [float(x) for x in zone_axis]
    except (TypeError, ValueError):
        raise ValueError(f"zone_axis must be three integers, got {zone_axis!r}") from None
    if len(uvw) != 3 or any(not math.isfinite(x) or x != round(x) for x in uvw):
        raise ValueError(f"zone_axis must be three integers, got {zone_axis!r}")
    u, v, w = (int(round(x)) for x in uvw)
    if u == v == w == 0:
        raise ValueError("zone_axis [000] is not a direction")
    return u, v, w


def plane_lattice_vectors(zone_axis: tuple[int, int, int]) -> np.ndarray:
    """Two integer lattice vectors that, with the primitive [uvw], form a unimodular basis.

    Their projections along [uvw] generate the 2-D lattice of atom columns (every lattice translation
    projects onto an integer combination of them). Found with the Euclidean algorithm on the coefficients.

    Args:
        zone_axis: Integer direction [uvw], not all zero.

    Returns:
        (2, 3) integer array.

    """
    g = math.gcd(math.gcd(abs(zone_axis[0]), abs(zone_axis[1])), abs(zone_axis[2]))
    c = [x // g for x in zone_axis]
    m = np.eye(3, dtype=np.int64)  # row k: generator k in lattice coordinates
    # invariant: sum_k c[k] * m[k] == uvw / g
    while sum(1 for x in c if x != 0) > 1:
        nz = [k for k in range(3) if c[k] != 0]
        j = min(nz, key=lambda k: abs(c[k]))
        i = max((k for k in nz if k != j), key=lambda k: abs(c[k]))
        q = c[i] // c[j]
        m[j] += q * m[i]
        c[i] -= q * c[j]
    k = next(k for k in range(3) if c[k] != 0)
    return np.delete(m, k, axis=0)


def _reduce_2d(b: np.ndarray) -> np.ndarray:
    """Lagrange-Gauss reduction of a 2-D lattice basis (rows)."""
    u, v = b[0].copy(), b[1].copy()
    if u @ u > v @ v:
        u, v = v, u
    for _ in range(100):
        mu = round(float(u @ v) / float(u @ u))
        v = v - mu * u
        if v @ v >= u @ u:
            break
        u, v = v, u
    return np.stack([u, v])


def _projection_frame(lattice: np.ndarray, zone_axis: tuple[int, int, int]) -> np.ndarray:
    """Orthonormal rows (e1, e2, n): n along the zone axis, e1 along the first lattice vector not parallel."""
    d = np.asarray(zone_axis, dtype=np.float64) @ lattice
    n = d / np.linalg.norm(d)
    for vec in lattice:
        perp = vec - (vec @ n) * n
        if np.linalg.norm(perp) > 1e-6 * max(np.linalg.norm(vec), 1e-12):
            e1 = perp / np.linalg.norm(perp)
            break
    else:  # pragma: no cover - impossible for a non-degenerate lattice
        raise ValueError("degenerate lattice")
    e2 = np.cross(n, e1)
    return np.stack([e1, e2, n])


def simulate_zcontrast(
    lattice: np.ndarray,
    frac_coords: np.ndarray,
    numbers: np.ndarray,
    size: int = 64,
    pixel_size: float = 0.25,
    zone_axis: tuple[int, int, int] = (0, 0, 1),
    sigma: float = 0.45,
    exponent: float = 1.7,
    record_id: str = "?",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Simulate a Z-contrast (HAADF-like) image of a crystal viewed down a zone axis.

    The crystal is projected along [uvw]; the projected cell is tiled over the whole field of view
    (``size × pixel_size`` Å square, centred on the cell origin) using the 2-D lattice of projected
    translations, and every atom adds a Gaussian of width ``sigma`` Å weighted by Z**exponent.

    Args:
        lattice: (3, 3) lattice vectors as rows, Å.
        frac_coords: (N, 3) fractional coordinates.
        numbers: (N,) atomic numbers.
        size: Image side, pixels.
        pixel_size: Pixel side, Å.
        zone_axis: Viewing direction [uvw] in lattice coordinates (integers); default the c axis.
        sigma: Gaussian width (standard deviation) of one column, Å.
        exponent: Z-contrast exponent (intensity per atom ∝ Z**exponent).
        record_id: Names the record in errors.

    Returns:
        The (size, size) uint8 image, maximum 255, and its metadata (``kind``, ``simulated``,
        ``zone_axis``, ``pixel_size_A``, ``size``, ``sigma_A``, ``z_exponent``).

    Raises:
        RecordError: Empty, non-finite or degenerate crystal, or unknown elements.
        ValueError: Bad parameters (size, pixel size, sigma, zone axis).

    """
    uvw = _zone_axis(zone_axis)
    size = int(size)
    if size < 1 or not (pixel_size > 0 and sigma > 0 and math.isfinite(exponent)):
        raise ValueError(f"bad image parameters: size={size}, pixel_size={pixel_size}, sigma={sigma}")
    lattice = np.asarray(lattice, dtype=np.float64).reshape(3, 3)
    frac = np.asarray(frac_coords, dtype=np.float64).reshape(-1, 3)
    z = np.asarray(numbers).reshape(-1)
    if frac.shape[0] == 0 or frac.shape[0] != z.shape[0]:
        raise RecordError(record_id, f"{frac.shape[0]} positions but {z.shape[0]} atomic numbers")
    if not (np.isfinite(lattice).all() and np.isfinite(frac).all()):
        raise RecordError(record_id, "non-finite lattice or coordinates")
    if abs(np.linalg.det(lattice)) < 1e-6:
        raise RecordError(record_id, "degenerate cell (zero volume)")
    if np.any(z < 1) or np.any(z > MAX_Z):
        raise RecordError(record_id, "unknown element (atomic number out of 1..118)")

    frame = _projection_frame(lattice, uvw)
    proj = frame[:2].T  # (3, 2): Cartesian -> in-plane (x, y), Å
    atoms_xy = (frac @ lattice) @ proj  # (N, 2)
    basis = _reduce_2d((plane_lattice_vectors(uvw) @ lattice) @ proj)  # (2, 2) rows
    inv = np.linalg.inv(basis)
    # wrap atoms into the 2-D cell, then tile the cell over the field of view plus the blob cut-off
    f2 = atoms_xy @ inv
    f2 -= np.floor(f2)
    # atoms on the same column (to 1e-4 of the 2-D cell) merge into one column of summed weight
    weight_atom = np.abs(z).astype(np.float64) ** exponent
    cells = np.round(f2 * 1e4).astype(np.int64) % 10000
    _, first, inverse = np.unique(cells, axis=0, return_index=True, return_inverse=True)
    if len(first) < len(f2):
        summed = np.bincount(inverse.reshape(-1), weights=weight_atom, minlength=len(first))
        f2, weight_atom = f2[first], summed
    half = 0.5 * size * pixel_size + _CUTOFF_SIGMAS * sigma
    corners = np.array([[-half, -half], [-half, half], [half, -half], [half, half]]) @ inv
    lo = np.floor(corners.min(axis=0)).astype(np.int64) - 1
    hi = np.ceil(corners.max(axis=0)).astype(np.int64) + 1
    ii, jj = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
    shifts = np.stack([ii.ravel(), jj.ravel()], axis=1).astype(np.float64)  # (T, 2)
    pos = ((f2[None, :, :] + shifts[:, None, :]) @ basis).reshape(-1, 2)  # (T*N, 2)
    weights = np.tile(weight_atom, shifts.shape[0])
    inside = (np.abs(pos[:, 0]) <= half) & (np.abs(pos[:, 1]) <= half)
    pos, weights = pos[inside], weights[inside]

    # separable Gaussians: image[r, c] = sum_k w_k gy_k(r) gx_k(c)
    coords = (np.arange(size) - (size - 1) / 2.0) * pixel_size  # pixel centres, Å
    gx = np.exp(-0.5 * ((coords[None, :] - pos[:, 0:1]) / sigma) ** 2)  # (M, size) over columns
    gy = np.exp(-0.5 * ((coords[::-1][None, :] - pos[:, 1:2]) / sigma) ** 2)  # rows: y decreases downward
    # einsum's own loops, not BLAS: threaded BLAS on small matrices is slow on busy machines
    image = np.einsum("mr,mc->rc", gy * weights[:, None], gx, optimize=False)
    peak = float(image.max()) if image.size else 0.0
    if peak > 0:
        out = np.clip(np.rint(image * (255.0 / peak)), 0, 255).astype(np.uint8)
    else:  # no column within reach of the field of view (cannot happen for a periodic crystal)
        out = np.zeros((size, size), dtype=np.uint8)
    meta = {
        "kind": IMAGE_KIND,
        "simulated": True,
        "zone_axis": [int(x) for x in uvw],
        "pixel_size_A": float(pixel_size),
        "size": size,
        "sigma_A": float(sigma),
        "z_exponent": float(exponent),
    }
    return out, meta


def simulate_image(record: MaterialRecord, **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Simulate the Z-contrast image of a record (keyword arguments as :func:`simulate_zcontrast`)."""
    kw.setdefault("record_id", record.material_id)
    return simulate_zcontrast(record.lattice, record.frac_coords, record.numbers, **kw)
