"""Structure and composition fingerprints for the coverage metrics (COV-R / COV-P) of generated crystals.

Both follow the fingerprints CDVAE's evaluation uses (Xie et al., ICLR 2022), rebuilt on pymatgen alone:

- structure: the CrystalNN site fingerprint of the ``"ops"`` kind (matminer's ``CrystalNNFingerprint``
  preset ``"ops"``), averaged over the sites of the cell. For every coordination number CN = 1..24 it holds
  the CrystalNN weight of that CN; for CN 1..8 and 12 the weight is followed by the weight times each local
  structure order parameter of that CN's target motifs (pymatgen ``LocalStructOrderParams`` with the
  parameters of ``pymatgen.core.local_env.CN_OPT_PARAMS``), and for CN 9..12 by ``q2``, ``q4``, ``q6``.
  61 numbers per site, dimensionless.
- composition: Magpie element-property statistics (matminer's ``ElementProperty`` preset ``"magpie"``): for
  each of the 22 properties of :mod:`mmmat.evaluation.generation_magpie`, the minimum, maximum, range,
  fraction-weighted mean, fraction-weighted mean absolute deviation and the value of the most abundant
  element (lowest value on ties). 132 numbers. A property missing from the table is replaced by its mean
  over the elements Z = 1..103.
"""

from __future__ import annotations

import multiprocessing as mp
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from mmmat.evaluation.generation_magpie import MAGPIE_PROPERTIES, MAGPIE_TABLE

#: Target motifs per coordination number, in fingerprint order (after the CN weight).
CN_MOTIFS: dict[int, tuple[str, ...]] = {
    1: ("sgl_bd",),
    2: ("L-shaped", "water-like", "bent 120 degrees", "bent 150 degrees", "linear"),
    3: ("trigonal planar", "trigonal non-coplanar", "T-shaped"),
    4: ("square co-planar", "tetrahedral", "rectangular see-saw-like", "see-saw-like", "trigonal pyramidal"),
    5: ("pentagonal planar", "square pyramidal", "trigonal bipyramidal"),
    6: ("hexagonal planar", "octahedral", "pentagonal pyramidal"),
    7: ("hexagonal pyramidal", "pentagonal bipyramidal"),
    8: ("body-centered cubic", "hexagonal bipyramidal"),
    9: ("q2", "q4", "q6"),
    10: ("q2", "q4", "q6"),
    11: ("q2", "q4", "q6"),
    12: ("cuboctahedral", "q2", "q4", "q6"),
}
#: Largest coordination number that gets a weight entry.
MAX_CN = 24
#: Length of the structure fingerprint.
STRUCT_FP_DIM = MAX_CN + sum(len(v) for v in CN_MOTIFS.values())
#: Statistics of the composition fingerprint, per property, in order.
COMP_STATS = ("minimum", "maximum", "range", "mean", "avg_dev", "mode")
#: Length of the composition fingerprint.
COMP_FP_DIM = len(MAGPIE_PROPERTIES) * len(COMP_STATS)


@lru_cache(maxsize=1)
def _order_params() -> dict[int, list]:
    """One ``LocalStructOrderParams`` per (CN, motif), built once per process."""
    from pymatgen.analysis.local_env import LocalStructOrderParams

    try:
        from pymatgen.core.local_env import CN_OPT_PARAMS
    except ImportError:  # older pymatgen
        from pymatgen.analysis.local_env import CN_OPT_PARAMS

    ops: dict[int, list] = {}
    for cn, motifs in CN_MOTIFS.items():
        ops[cn] = []
        for motif in motifs:
            op_type, params = motif, None
            spec = CN_OPT_PARAMS.get(cn, {}).get(motif)
            if spec:
                op_type = spec[0]
                params = spec[1] if len(spec) > 1 else None
            ops[cn].append(LocalStructOrderParams([op_type], parameters=[params]))
    return ops


@lru_cache(maxsize=1)
def _crystal_nn():
    from pymatgen.analysis.local_env import CrystalNN

    return CrystalNN()


def site_fingerprint(structure, index: int) -> np.ndarray:
    """The 61-number CrystalNN ``"ops"`` fingerprint of one site (dimensionless)."""
    nn = _crystal_nn().get_nn_data(structure, index)
    ops = _order_params()
    out: list[float] = []
    for cn in range(1, MAX_CN + 1):
        wt = float(nn.cn_weights.get(cn, 0.0))
        out.append(wt)
        if cn not in ops:
            continue
        if wt == 0.0:
            out.extend([0.0] * len(ops[cn]))
            continue
        neighbours = [d["site"] for d in nn.cn_nninfo[cn]]
        sites = [structure[index], *neighbours]
        for op in ops[cn]:
            val = op.get_order_parameters(sites, 0, indices_neighs=list(range(1, len(sites))))[0]
            out.append(wt * float(val or 0.0))
    return np.asarray(out, dtype=np.float64)


def structure_fingerprint(structure) -> np.ndarray:
    """Mean over sites of :func:`site_fingerprint`: shape ``(61,)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fps = [site_fingerprint(structure, i) for i in range(len(structure))]
    return np.mean(fps, axis=0)


@lru_cache(maxsize=1)
def _magpie_array() -> np.ndarray:
    """(104, 22) table indexed by Z with missing values imputed by the property mean."""
    arr = np.full((104, len(MAGPIE_PROPERTIES)), np.nan)
    for z, row in MAGPIE_TABLE.items():
        arr[z] = row
    means = np.nanmean(arr[1:], axis=0)
    rows, cols = np.where(np.isnan(arr))
    arr[rows, cols] = means[cols]
    return arr


def composition_fingerprint(composition) -> np.ndarray:
    """Magpie statistics of a pymatgen ``Composition`` (or formula string): shape ``(132,)``."""
    from pymatgen.core import Composition

    comp = Composition(composition) if isinstance(composition, str) else composition
    items = list(comp.element_composition.items())
    z = np.array([el.Z for el, _ in items])
    if z.max() >= 104:
        raise ValueError(f"composition {comp.formula}: no Magpie data beyond Z = 103")
    w = np.array([float(a) for _, a in items])
    w = w / w.sum()
    vals = _magpie_array()[z]  # (n_el, 22)
    mean = w @ vals
    avg_dev = w @ np.abs(vals - mean)
    top = np.isclose(w, w.max())
    mode = vals[top].min(axis=0)
    stats = np.stack([vals.min(0), vals.max(0), vals.max(0) - vals.min(0), mean, avg_dev, mode], axis=1)
    return stats.reshape(-1)


def _fp_one(structure) -> tuple[np.ndarray, np.ndarray]:
    try:
        comp = composition_fingerprint(structure.composition)
    except Exception:
        comp = np.full(COMP_FP_DIM, np.nan)
    try:
        struct = structure_fingerprint(structure)
    except Exception:
        struct = np.full(STRUCT_FP_DIM, np.nan)
    return struct, comp


def fingerprints(structures: Sequence, workers: int = 1, chunksize: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Structure and composition fingerprints of many crystals.

    Args:
        structures: pymatgen ``Structure`` objects.
        workers: Processes (``1`` = in this process).
        chunksize: Structures per task handed to a worker.

    Returns:
        ``(struct_fps (N, 61), comp_fps (N, 132))``; a row of NaN marks a crystal whose fingerprint failed
        (CDVAE counts such a crystal as invalid for coverage).

    """
    if not structures:
        return np.zeros((0, STRUCT_FP_DIM)), np.zeros((0, COMP_FP_DIM))
    from mmmat.progress import report

    n = len(structures)
    out = []
    if workers > 1 and n > chunksize:
        ctx = mp.get_context("fork")
        with ctx.Pool(workers) as pool:
            for o in pool.imap(_fp_one, structures, chunksize=chunksize):
                out.append(o)
                if len(out) % chunksize == 0 or len(out) == n:
                    report("fingerprints", len(out), n)
    else:
        for s in structures:
            out.append(_fp_one(s))
            report("fingerprints", len(out), n)
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


def cached_fingerprints(
    structures: Sequence, ids: Sequence[str], cache: str | Path | None, workers: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fingerprints` read from / written to an ``.npz`` cache keyed by ``ids``.

    The cache is reused only when it holds exactly the same ids in the same order; otherwise it is rebuilt.
    """
    ids = [str(i) for i in ids]
    if cache is not None and Path(cache).exists():
        with np.load(cache, allow_pickle=False) as z:
            if list(z["ids"]) == ids and z["struct"].shape[1] == STRUCT_FP_DIM:
                return z["struct"], z["comp"]
    s, c = fingerprints(structures, workers=workers)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, ids=np.asarray(ids), struct=s, comp=c)
    return s, c


def standardise(comp_fps: np.ndarray, means: np.ndarray, stds: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` per column; a zero std counts as 1 and NaN becomes 0 (as CDVAE's scaler does)."""
    stds = np.where(np.asarray(stds) > 0, stds, 1.0)
    out = (np.asarray(comp_fps, dtype=np.float64) - means) / stds
    return np.nan_to_num(out, nan=0.0)


def scaler_from(comp_fps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations of composition fingerprints (NaN rows ignored)."""
    comp_fps = np.asarray(comp_fps, dtype=np.float64)
    ok = ~np.isnan(comp_fps).any(axis=1)
    if not ok.any():
        return np.zeros(comp_fps.shape[1]), np.ones(comp_fps.shape[1])
    return comp_fps[ok].mean(axis=0), comp_fps[ok].std(axis=0)


__all__ = [
    "CN_MOTIFS",
    "COMP_FP_DIM",
    "STRUCT_FP_DIM",
    "cached_fingerprints",
    "composition_fingerprint",
    "fingerprints",
    "scaler_from",
    "site_fingerprint",
    "standardise",
    "structure_fingerprint",
]
