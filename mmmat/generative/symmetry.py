"""Sampling constrained to a space group: random crystals on Wyckoff positions and projection onto the group.

A crystal of a given composition and space group (1-230) is drawn with pyxtal (``pyxtal.from_random``: a random
lattice of the group's crystal system and a random choice of Wyckoff positions whose multiplicities add up to
the composition's atom counts, in the conventional cell).  The flow can then refine it from an intermediate time;
the refined crystal is projected back onto the group: its metric tensor is averaged over the point group
(G' = mean over ops of Wᵀ G W, W the rotation in fractional coordinates) and every atom is moved to the mean of
its symmetry images (each op maps atom i onto atom p(i); x_i' = mean over ops of W⁻¹(x_p(i) - t)), so the
result has every operation of the group, checked with spglib.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class SymmetryError(ValueError):
    """A space group that cannot host the composition, or a symmetry that could not be imposed."""


def space_group_number(structure: Any, symprec: float = 0.01) -> int | None:
    """The spglib space-group number of a pymatgen structure (None when spglib finds none)."""
    import spglib

    cell = (np.asarray(structure.lattice.matrix), np.asarray(structure.frac_coords), list(structure.atomic_numbers))
    ds = spglib.get_symmetry_dataset(cell, symprec=symprec)
    return None if ds is None else int(ds.number)


def random_symmetric(counts: Mapping[str, int], space_group: int, seed: int = 0, factor: float = 1.1,
                     tries: int = 10) -> Any:
    """A random crystal of ``counts`` (element -> atoms in the conventional cell) in ``space_group``.

    Raises :class:`SymmetryError` when no combination of the group's Wyckoff positions holds the counts.
    """
    from pyxtal import pyxtal

    if not 1 <= int(space_group) <= 230:
        raise SymmetryError(f"space group {space_group} is not a number from 1 to 230")
    species = sorted(counts)
    num = [int(counts[e]) for e in species]
    rng = np.random.default_rng(seed)
    last = None
    for _ in range(tries):
        c = pyxtal()
        try:
            c.from_random(3, int(space_group), species, num, factor=factor,
                          random_state=int(rng.integers(2**31 - 1)))
        except Exception as exc:  # noqa: BLE001 - pyxtal raises several types for an impossible request
            last = exc
            if "compatible" in str(exc).lower():
                break
            continue
        if c.valid:
            return c.to_pymatgen()
    raise SymmetryError(
        f"space group {space_group} cannot hold {dict(zip(species, num))} in its conventional cell"
        + (f" ({last})" if last else "")
    )


def operations_with_permutations(structure: Any, symprec: float = 1e-3) -> list[tuple[np.ndarray, np.ndarray,
                                                                                        np.ndarray]]:
    """Symmetry operations (W, t) of a structure, each with the atom permutation it induces."""
    import spglib

    frac = np.asarray(structure.frac_coords) % 1.0
    z = np.asarray(structure.atomic_numbers)
    sym = spglib.get_symmetry((np.asarray(structure.lattice.matrix), frac, z.tolist()), symprec=symprec)
    if sym is None:
        raise SymmetryError("spglib found no symmetry operations")
    out = []
    for w, t in zip(sym["rotations"], sym["translations"]):
        img = frac @ w.T + t
        d = img[:, None, :] - frac[None, :, :]
        d -= np.round(d)
        dist = np.linalg.norm(d, axis=-1)
        dist[z[:, None] != z[None, :]] = np.inf
        perm = dist.argmin(1)
        if np.sort(perm).tolist() != list(range(len(z))):
            raise SymmetryError("an operation does not permute the atoms")
        out.append((w.astype(float), t.astype(float), perm))
    return out


def project(structure: Any, ops: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Any:
    """``structure`` (same atom order and cell setting as the one ``ops`` came from) made symmetric under ``ops``."""
    from pymatgen.core import Lattice, Structure

    g = structure.lattice.metric_tensor
    gp = np.mean([w.T @ g @ w for w, _, _ in ops], axis=0)
    a, b, c = np.sqrt(np.diag(gp))
    ang = np.degrees(np.arccos(np.clip([gp[1, 2] / (b * c), gp[0, 2] / (a * c), gp[0, 1] / (a * b)], -1, 1)))
    frac = np.asarray(structure.frac_coords)
    acc = np.zeros_like(frac)
    for w, t, perm in ops:
        back = (frac[perm] - t) @ np.linalg.inv(w).T
        acc += frac + (back - frac - np.round(back - frac))
    new = (acc / len(ops)) % 1.0
    return Structure(Lattice.from_parameters(a, b, c, *ang), structure.species, new)
