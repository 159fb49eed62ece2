"""Staged evaluation of generated crystals and crystal-structure-prediction (CSP) matching.

Stages (each runs on the survivors of the one before; see :func:`evaluate_generated`):

- ``validity`` (filters): structural validity (every interatomic distance, periodic images included, at least
  0.5 Å; cell volume at least 0.1 Å³) and compositional validity as CDVAE defines it (SMACT charge neutrality
  with the Pauling electronegativity test over SMACT's original oxidation-state list,
  ``oxidation_states_smact14``; single-element and all-metal compositions count as valid).
- ``uniqueness`` (filters): a sample survives when no earlier surviving sample matches it.
- ``novelty`` (filters): a sample survives when no reference structure matches it.
- ``coverage`` (reports): COV-R / COV-P with CDVAE's fingerprints (CrystalNN ``"ops"`` site fingerprints
  averaged over sites; Magpie composition statistics, standardised) and cutoffs (MP-20: 0.4 and 10). As in
  CDVAE, every sample is fingerprinted whatever the stages before it dropped (:data:`COVERAGE_CONVENTION`).
- ``distribution`` (reports): 1-D Wasserstein distances of density (g/cm³), number of elements and any
  property arrays passed in.
- ``stability`` (filters at ``stable_threshold``): CHGNet relaxation and energy, energy above a CHGNet hull of
  reference structures; rates at e_hull ≤ 0 and ≤ 0.1 eV/atom and the S.U.N. rate.

Matching uses pymatgen's ``StructureMatcher`` with the field's default tolerances for uniqueness and novelty
(ltol 0.2, stol 0.3, angle_tol 5°, primitive cells, volumes scaled) after grouping by reduced formula (two
crystals of different reduced formula never match), and CDVAE/DiffCSP's looser ones for CSP (stol 0.5,
angle_tol 10°, ltol 0.3). The CSP RMSE is ``StructureMatcher.get_rms_dist``'s: the root-mean-square distance
of matched sites after the lattices are scaled to the same volume, divided by ``(V / n_sites) ** (1/3)``
(dimensionless).
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import time
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from mmmat.evaluation.generation_fingerprints import (
    cached_fingerprints,
    fingerprints,
    scaler_from,
    standardise,
)
from mmmat.evaluation.generation_stability import HullReference, reference_hull, resolve_device, stability
from mmmat.progress import note

#: StructureMatcher tolerances for uniqueness and novelty (pymatgen's defaults, as in the field).
MATCH_TOLERANCES: dict[str, float] = {"ltol": 0.2, "stol": 0.3, "angle_tol": 5.0}
#: StructureMatcher tolerances for CSP matching (CDVAE / DiffCSP).
CSP_TOLERANCES: dict[str, float] = {"ltol": 0.3, "stol": 0.5, "angle_tol": 10.0}
#: CDVAE's coverage cutoffs (structure fingerprint distance, standardised composition fingerprint distance).
COV_CUTOFFS: dict[str, tuple[float, float]] = {"mp20": (0.4, 10.0), "carbon": (0.2, 4.0), "perov": (0.2, 4.0)}
#: How coverage is computed (stated in every report).
COVERAGE_CONVENTION = (
    "CDVAE: every generated sample is fingerprinted, invalid ones included (a failed fingerprint or an unreadable "
    "sample counts as not covered); COV-P divides by all generated samples; COV-R is over the reference"
)
#: Stages in their default order.
DEFAULT_STAGES: tuple[str, ...] = (
    "validity",
    "coverage",
    "distribution",
    "uniqueness",
    "novelty",
    "stability",
)
#: Stages that drop samples (the others only report).
FILTER_STAGES = frozenset({"validity", "uniqueness", "novelty", "stability"})
#: Slack (eV/atom) under which an energy above hull counts as "on the hull" (e_hull ≤ 0).
ON_HULL_TOL = 1e-6
#: Smallest interatomic distance (Å) and cell volume (Å³) of a structurally valid crystal (CDVAE).
MIN_DISTANCE = 0.5
MIN_VOLUME = 0.1


# --------------------------------------------------------------------------------------------- helpers
def _as_structure(x: Any):
    """A pymatgen ``Structure`` from a Structure, a :class:`~mmmat.data.schema.MaterialRecord` or None."""
    from pymatgen.core import IStructure

    if x is None or isinstance(x, IStructure):
        return x
    if hasattr(x, "to_structure"):
        return x.to_structure()
    raise TypeError(f"expected a pymatgen Structure or a record, got {type(x).__name__}")


def _pmap(fn: Callable, items: Sequence, workers: int, chunksize: int = 4) -> list:
    """``[fn(x) for x in items]``, over a fork pool when ``workers > 1``."""
    if workers > 1 and len(items) > chunksize:
        with mp.get_context("fork").Pool(workers) as pool:
            return pool.map(fn, items, chunksize=chunksize)
    return [fn(x) for x in items]


def _matcher(**tol: float):
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(**tol)


def _formula(s) -> str:
    return s.composition.reduced_formula


# --------------------------------------------------------------------------------------------- validity
def structural_validity(structure, cutoff: float = MIN_DISTANCE, min_volume: float = MIN_VOLUME) -> bool:
    """True when all distances (with periodic images) are ≥ ``cutoff`` Å and the volume ≥ ``min_volume`` Å³.

    The distance between an atom and its own periodic images (the shortest lattice vector) counts too; a
    structure with non-finite lattice or coordinates is invalid.
    """
    s = _as_structure(structure)
    if s is None or len(s) == 0:
        return False
    lat = np.asarray(s.lattice.matrix)
    if not (np.isfinite(lat).all() and np.isfinite(s.frac_coords).all()):
        return False
    try:
        if not s.volume >= min_volume:
            return False
        if min(s.lattice.get_lll_reduced_lattice().abc) < cutoff:
            return False
        if len(s) > 1:
            dm = np.array(s.distance_matrix, dtype=np.float64)
            np.fill_diagonal(dm, np.inf)
            if dm.min() < cutoff:
                return False
    except Exception:  # noqa: BLE001 - a degenerate lattice is an invalid structure
        return False
    return True


#: Compositions with more distinct elements than this count as compositionally invalid (see
#: :func:`compositional_validity`).
MAX_SMACT_ELEMENTS = 8


@lru_cache(maxsize=65536)
def _smact_valid(
    symbols: tuple[str, ...], counts: tuple[int, ...], use_pauling_test: bool, include_alloys: bool
) -> bool:
    import smact

    if len(set(symbols)) == 1:
        return True
    if include_alloys and all(sym in smact.metals for sym in symbols):
        return True
    if len(set(symbols)) > MAX_SMACT_ELEMENTS:
        return False
    try:
        space = smact.element_dictionary(symbols)
    except Exception:  # noqa: BLE001 - an element SMACT does not know cannot be charge balanced
        return False
    elems = [space[sym] for sym in symbols]
    enegs = [e.pauling_eneg for e in elems]
    ox_lists = [list(e.oxidation_states_smact14 or []) for e in elems]
    for ox in itertools.product(*ox_lists):
        if sum(o * c for o, c in zip(ox, counts)) != 0:
            continue
        if not use_pauling_test or _pauling_ok(ox, enegs):
            return True
    return False


def _pauling_ok(ox: Sequence[int], enegs: Sequence[float | None]) -> bool:
    """Every cation less electronegative than every anion; a missing electronegativity passes (CDVAE)."""
    for (o1, e1), (o2, e2) in itertools.combinations(zip(ox, enegs), 2):
        if (o1 > 0 and o2 < 0) or (o1 < 0 and o2 > 0):
            if e1 is None or e2 is None:
                return True
            cation, anion = (e1, e2) if o1 > 0 else (e2, e1)
            if cation >= anion:
                return False
    return True


def compositional_validity(composition, use_pauling_test: bool = True, include_alloys: bool = True) -> bool:
    """CDVAE's SMACT validity of a composition (or structure, or formula string).

    Charge neutral for at least one assignment of SMACT's original oxidation states
    (``oxidation_states_smact14``) to the elements of the reduced composition, with cations less
    electronegative (Pauling) than anions; single-element compositions and, with ``include_alloys``,
    compositions made only of SMACT metals are valid.  A composition of more than
    :data:`MAX_SMACT_ELEMENTS` elements (not all metals) is invalid without enumeration: the search over
    oxidation states grows exponentially with the element count, and no MP-20 material has more than 6.
    """
    from pymatgen.core import Composition

    if hasattr(composition, "composition"):
        composition = composition.composition
    comp = Composition(composition) if isinstance(composition, str) else composition
    amounts = comp.get_el_amt_dict()
    if not amounts:
        return False
    if any(abs(a - round(a)) > 1e-6 for a in amounts.values()):
        return False
    syms = sorted(amounts)
    counts = np.array([int(round(amounts[s])) for s in syms])
    counts = counts // np.gcd.reduce(counts)
    return _smact_valid(tuple(syms), tuple(int(c) for c in counts), use_pauling_test, include_alloys)


def validity(structures: Sequence) -> dict[str, np.ndarray]:
    """Per-sample ``struct_valid``, ``comp_valid`` and ``valid`` (both) boolean arrays."""
    ss = [_as_structure(s) for s in structures]
    sv = np.array([structural_validity(s) for s in ss], dtype=bool)
    cv = np.array([s is not None and len(s) > 0 and compositional_validity(s) for s in ss], dtype=bool)
    return {"struct_valid": sv, "comp_valid": cv, "valid": sv & cv}


# --------------------------------------------------------------------------------------------- matching
def _fits(matcher, a, b) -> bool:
    try:
        return bool(matcher.fit(a, b))
    except Exception:  # noqa: BLE001 - a structure the matcher cannot process matches nothing
        return False


def _unique_in_group(args) -> list[bool]:
    group, tol = args
    matcher = _matcher(**tol)
    reps: list = []
    out = []
    for s in group:
        dup = any(_fits(matcher, r, s) for r in reps)
        if not dup:
            reps.append(s)
        out.append(not dup)
    return out


def unique_mask(
    structures: Sequence, tolerances: Mapping[str, float] | None = None, workers: int = 1
) -> np.ndarray:
    """True for the first sample of each set of matching samples (grouped by reduced formula first)."""
    tol = dict(MATCH_TOLERANCES if tolerances is None else tolerances)
    ss = [_as_structure(s) for s in structures]
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(ss):
        groups.setdefault(_formula(s), []).append(i)
    keys = list(groups)
    res = _pmap(_unique_in_group, [([ss[i] for i in groups[k]], tol) for k in keys], workers, chunksize=1)
    mask = np.zeros(len(ss), dtype=bool)
    for k, flags in zip(keys, res):
        mask[groups[k]] = flags
    return mask


class ReferenceSet:
    """Reference crystals (for novelty, coverage and distributions) with cached fingerprints.

    Args:
        structures: pymatgen ``Structure`` objects (or records with ``to_structure()``).
        ids: One id per structure (default: the index as text).
        properties: Optional per-structure property arrays, by name.

    """

    def __init__(
        self,
        structures: Sequence,
        ids: Sequence[str] | None = None,
        properties: Mapping[str, Sequence[float]] | None = None,
    ):
        self.structures = [_as_structure(s) for s in structures]
        self.ids = [str(i) for i in (ids if ids is not None else range(len(self.structures)))]
        if len(self.ids) != len(self.structures):
            raise ValueError("ids and structures differ in length")
        self.properties = {k: np.asarray(v, dtype=np.float64) for k, v in (properties or {}).items()}
        self._by_formula: dict[str, list[int]] | None = None
        self._fps: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_records(cls, records: Sequence, property_names: Sequence[str] = ()) -> ReferenceSet:
        """Build from :class:`~mmmat.data.schema.MaterialRecord` objects, keeping the named properties."""
        props = {n: [r.properties.get(n, math.nan) for r in records] for n in property_names}
        return cls([r.to_structure() for r in records], [r.material_id for r in records], props)

    def __len__(self) -> int:
        return len(self.structures)

    @property
    def by_formula(self) -> dict[str, list[int]]:
        """Indices of the reference structures by reduced formula."""
        if self._by_formula is None:
            d: dict[str, list[int]] = {}
            for i, s in enumerate(self.structures):
                d.setdefault(_formula(s), []).append(i)
            self._by_formula = d
        return self._by_formula

    def fingerprints(
        self, cache: str | Path | None = None, workers: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """Structure (N, 61) and composition (N, 132) fingerprints, computed once (cached to ``cache``)."""
        if self._fps is None:
            self._fps = cached_fingerprints(self.structures, self.ids, cache, workers=workers)
        return self._fps


def _as_reference(ref) -> ReferenceSet:
    return ref if isinstance(ref, ReferenceSet) else ReferenceSet(ref)


_NOVELTY_REF: list = []


def _novel_one(args) -> bool:
    s, cand_idx, tol = args
    matcher = _matcher(**tol)
    return not any(_fits(matcher, _NOVELTY_REF[j], s) for j in cand_idx)


def novel_mask(
    structures: Sequence, reference, tolerances: Mapping[str, float] | None = None, workers: int = 1
) -> np.ndarray:
    """True for samples that match no reference structure of the same reduced formula."""
    tol = dict(MATCH_TOLERANCES if tolerances is None else tolerances)
    ref = _as_reference(reference)
    ss = [_as_structure(s) for s in structures]
    _NOVELTY_REF[:] = ref.structures  # shared with forked workers without pickling
    try:
        jobs = [(s, ref.by_formula.get(_formula(s), []), tol) for s in ss]
        return np.array(_pmap(_novel_one, jobs, workers), dtype=bool)
    finally:
        _NOVELTY_REF.clear()


# --------------------------------------------------------------------------------------------- coverage
def coverage(
    gen_struct_fps: np.ndarray,
    gen_comp_fps: np.ndarray,
    ref_struct_fps: np.ndarray,
    ref_comp_fps: np.ndarray,
    struc_cutoff: float = 0.4,
    comp_cutoff: float = 10.0,
    comp_scaler: tuple[np.ndarray, np.ndarray] | None = None,
    num_generated: int | None = None,
) -> dict[str, float]:
    """CDVAE's COV-R / COV-P and mean minimum fingerprint distances.

    Composition fingerprints are standardised with ``comp_scaler`` (means, stds), by default those of the
    reference fingerprints. Generated samples whose fingerprint failed (NaN rows) are dropped but still count
    in the COV-P denominator ``num_generated`` (default: all generated rows), as in CDVAE. As in CDVAE, the
    nearest structure and nearest composition distances are taken separately (maybe from different samples).

    Returns:
        ``cov_recall`` (fraction of reference crystals within both cutoffs of some sample), ``cov_precision``
        (fraction of samples within both cutoffs of some reference crystal), ``amsd_*`` and ``amcd_*`` (mean
        minimum structure / composition distances), and ``n_fingerprint_failed``.

    """
    from scipy.spatial.distance import cdist

    gs, gc = np.asarray(gen_struct_fps, float), np.asarray(gen_comp_fps, float)
    rs, rc = np.asarray(ref_struct_fps, float), np.asarray(ref_comp_fps, float)
    n_gen = len(gs) if num_generated is None else int(num_generated)
    ok_g = np.isfinite(gs).all(1) & ~np.isnan(gc).all(1) if len(gs) else np.zeros(0, bool)
    ok_r = np.isfinite(rs).all(1) & ~np.isnan(rc).all(1) if len(rs) else np.zeros(0, bool)
    means, stds = comp_scaler if comp_scaler is not None else scaler_from(rc[ok_r])
    gs, gc, rs, rc = (
        gs[ok_g],
        standardise(gc[ok_g], means, stds),
        rs[ok_r],
        standardise(rc[ok_r], means, stds),
    )
    out = {"n_fingerprint_failed": int((~ok_g).sum()), "n_reference": int(ok_r.sum())}
    if len(gs) == 0 or len(rs) == 0:
        return {
            **out,
            "cov_recall": 0.0,
            "cov_precision": 0.0,
            "amsd_recall": math.nan,
            "amsd_precision": math.nan,
            "amcd_recall": math.nan,
            "amcd_precision": math.nan,
        }
    sd, cd = cdist(gs, rs), cdist(gc, rc)
    s_rec, s_prec = sd.min(0), sd.min(1)
    c_rec, c_prec = cd.min(0), cd.min(1)
    out.update(
        cov_recall=float(np.mean((s_rec <= struc_cutoff) & (c_rec <= comp_cutoff))),
        cov_precision=float(np.sum((s_prec <= struc_cutoff) & (c_prec <= comp_cutoff)) / max(n_gen, 1)),
        amsd_recall=float(s_rec.mean()),
        amsd_precision=float(s_prec.mean()),
        amcd_recall=float(c_rec.mean()),
        amcd_precision=float(c_prec.mean()),
    )
    return out


# --------------------------------------------------------------------------------------------- distributions
def distribution_distances(
    structures: Sequence,
    reference,
    properties: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> dict[str, float]:
    """1-D Wasserstein distances between samples and reference.

    Returns ``wdist_density`` (g/cm³), ``wdist_num_elems`` and ``wdist_<name>`` for each entry of
    ``properties`` (``name -> (sample values, reference values)``, NaN values dropped).
    """
    from scipy.stats import wasserstein_distance

    ss = [_as_structure(s) for s in structures]
    ref = _as_reference(reference)
    out: dict[str, float] = {}
    if ss and len(ref):
        out["wdist_density"] = float(
            wasserstein_distance([s.density for s in ss], [s.density for s in ref.structures])
        )
        out["wdist_num_elems"] = float(
            wasserstein_distance(
                [len(s.composition) for s in ss], [len(s.composition) for s in ref.structures]
            )
        )
    for name, (gen, refv) in (properties or {}).items():
        g = np.asarray(gen, float)
        r = np.asarray(refv, float)
        g, r = g[np.isfinite(g)], r[np.isfinite(r)]
        out[f"wdist_{name}"] = float(wasserstein_distance(g, r)) if len(g) and len(r) else math.nan
    return out


# --------------------------------------------------------------------------------------------- CSP
def _rms_one(args) -> float | None:
    pred, truth, tol, check = args
    if pred is None or truth is None:
        return None
    if check and not (
        structural_validity(pred) and compositional_validity(pred) and structural_validity(truth)
    ):
        return None
    try:
        r = _matcher(**tol).get_rms_dist(pred, truth)
    except Exception:  # noqa: BLE001 - a pair the matcher cannot process is not a match
        return None
    return None if r is None else float(r[0])


def csp_match_details(
    generated: Sequence,
    truth: Sequence,
    stol: float = 0.5,
    angle_tol: float = 10,
    ltol: float = 0.3,
    check_validity: bool = True,
    workers: int = 1,
) -> list[float | None]:
    """Normalised RMS distance of each (generated, true) pair, or None where they do not match.

    With ``check_validity`` a generated crystal that is structurally or compositionally invalid counts as
    unmatched (CDVAE's reconstruction evaluation; DiffCSP also requires the true crystal to be valid, which
    for CSP is the same composition check). ``None`` in ``generated`` (no prediction) is unmatched.
    """
    if len(generated) != len(truth):
        raise ValueError(f"{len(generated)} generated structures for {len(truth)} true ones")
    tol = {"stol": stol, "angle_tol": angle_tol, "ltol": ltol}
    jobs = [(_as_structure(g), _as_structure(t), tol, check_validity) for g, t in zip(generated, truth)]
    return _pmap(_rms_one, jobs, workers)


def csp_match(
    generated: Sequence,
    truth: Sequence,
    stol: float = 0.5,
    angle_tol: float = 10,
    ltol: float = 0.3,
    check_validity: bool = True,
    workers: int = 1,
) -> tuple[float, float]:
    """CSP match rate and mean normalised RMSE over the matches (NaN when nothing matches).

    See :func:`csp_match_details` for the arguments; the RMSE is pymatgen's ``get_rms_dist``, normalised by
    ``(V / n_sites) ** (1/3)``.
    """
    rms = csp_match_details(generated, truth, stol, angle_tol, ltol, check_validity, workers)
    hits = [r for r in rms if r is not None]
    rate = len(hits) / len(rms) if rms else 0.0
    return rate, float(np.mean(hits)) if hits else math.nan


# --------------------------------------------------------------------------------------------- staged run
def hull_relevant(reference: Sequence, samples: Sequence) -> list[int]:
    """Indices of the reference crystals whose elements all occur in some sample.

    Only those can lie on the hull under a sample's composition, so a hull built from them gives every sample
    the same energy above hull as one built from the whole reference.
    """
    systems = {frozenset(el.symbol for el in s.composition.elements) for s in samples if s is not None}
    out = []
    for i, r in enumerate(reference):
        els = frozenset(el.symbol for el in r.composition.elements)
        if any(els <= sys_ for sys_ in systems):
            out.append(i)
    return out


#: A sample that an MLIP puts deeper than this below the hull of every mp20p phase (eV/atom) is not counted as
#: stable: a new phase that far under a well-sampled hull is far likelier an MLIP artefact (a collapsed cell, an
#: unphysical energy basin) than a discovery. The design loop's ``guards.min_e_hull`` uses the same default.
FAR_BELOW_HULL = -0.2


def mlip_stable(e_hulls: Mapping[str, Any], threshold: float = 0.1,
                min_e_hull: float | None = FAR_BELOW_HULL) -> dict[str, np.ndarray]:
    """Stability flags per sample from each MLIP's energy above its hull (eV/atom, NaN where none).

    ``all``: within ``[min_e_hull, threshold]`` under every MLIP; ``one``: the same under the first MLIP alone;
    ``far``: deeper than ``min_e_hull`` under any MLIP (``far_<mlip>``: under that one); ``all_unguarded`` /
    ``one_unguarded``: without the lower bound (the convention of published S.U.N. rates). ``min_e_hull``
    None: no lower bound.
    """
    arrays = [np.asarray(v, dtype=np.float64) for v in e_hulls.values()]
    if not arrays:
        raise ValueError("mlip_stable needs the energies above hull of at least one MLIP")
    lo = -np.inf if min_e_hull is None else float(min_e_hull)
    upto = [np.isfinite(a) & (a <= threshold + ON_HULL_TOL) for a in arrays]
    deep = [np.isfinite(a) & (a < lo) for a in arrays]
    far = np.logical_or.reduce(deep)
    every = np.logical_and.reduce(upto)
    return {"all": every & ~far, "one": upto[0] & ~deep[0], "far": far, "all_unguarded": every,
            "one_unguarded": upto[0], **{f"far_{m}": d for m, d in zip(e_hulls, deep)}}


def _mlip_stability(structures, known, mlips, relax, steps, fmax, device, threads, cache, threshold=0.1):
    """Relax with each MLIP and place on that MLIP's hull of ``known``: metrics, per-MLIP arrays, hull time."""
    from mmmat.design.oracle import EnergyMethod, KnownPhases, MethodHull, MLIPMethod
    from mmmat.evaluation.generation_stability import torch_threads

    kp = KnownPhases(known.structures, known.ids)
    per: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    metrics: dict[str, Any] = {}
    ref_s = 0.0
    finals = list(structures)
    systems = sorted({tuple(sorted(el.symbol for el in s.composition.elements)) for s in structures})
    with torch_threads(threads):
        for k, spec in enumerate(mlips):
            meth = spec if isinstance(spec, EnergyMethod) else MLIPMethod(spec, device)
            m = meth.name
            note(f"stability: {len(structures)} {m} relaxations of at most {steps} FIRE steps, batched")
            t_relax = time.perf_counter()
            e, f = meth.relax(structures, steps, fmax) if relax else (meth.single_points(structures), structures)
            note(f"stability: {m} {'relaxations' if relax else 'single points'} took "
                 f"{time.perf_counter() - t_relax:.1f} s")
            if k == 0:
                finals = f
            tr = time.perf_counter()
            mh = MethodHull(meth, kp, cache, steps=steps, fmax=fmax)
            mh.ensure_many(systems)
            ref = mh.reference()
            ref_s += time.perf_counter() - tr
            eh = np.array([ref.e_above_hull(s.composition, v) for s, v in zip(f, e)], dtype=np.float64)
            per[m] = (e, eh)
            has = np.isfinite(eh)
            nn = max(len(structures), 1)
            metrics.update({
                f"mean_e_above_hull_{m}": float(np.nanmean(eh)) if has.any() else math.nan,
                f"stable_rate_{m}": float(np.sum(has & (eh <= ON_HULL_TOL)) / nn),
                f"metastable_rate_{m}": float(np.sum(has & (eh <= 0.1 + ON_HULL_TOL)) / nn),
                f"n_no_hull_{m}": int((~has).sum()),
                f"n_hull_entries_{m}": len(ref),
                f"n_hull_computed_{m}": mh.computed,
            })
    names = list(per)
    if len(names) > 1:
        a, b = per[names[0]][1], per[names[1]][1]
        both = np.isfinite(a) & np.isfinite(b)
        sa, sb = a <= threshold + ON_HULL_TOL, b <= threshold + ON_HULL_TOL
        metrics["mlip_disagreement_rate"] = float(np.sum(both & (sa != sb)) / max(int(both.sum()), 1))
        metrics["mlip_e_hull_mae"] = float(np.mean(np.abs(a[both] - b[both]))) if both.any() else math.nan
    metrics["mean_e_above_hull"] = metrics.get(f"mean_e_above_hull_{names[0]}", math.nan)
    metrics["metastable_rate"] = metrics.get(f"metastable_rate_{names[0]}", math.nan)
    return metrics, per, ref_s, finals


def evaluate_generated(
    structures: Sequence,
    reference,
    stages: Sequence[str] = DEFAULT_STAGES,
    *,
    coverage_reference=None,
    hull: HullReference | str | Path | None = None,
    properties: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    cov_cutoffs: tuple[float, float] = COV_CUTOFFS["mp20"],
    comp_scaler: tuple[np.ndarray, np.ndarray] | None = None,
    match_tolerances: Mapping[str, float] | None = None,
    relax: bool = True,
    relax_steps: int = 500,
    fmax: float = 0.1,
    stable_threshold: float = 0.1,
    min_e_hull: float | None = FAR_BELOW_HULL,
    device: str | None = None,
    threads: int | None = None,
    workers: int = 1,
    fingerprint_cache: str | Path | None = None,
    endpoint_cache: str | Path | None = None,
    mlips: Sequence[str] | None = None,
    hull_reference=None,
    hull_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Run the evaluation stages in order, each on the survivors of the one before.

    Args:
        structures: Generated crystals (pymatgen ``Structure``, records, or None for a failed sample).
        reference: Reference crystals (:class:`ReferenceSet` or structures): novelty is measured against it,
            and it is the default for coverage, distributions and the hull.
        stages: Stage names in order (see :data:`DEFAULT_STAGES`); filtering stages are ``validity``,
            ``uniqueness``, ``novelty`` and ``stability`` (keeps e_hull ≤ ``stable_threshold``).
        coverage_reference: Reference for ``coverage`` and ``distribution`` (CDVAE uses the test split).
        hull: CHGNet hull reference, or the path of a cached one (:meth:`HullReference.save`); default: built
            from ``reference`` with CHGNet single points and prototype end points (slow for a large
            reference).
        properties: ``name -> (values for every generated sample, reference values)`` for ``distribution``;
            the sample values are indexed like ``structures`` and restricted to the stage's survivors.
        cov_cutoffs: (structure, composition) coverage cutoffs; default CDVAE's MP-20 values (0.4, 10).
        comp_scaler: (means, stds) for the composition fingerprints; default: the coverage reference's.
        match_tolerances: StructureMatcher tolerances for uniqueness and novelty (default
            :data:`MATCH_TOLERANCES`).
        relax: Relax samples with CHGNet in ``stability``; later stages then see the relaxed structures.
        relax_steps: Most FIRE steps per relaxation.
        fmax: Relaxation force threshold, eV/Å.
        stable_threshold: e_hull (eV/atom) at or under which a sample survives ``stability``.
        min_e_hull: With ``mlips``: a sample any MLIP puts deeper than this below its hull (eV/atom) is counted
            in ``n_far_below_hull`` and not as stable (:data:`FAR_BELOW_HULL`); the rates without this bound
            are reported beside (``*_unguarded``). None: no lower bound.
        device: Torch device for CHGNet (default: CUDA if available).
        threads: Torch CPU threads for CHGNet (None: unchanged).
        workers: Processes for matching, fingerprints and CHGNet relaxations.
        fingerprint_cache: ``.npz`` file for the coverage reference's fingerprints.
        endpoint_cache: JSON file of CHGNet-relaxed elemental end points, reused across evaluations.
        mlips: MLIPs of the stability stage (``chgnet``, ``sevennet``, or
            :class:`~mmmat.design.oracle.EnergyMethod` objects). When given, each relaxes every sample
            (batched, :mod:`mmmat.evaluation.relax`) and places it on its own hull of ``hull_reference``
            (single points of the known phases in the samples' chemical systems, cached in ``hull_cache``, plus
            the shipped elemental references); a sample is stable only when every MLIP puts it at or under
            ``stable_threshold``, and the disagreement is reported. None: the single-CHGNet ``hull`` path.
        hull_reference: Known phases of the MLIP hulls (:class:`ReferenceSet` or structures; default
            ``reference``).
        hull_cache: Folder of the known phases' MLIP energies (keyed by MLIP version and structure).

    Returns:
        ``{"n_generated", "stages": [per-stage {"stage", "n_in", "n_out", "wall_s", "reference_s",
        "s_per_sample", "gpu_s_per_sample", "device", "metrics"}], "metrics": all metrics flat,
        "survivors": indices into ``structures``, "per_sample": arrays (None where a sample never reached that
        stage), "settings", "structures": the samples as the last stage saw them (relaxed where relaxed)}``;
        everything but ``"structures"`` is JSON-ready. Rates in a stage's metrics are over that stage's
        input; ``*_of_generated`` rates and ``sun_rate`` are over all generated samples.
        ``gpu_s_per_sample``: wall time per sample of a stage run on a CUDA device (one GPU), else 0.

    """
    unknown = [s for s in stages if s not in DEFAULT_STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {DEFAULT_STAGES}")
    ss = [_as_structure(s) for s in structures]
    n = len(ss)
    ref = _as_reference(reference)
    cov_ref = _as_reference(coverage_reference) if coverage_reference is not None else ref
    tol = dict(MATCH_TOLERANCES if match_tolerances is None else match_tolerances)
    alive = np.ones(n, dtype=bool)
    per: dict[str, list] = {}
    report_stages: list[dict[str, Any]] = []
    flat: dict[str, Any] = {"n_generated": n}
    dev = resolve_device(device)

    def put(name: str, idx: np.ndarray, values) -> None:
        col = per.setdefault(name, [None] * n)
        for i, v in zip(idx, values):
            col[int(i)] = v.item() if hasattr(v, "item") else v

    guarded_out = np.zeros(0, dtype=int)
    for stage in stages:
        if stage != "validity":  # only the validity stage knows what to do with a missing sample
            alive &= np.array([s is not None for s in ss], dtype=bool)
        idx = np.flatnonzero(alive)
        cur = [ss[i] for i in idx]
        t0 = time.perf_counter()
        ref_s = 0.0
        metrics: dict[str, Any] = {}
        keep = np.ones(len(idx), dtype=bool)
        on_gpu = False
        if stage == "validity":
            v = validity(cur)
            keep = v["valid"]
            for k in ("struct_valid", "comp_valid", "valid"):
                put(k, idx, v[k])
                metrics[k] = float(v[k].mean()) if len(idx) else math.nan
        elif stage == "uniqueness":
            keep = unique_mask(cur, tol, workers) if cur else keep
            put("unique", idx, keep)
            metrics["unique_rate"] = float(keep.mean()) if len(idx) else math.nan
        elif stage == "novelty":
            keep = novel_mask(cur, ref, tol, workers) if cur else keep
            put("novel", idx, keep)
            metrics["novel_rate"] = float(keep.mean()) if len(idx) else math.nan
        elif stage == "coverage":
            if cov_ref._fps is None and not (fingerprint_cache is not None and Path(fingerprint_cache).exists()):
                note(f"coverage: fingerprints of {len(cov_ref)} reference crystals, about 0.35 s each on one CPU "
                     f"core (~{len(cov_ref) * 0.35 / 60 / max(workers, 1):.0f} min with {workers} worker(s)"
                     + (f"; cached in {fingerprint_cache}" if fingerprint_cache is not None else "") + ")")
            tr = time.perf_counter()
            rs, rc = cov_ref.fingerprints(fingerprint_cache, workers)
            ref_s = time.perf_counter() - tr
            every = [s for s in ss if s is not None]  # CDVAE: every sample, valid or not, is fingerprinted
            gs, gc = fingerprints(every, workers=workers)
            metrics = coverage(gs, gc, rs, rc, *cov_cutoffs, comp_scaler=comp_scaler, num_generated=n)
            metrics["n_fingerprinted"] = len(every)
        elif stage == "distribution":
            props = None
            if properties:
                props = {k: (np.asarray(g, float)[idx], r) for k, (g, r) in properties.items()}
            metrics = distribution_distances(cur, cov_ref, props)
        elif stage == "stability" and mlips:
            on_gpu = dev.startswith("cuda")
            hr = _as_reference(hull_reference) if hull_reference is not None else ref
            metrics, per_m, ref_s, finals = _mlip_stability(
                cur, hr, list(mlips), relax, relax_steps, fmax, dev, threads, hull_cache, stable_threshold
            )
            for m, (e, eh) in per_m.items():
                put(f"energy_per_atom_{m}", idx, e)
                put(f"e_above_hull_{m}", idx, eh)
            first = next(iter(per_m.values()))[1]
            put("e_above_hull", idx, first)
            if relax:
                for i, s in zip(idx, finals):
                    ss[int(i)] = s
            flags = mlip_stable({m: eh for m, (_, eh) in per_m.items()}, stable_threshold, min_e_hull)
            ok = keep = flags["all"]
            put("stable_one_mlip", idx, flags["one"])
            put("stable_all_mlips", idx, ok)
            put("far_below_hull", idx, flags["far"])
            put("stable_one_mlip_unguarded", idx, flags["one_unguarded"])
            guarded_out = idx[flags["all_unguarded"] & flags["far"]]  # stable but for the lower bound
            metrics["stable_rate_all_mlips"] = float(ok.mean()) if len(idx) else math.nan
            metrics["stable_rate_all_mlips_unguarded"] = float(flags["all_unguarded"].mean()) if len(idx) else math.nan
            metrics["n_far_below_hull"] = int(flags["far"].sum())
            for m, (_, eh) in per_m.items():
                metrics[f"n_far_below_hull_{m}"] = int(flags[f"far_{m}"].sum())
                metrics[f"median_e_above_hull_{m}"] = float(np.nanmedian(eh)) if np.isfinite(eh).any() else math.nan
        elif stage == "stability":
            tr = time.perf_counter()
            if hull is None:
                keep_ref = hull_relevant(ref.structures, cur)
                where = f", kept in {endpoint_cache}" if endpoint_cache else ""
                note(
                    f"stability: CHGNet energies of {len(keep_ref)} of {len(ref)} reference crystals (those in the "
                    f"samples' chemical systems, about 0.15 s each on one CPU core); elemental end points for the "
                    f"elements they lack (6 prototype relaxations each, about a minute of CPU per element on first "
                    f"use{where})"
                )
                hull = reference_hull(
                    [ref.structures[i] for i in keep_ref], [ref.ids[i] for i in keep_ref], device=dev,
                    threads=threads, endpoint_steps=relax_steps, endpoint_cache=endpoint_cache,
                )
            note(f"stability: {len(cur)} relaxations of at most {relax_steps} FIRE steps (about 1-10 s each)")
            if not isinstance(hull, HullReference):
                hull = HullReference.load(hull)
            ref_s = time.perf_counter() - tr
            on_gpu = dev.startswith("cuda")
            res = stability(
                cur, hull, relax=relax, steps=relax_steps, fmax=fmax, device=dev, threads=threads, workers=workers,
                endpoint_cache=endpoint_cache,
            )
            hull = res["hull"]
            e, eh = res["energy_per_atom"], res["e_above_hull"]
            put("energy_per_atom", idx, e)
            put("e_above_hull", idx, eh)
            if relax:
                for i, s in zip(idx, res["structures"]):
                    ss[int(i)] = s
            has = np.isfinite(eh)
            keep = has & (eh <= stable_threshold + ON_HULL_TOL)
            m = max(len(idx), 1)
            metrics = {
                "mean_energy_per_atom": float(np.nanmean(e)) if np.isfinite(e).any() else math.nan,
                "mean_e_above_hull": float(np.nanmean(eh)) if has.any() else math.nan,
                "stable_rate": float(np.sum(has & (eh <= ON_HULL_TOL)) / m),
                "metastable_rate": float(np.sum(keep) / m),  # e_hull <= stable_threshold
                "n_no_hull": int((~has).sum()),
                "n_prototype_endpoints": sum(i.startswith("proto:") for i in hull.ids),
            }
        wall = time.perf_counter() - t0
        if stage in FILTER_STAGES:
            alive[idx[~keep]] = False
        n_out = int(alive.sum())
        if stage in FILTER_STAGES:
            metrics[f"{stage}_survival_of_generated"] = n_out / n if n else math.nan
        rec = {
            "stage": stage,
            "n_in": len(idx),
            "n_out": n_out,
            "wall_s": wall,
            "reference_s": ref_s,
            "s_per_sample": (wall - ref_s) / len(idx) if len(idx) else math.nan,
            "gpu_s_per_sample": (wall - ref_s) / len(idx) if on_gpu and len(idx) else 0.0,
            "device": dev if stage == "stability" else "cpu",
            "metrics": metrics,
        }
        report_stages.append(rec)
        note(f"{stage}: {len(idx)} in, {n_out} left, {wall:.1f} s")
        flat.update(metrics)
        flat[f"{stage}_wall_s"] = wall
    survivors = np.flatnonzero(alive)
    if {"validity", "uniqueness", "novelty", "stability"} <= set(stages):
        flat["sun_rate"] = len(survivors) / n if n else math.nan
        if mlips:
            one = per.get("stable_one_mlip", [None] * n)
            one_ung = per.get("stable_one_mlip_unguarded", [None] * n)
            flat["sun_rate_two_mlip" if len(mlips) > 1 else "sun_rate_one_mlip"] = flat["sun_rate"]
            flat["sun_rate_one_mlip"] = sum(1 for v in one if v) / n if n else math.nan
            flat["sun_one_mlip_name"] = getattr(mlips[0], "name", mlips[0])
            if stages[-1] == "stability":  # the lower bound was the last filter: what it removed is countable
                flat["sun_rate_unguarded"] = (len(survivors) + len(guarded_out)) / n if n else math.nan
                flat["sun_rate_one_mlip_unguarded"] = sum(1 for v in one_ung if v) / n if n else math.nan
        eh_col = per.get("e_above_hull", [None] * n)
        flat["sun_rate_on_hull"] = (
            sum(1 for i in survivors if eh_col[i] is not None and eh_col[i] <= ON_HULL_TOL) / n
            if n
            else math.nan
        )
    return {
        "n_generated": n,
        "stages": report_stages,
        "metrics": flat,
        "survivors": survivors.tolist(),
        "per_sample": per,
        "settings": {
            "stages": list(stages),
            "match_tolerances": tol,
            "cov_cutoffs": list(cov_cutoffs),
            "relax": relax,
            "relax_steps": relax_steps,
            "fmax_eV_per_A": fmax,
            "stable_threshold_eV_per_atom": stable_threshold,
            "min_e_hull_eV_per_atom": min_e_hull if mlips else None,
            "device": dev,
            "n_reference": len(ref),
            "n_coverage_reference": len(cov_ref),
            "mlips": [getattr(m, "name", m) for m in mlips] if mlips else ["chgnet"],
            "stable_rule": (
                f"e_above_hull <= {stable_threshold} eV/atom under every MLIP "
                f"({', '.join(getattr(m, 'name', m) for m in mlips)}), each against its own hull"
                + (f", and no MLIP below {min_e_hull} eV/atom (far below the hull: counted apart)"
                   if min_e_hull is not None else "")
                if mlips else f"CHGNet e_above_hull <= {stable_threshold} eV/atom"
            ),
            "n_hull_reference": len(hull_reference) if hull_reference is not None else len(ref),
            "coverage_convention": COVERAGE_CONVENTION,
        },
        "structures": ss,
    }


__all__ = [
    "COVERAGE_CONVENTION",
    "COV_CUTOFFS",
    "CSP_TOLERANCES",
    "DEFAULT_STAGES",
    "FAR_BELOW_HULL",
    "MATCH_TOLERANCES",
    "ReferenceSet",
    "hull_relevant",
    "compositional_validity",
    "coverage",
    "csp_match",
    "csp_match_details",
    "distribution_distances",
    "evaluate_generated",
    "mlip_stable",
    "novel_mask",
    "structural_validity",
    "unique_mask",
    "validity",
]
