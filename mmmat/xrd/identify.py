"""Which crystalline phases a powder scan holds, and how much of each: candidate search plus a whole-pattern fit.

:func:`identify` takes a measured pattern (any format of :func:`mmmat.io.read_pattern`) and an index folder
whose crystals carry peak tables (:mod:`mmmat.xrd.phases`), and returns an :class:`IdentifyResult`.

1. **Candidates** come from two routes, restricted to crystals made only of ``elements`` when given, and
   never (unless ``include_molecular``) crystals made only of H, N, O, F, Cl and noble gases, with or without
   carbon: molecular or gas-phase solids such as solid O2, H3O2 or CO2 (:func:`molecular_rows`), not expected
   in a scan at room conditions:

   * *classical* (:func:`screen`): a matched filter over the whole index at once.  The signal (the
     background-free scan, later the positive residual of the current fit, both smoothed over half a peak
     width) is put on an absolute ln(1/d) grid (bin :data:`SCREEN_STEP`), where an isotropic lattice scale is
     a shift and every crystal's lines are one row of a sparse stick matrix built once per index; it is
     blurred by a Gaussian of the scan's peak width and multiplied by the stick matrix at every lattice scale
     in :data:`SCALE_RANGE` (one sparse-dense product).  A crystal's score is the squared non-negative
     projection over the norm of its blurred sticks: without an element list, weighted by the scan's
     smoothed counts as the fit is (the weighted misfit a crystal removes alone, at its best scale; lines
     where the scan has no peak cost it), with one, uniform on the signal divided by the Lorentz-polarisation
     factor (the share of the signal it can explain alone) (:data:`WEIGHTED_SCREEN`);
   * *learned* (when the index holds crystal embeddings and its model has an ``xrd`` encoder, or
     ``model`` is given): the scan is embedded and the nearest crystals of the index are taken.

2. **Fit** (iterative residual search): phases are added greedily.  Each step screens the residual of the
   current fit, takes the best :data:`POOL` candidates plus the learned ones, fits each together with the
   phases already kept (linear parameters only: exact and fast) and keeps the one that lowers the weighted
   residual most, after refining its lattice scale and the peak shape.  Without an element list the search
   is run from the best :data:`FIRST_PHASE_STARTS` single phases of different structure types, and the set
   of lowest BIC is kept.  Non-linear parameters (each phase's
   lattice scale, zero shift, sample displacement, Caglioti U and W, Scherrer size, axial asymmetry) are
   refined by a damped Gauss-Newton (Levenberg-Marquardt) loop whose forward-difference Jacobian is rendered
   in one batched call of :func:`mmmat.xrd.instrument.bragg_profiles` (the scan's Kα1/Kα2 wavelengths and
   ratio); the linear ones (one non-negative scale per phase, a Chebyshev background of degree
   :data:`BACKGROUND_DEGREE`) are solved exactly at every step (variable projection).  After the last phase,
   the residual is screened once more and its best candidates, ranked by how much each would lower the
   misfit, are the *runners-up* of :meth:`IdentifyResult.ranking`.

3. **Criterion**: a phase is kept only if the Bayesian information criterion falls by more than
   :data:`MIN_DELTA_BIC`,
   ``BIC = n_eff ln(RSS_w / n) + k ln n_eff`` with the weighted residual sum of squares (weights 1/counts),
   k = 2 parameters per phase (scale, lattice scale) and n_eff the number of independent resolution
   elements of the scan (its 2θ span over the fitted peak FWHM), not the number of points: neighbouring
   points of one peak are not independent measurements, and counting them all would let every
   systematic misfit of the peak shape add a phase.  Addition stops at ``max_phases``.  After the final
   refinement every phase is checked again (backward): one whose removal would not raise the BIC by more
   than :data:`MIN_DELTA_BIC` is removed.

   With an element list, the elements are taken as the sample's: when the phases found leave some of them
   unexplained, the residual is screened again among the crystals that carry at least one of those elements
   and the best is added under the same criterion (:data:`COVERAGE_SEARCH`); if elements are still
   unexplained at the end, the best :data:`COVERAGE_CANDIDATES` such crystals come first among the
   candidates after the phases found (``coverage`` of :class:`IdentifyResult`).  The main search screens
   every allowed crystal, and a minor phase of the elements no phase explains loses its pool place to
   crystals of the major phases' elements (in val mixtures, 24 of 26 misses were such phases).  In the swap
   check after the final refinement (each phase against the candidates that explain the same peaks), a phase
   is also replaced by an alternative that explains more of the listed elements if the BIC rises by less than
   :data:`MIN_DELTA_BIC` (:data:`ELEMENT_SWAP`): isostructural crystals such as YbMg and LaYbMg2 give nearly
   the same pattern, and the element list tells them apart (with or without a list, the swap check also
   screens the phase's own structure type apart, :data:`PROTOTYPE_SWAP`).  Failing that, while a listed element is
   unexplained, the crystals of the phase's structure type that carry one (:func:`prototypes`: an Er analogue
   of a Sm phase) are tried too, each refined first (:data:`SUBSTITUTE_SWAP`): their peaks are already fitted
   by the phase, so the residual screen rarely lists them.  And a swap by fit alone never leaves more listed
   elements unexplained (:data:`KEEP_ELEMENTS`), so it does not undo what the element swaps established.

4. **Weight fractions** by Hill & Howard (J. Appl. Cryst. 20, 467, 1987): w_p = S_p (ZMV)_p / Σ S (ZMV),
   S the fitted scale of the phase's per-cell intensities, ZM its cell mass, V its cell volume.  Rwp is
   100·sqrt(Σ w (y - f)² / Σ w y²) with w = 1/max(y, 1).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmmat.io import InputError, Pattern, read_pattern
from mmmat.xrd.phases import D_MIN, PhaseTable, ensure_table

#: Lattice scales (d multiplied by s) searched for each candidate: computed cells are often 1-3 % too large.
SCALE_RANGE = (0.96, 1.03)
#: Classical candidates carried into the fit.
POOL = 20
#: Learned candidates carried into the fit.
LEARNED_POOL = 10
#: Chebyshev background terms minus one.
BACKGROUND_DEGREE = 12
#: A phase is kept when it lowers the BIC by more than this ("very strong" evidence, Kass & Raftery 1995).
MIN_DELTA_BIC = 10.0
#: A phase is kept only when it also explains at least this fraction of the weighted misfit left without it
#: (without an element list / with one): against phases with many weak lines that fit the profile misfit of
#: the others (triclinic crystals of any composition) rather than peaks of their own. On the 120 val mixtures
#: without elements, 0.25 took false phases per pattern from 1.39 to 0.80 and exact phase sets from 0.20 to
#: 0.28 (all phases in the top 5: 0.375 -> 0.367); with elements it cost all-in-top-5 (0.858 -> 0.817), so
#: the element path keeps 0.
MIN_RSS_DROP = 0.25
MIN_RSS_DROP_ELEMENTS = 0.0
#: Levenberg-Marquardt iterations of a refinement.
REFINE_STEPS = 3
#: Half-range of the lattice-scale refinement around the screening value.
SCALE_REFINE = 0.01
#: Trial phases refined in turn at each addition step until one passes the criterion.
REFINED_TRIALS = 2
#: Alternatives kept for each phase found (candidates explaining the same peaks, best first).
SWAP_ALTERNATIVES = 4
#: With an element list: when the phases found leave some of its elements unexplained, search once more among
#: the crystals that carry them (same criterion); and rank this many of those candidates right after the phases.
COVERAGE_SEARCH = True
COVERAGE_CANDIDATES = 3
#: With an element list: in the swap check, a phase is replaced by one of its alternatives that explains more of
#: the listed elements when the BIC rises by less than MIN_DELTA_BIC (isostructural crystals: YbMg, LaYbMg2).
ELEMENT_SWAP = True
#: In that swap check, also try the allowed crystals of the phase's structure type (same space group and
#: stoichiometry, :func:`prototypes`) that hold an unexplained element: such a substitute (an Er analogue of a
#: Sm phase) fits the phase's peaks at a slightly other lattice scale, so the residual screen rarely lists it.
SUBSTITUTE_SWAP = True
#: BIC rise (before refinement) up to which a substitute is refined and judged by :data:`MIN_DELTA_BIC`.
SUBSTITUTE_BIC = 40.0
#: With an element list, the swap by fit never leaves more listed elements unexplained.
KEEP_ELEMENTS = True
#: In the swap check, every phase is also tried against the allowed crystals of its structure type
#: (:func:`prototypes`), screened apart: isostructural crystals (LiSmTl2, LiErTl2) give nearly the same pattern
#: at lattice scales a few per cent apart, so the residual screen over the whole index lists only some of them.
PROTOTYPE_SWAP = True
#: First phases tried (without an element list / with one): the greedy search from the best single phase, then
#: from the next best single phases of other structure types (:func:`prototypes`), the lowest final BIC kept.
#: The best single phase is often a crystal whose lines cover two phases of the mixture at once (an ordered
#: Heusler's lines hold those of a CsCl-type crystal), which the greedy search never takes back.
FIRST_PHASE_STARTS = 4
FIRST_PHASE_STARTS_ELEMENTS = 1


@dataclass
class PhaseHit:
    """One phase found in the scan.

    Attributes:
        material_id: Id in the index.
        formula: Reduced formula.
        spacegroup: Space-group number (0 when unknown).
        weight_fraction: Hill-Howard weight fraction among the phases found (0..1).
        lattice_scale: Refined isotropic scale of the indexed cell's d-spacings (1 = as indexed).
        score: BIC rise if the phase were removed from the final fit (larger: stronger evidence).

    """

    material_id: str
    formula: str
    spacegroup: int
    weight_fraction: float
    lattice_scale: float
    score: float


@dataclass
class IdentifyResult:
    """Phases found in a scan, the fit quality and the fitted curves (2θ in degrees at ``wavelength`` Å)."""

    phases: list[PhaseHit]
    rwp: float
    two_theta: np.ndarray
    measured: np.ndarray
    fitted: np.ndarray
    residual: np.ndarray
    background: np.ndarray
    contributions: dict[str, np.ndarray]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    runners_up: list[str] = field(default_factory=list)
    alternatives: dict[str, list[str]] = field(default_factory=dict)
    coverage: list[str] = field(default_factory=list)
    wavelength: float = 0.0
    source: str = ""
    instrument: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def ranking(self) -> list[str]:
        """Material ids, likeliest first: phases found, coverage candidates, alternatives and runners-up, the rest.

        The phases found come in the order added; then, round by round, the next candidate that carries
        elements of the element list no phase found explains (``coverage``, best first), the next alternative
        of each phase (weakest evidence first: the likeliest to be mistaken) and the next runner-up of the
        residual; then the other candidates.  Interleaving the three kinds of doubt keeps a mistaken phase's
        alternative from being pushed down by a long coverage list.
        """
        out = [p.material_id for p in self.phases]
        weakest = [p.material_id for p in sorted(self.phases, key=lambda p: p.score)]
        merged: list[str] = []
        rounds = max([len(self.runners_up), len(self.coverage), *(len(v) for v in self.alternatives.values())],
                     default=0)
        for k in range(rounds):
            merged += self.coverage[k:k + 1]
            merged += [self.alternatives[m][k] for m in weakest if k < len(self.alternatives.get(m, []))]
            merged += self.runners_up[k:k + 1]
        for m in [*merged, *(c["material_id"] for c in self.candidates)]:
            if m not in out:
                out.append(m)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: phases, Rwp (%), the curves as lists, contributions by material id, candidates."""
        return {
            "source": self.source,
            "wavelength": self.wavelength,
            "rwp": self.rwp,
            "seconds": self.seconds,
            "phases": [asdict(p) for p in self.phases],
            "instrument": self.instrument,
            "two_theta": self.two_theta.tolist(),
            "measured": self.measured.tolist(),
            "fitted": self.fitted.tolist(),
            "residual": self.residual.tolist(),
            "background": self.background.tolist(),
            "contributions": {k: v.tolist() for k, v in self.contributions.items()},
            "candidates": self.candidates,
            "alternatives": self.alternatives,
            "coverage": self.coverage,
        }

    def to_frame(self) -> Any:
        """The phases as a pandas table."""
        import pandas as pd

        cols = ["material_id", "formula", "spacegroup", "weight_fraction", "lattice_scale", "score"]
        return pd.DataFrame([asdict(p) for p in self.phases], columns=cols)

    def plot(self, path: str | Path) -> Path:
        """PNG of measured vs fitted pattern, the residual below, and each phase's contribution."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, axr) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=[3, 1])
        ax.plot(self.two_theta, self.measured, color="0.2", lw=0.8, label="measured")
        ax.plot(self.two_theta, self.fitted, color="tab:red", lw=0.8, label=f"fit (Rwp {self.rwp:.1f} %)")
        ax.plot(self.two_theta, self.background, color="0.6", lw=0.8, ls="--", label="background")
        for p in self.phases:
            curve = self.contributions[p.material_id] + self.background
            ax.plot(self.two_theta, curve, lw=0.8,
                    label=f"{p.formula} {p.material_id} ({100 * p.weight_fraction:.0f} wt%)")
        ax.set_ylabel("intensity")
        ax.legend(fontsize=7, loc="upper right")
        ax.set_title(Path(self.source).name, fontsize=9)
        axr.plot(self.two_theta, self.residual, color="tab:blue", lw=0.6)
        axr.axhline(0, color="0.5", lw=0.5)
        axr.set_xlabel(f"2θ (degrees, λ = {self.wavelength:.4f} Å)")
        axr.set_ylabel("residual")
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out


# ====================================================================== index loading (cached per process)
_TABLES: dict[tuple[str, float], PhaseTable] = {}


def load_table(index: str | Path) -> PhaseTable:
    """The index's peak table, kept in memory for later calls in the same process."""
    folder = Path(index)
    if not folder.is_dir():
        raise InputError(f"{folder}: index folder not found")
    path = folder / "phases.npz"
    if path.is_file():  # already loaded and unchanged: no read
        key = (str(folder.resolve()), path.stat().st_mtime)
        if key in _TABLES:
            return _TABLES[key]
    table = ensure_table(folder)
    key = (str(folder.resolve()), path.stat().st_mtime)
    _TABLES.clear()
    _TABLES[key] = table
    return table


#: Element symbols by atomic number (index 0 unused).
ELEMENTS = (
    "X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr Rb Sr Y "
    "Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re "
    "Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg "
    "Cn Nh Fl Mc Lv Ts Og"
).split()


def _check_elements(elements: Sequence[str] | None) -> list[str] | None:
    if elements is None:
        return None
    out = []
    for e in elements:
        e = str(e).strip()
        if not e:
            continue
        if e not in ELEMENTS[1:]:
            raise InputError(f"unknown element symbol {e!r} in the element list")
        out.append(e)
    if not out:
        raise InputError("the element list is empty")
    return out


# ====================================================================== the scan
def _net(tt: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.clip(y - _background(tt, y), 0.0, None)


def _background(tt: np.ndarray, y: np.ndarray) -> np.ndarray:
    from mmmat.data.xrd import estimate_background

    return estimate_background(tt, y, window=3.0)


def _smooth(tt: np.ndarray, y: np.ndarray, fwhm: float) -> np.ndarray:
    """``y`` blurred by a Gaussian of half the peak width (``fwhm`` in degrees): noise down, peaks kept."""
    from scipy.ndimage import gaussian_filter1d

    step = float(np.median(np.diff(tt)))
    return gaussian_filter1d(y, max(fwhm / 2.355 / step / 2, 0.5), mode="nearest")


def _lp(two_theta: np.ndarray) -> np.ndarray:
    th = np.radians(two_theta) / 2
    return (1 + np.cos(2 * th) ** 2) / (np.sin(th) ** 2 * np.cos(th))


def _fwhm_estimate(tt: np.ndarray, net: np.ndarray) -> float:
    """FWHM (degrees) of the strongest peak of a background-free scan."""
    i = int(np.argmax(net))
    half = net[i] / 2
    lo = i
    while lo > 0 and net[lo] > half:
        lo -= 1
    hi = i
    while hi < net.size - 1 and net[hi] > half:
        hi += 1
    return float(np.clip(tt[hi] - tt[lo], 0.02, 1.0))


# ====================================================================== matched-filter screening (whole index)
#: Bin width of the absolute ln(1/d) screening grid.
SCREEN_STEP = 5e-4
#: Lines weaker than this fraction of a crystal's strongest (no Lorentz-polarisation) are left out of screening.
SCREEN_MIN_LINE = 5e-3
#: The screening range's ends are rounded inward to multiples of this many bins.
SCREEN_RANGE_BINS = 40
#: Lattice-scale steps of the screening search, in grid bins.
SCREEN_SHIFT_BINS = 2
#: Weight the screens by the scan's counts (:func:`screen`'s ``variance``), without an element list / with one.
#: On 150 val mixtures, weighting took the true phases' median rank in the first screen over the whole index from
#: 440 to 51, and all-phases-in-the-top-5 without elements from 0.400 to 0.420 (with 4 first phases); among the
#: few crystals of a given element list it cost (0.907 against 0.853), so that path screens unweighted.
WEIGHTED_SCREEN = True
WEIGHTED_SCREEN_ELEMENTS = False
#: The screen's variance is floored at this fraction of its maximum (points of zero counts keep a finite weight).
VARIANCE_FLOOR = 1e-3
#: Elements of molecular and gas-phase crystals (solid O2, N2, H3O2, Cl2 ...): a crystal made only of these is
#: implausible in a powder scan taken at room conditions and is not a candidate unless asked for.
VOLATILE = frozenset("H He N O F Ne Cl Ar Kr Xe Rn".split())
_CARBON = frozenset({"C"})
_VOLATILE_C = VOLATILE | _CARBON  # with carbon: CO2, CH4, C2N2 ... (carbon alone is graphite or diamond)
_GRID_LO = -math.log(50.0)
_GRID_HI = -math.log(D_MIN)


def _cache(table: PhaseTable) -> dict[tuple, Any]:
    """Derived arrays of one table, kept on the table object itself (they go when it goes)."""
    return table.__dict__.setdefault("_identify_cache", {})


def prototype_members(table: PhaseTable) -> dict[tuple, np.ndarray]:
    """Rows of the table by structure-type key (:func:`prototypes`)."""
    cache = _cache(table)
    if ("prototype_members",) not in cache:
        groups: dict[tuple, list[int]] = {}
        for r, key in enumerate(prototypes(table)):
            groups.setdefault(key, []).append(r)
        cache[("prototype_members",)] = {k: np.array(v, dtype=np.int64) for k, v in groups.items()}
    return cache[("prototype_members",)]


def _rows_within(table: PhaseTable, elements: Sequence[str]) -> np.ndarray:
    """Rows of the crystals made only of ``elements`` (element sets cached per table)."""
    cache = _cache(table)
    key = ("sets",)
    if key not in cache:
        cache[key] = table.element_sets()
    allowed = frozenset(elements)
    return np.array([i for i, e in enumerate(cache[key]) if e <= allowed], dtype=np.int64)


def molecular_rows(table: PhaseTable) -> np.ndarray:
    """Boolean flag per crystal: made only of :data:`VOLATILE` elements, with or without carbon (not carbon alone).

    These are molecular or gas-phase solids (solid O2, N2, H3O2, CO2, CH4 ...); a few real solids such as
    C3N4 fall under the rule too and are then proposed only with ``include_molecular``.
    """
    cache = _cache(table)
    key = ("molecular",)
    if key not in cache:
        sets = [frozenset(e.split()) for e in table.elements]
        cache[key] = np.array([e <= VOLATILE or (e <= _VOLATILE_C and e != _CARBON) for e in sets], dtype=bool)
    return cache[key]


def prototypes(table: PhaseTable) -> list[tuple[int, tuple[float, ...]]]:
    """Per crystal, its structure-type key: (space group, the sorted element counts of its reduced formula).

    Crystals with the same key and one element exchanged are isostructural substitutes (LiSmTl2 and LiErTl2),
    whose patterns differ mainly by a small change of lattice scale. Formulas with brackets (Ca(CoO2)2) are
    expanded.
    """
    cache = _cache(table)
    key = ("prototypes",)
    if key not in cache:
        from pymatgen.core import Composition

        out = []
        for f, g in zip(table.formula.tolist(), table.spacegroup.tolist()):
            try:
                counts = tuple(sorted(round(v, 3) for v in Composition(str(f)).get_el_amt_dict().values()))
            except Exception:  # pymatgen raises several types on odd formula strings: no substitute then
                counts = (float("nan"),)
            out.append((int(g), counts))
        cache[key] = out
    return cache[key]


def _screen_matrix(table: PhaseTable) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """Sparse (crystals x bins) stick matrix on the ln(1/d) grid, with each line's bin, owner and weight."""
    cache = _cache(table)
    key = ("sticks",)
    if key not in cache:
        from scipy import sparse

        n = len(table)
        lens = np.diff(table.offsets).astype(np.int64)
        owner = np.repeat(np.arange(n), lens)
        inten = table.intensity.astype(np.float64)
        top = np.zeros(n)
        np.maximum.at(top, owner, inten)
        keep = inten >= SCREEN_MIN_LINE * top[owner]
        owner, inten = owner[keep], inten[keep] / top[owner[keep]]
        b = np.rint((-np.log(table.d[keep].astype(np.float64)) - _GRID_LO) / SCREEN_STEP).astype(np.int64)
        nb = int(round((_GRID_HI - _GRID_LO) / SCREEN_STEP)) + 1
        b = np.clip(b, 0, nb - 1)
        mat = sparse.csr_matrix((inten, (owner, b)), shape=(n, nb))
        mat.sum_duplicates()
        coo = mat.tocoo()
        cache[key] = (mat, coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data)
    return cache[key]


def _blur_level(sigma_bins: float) -> int:
    """The cached blur width nearest ``sigma_bins``: 1.25**level bins."""
    return round(math.log(max(sigma_bins, 0.5)) / math.log(1.25))


def _self_overlap(table: PhaseTable, sigma_bins: float) -> np.ndarray:
    """Each line's share of its crystal's ||sticks * Gaussian(sigma)||² (cached per blur level)."""
    _, row, col, w = _screen_matrix(table)
    level = _blur_level(sigma_bins)
    cache = _cache(table)
    key = ("self", level)
    if key not in cache:  # Σ_l' w_l' exp(-Δ²/4σ²) for each line l: the self-overlap of blurred sticks
        sig = 1.25**level
        reach = int(math.ceil(4 * sig))
        acc = w.copy()
        idx = np.arange(w.size)
        for j in range(1, w.size):  # lines are sorted by (row, bin): a line out of reach at j stays so after j
            idx = idx[idx + j < w.size]
            idx = idx[(row[idx + j] == row[idx]) & (col[idx + j] - col[idx] <= 2 * reach)]
            if not idx.size:
                break
            k = np.exp(-((col[idx + j] - col[idx]) ** 2) / (4 * sig * sig))
            acc[idx] += w[idx + j] * k  # idx holds each line once: plain fancy-index addition is exact
            acc[idx + j] += w[idx] * k
        cache[key] = w * acc
    return cache[key]


def _screen_norms(table: PhaseTable, sigma_bins: float, lo_bin: int, hi_bin: int) -> np.ndarray:
    """||sticks * Gaussian(sigma)||² of each crystal over the bins lo_bin..hi_bin (lines there only)."""
    _, row, col, _ = _screen_matrix(table)
    self_overlap = _self_overlap(table, sigma_bins)
    cache = _cache(table)
    rkey = ("range", _blur_level(sigma_bins), lo_bin, hi_bin)
    if rkey not in cache:
        for old in [k for k in cache if k[0] == "range"][:-4]:  # keep a few recent ranges
            del cache[old]
        inside = (col >= lo_bin) & (col <= hi_bin)
        cache[rkey] = np.bincount(row[inside], weights=self_overlap[inside], minlength=len(table))
    return cache[rkey]


def screen(table: PhaseTable, rows: np.ndarray, tt: np.ndarray, signal: np.ndarray, wavelength: float,
           fwhm: float, zero_shift: float = 0.0, fwhm_at: float | None = None,
           variance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Matched-filter score and best lattice scale of each of ``rows`` against ``signal`` (module docstring).

    ``signal`` (the background-free scan, or the residual of a fit) is put on the absolute ln(1/d) grid and
    correlated with every crystal's sticks at every lattice scale in :data:`SCALE_RANGE`; a crystal's score is
    the squared non-negative projection over its blurred sticks' norm.  With ``variance`` (the scan's
    smoothed counts, any unit) the projection is weighted by 1/variance, as the fit's residual is: the score
    is then the weighted misfit a crystal removes when fitted alone, and lines that fall where the scan has
    no peak (low counts, high weight) cost a crystal much more than under uniform weights.  Without it, the
    signal is divided by the Lorentz-polarisation factor and weighted uniformly (the share of the signal's
    energy a crystal explains alone).
    ``fwhm_at`` is the 2θ (degrees) where ``fwhm`` was measured (default: the signal's strongest point); giving
    the same value for every screen of one scan keeps the blur, and the cached norms, the same.
    """
    mat, row_l, col_l, _ = _screen_matrix(table)
    nb = mat.shape[1]
    tt_c = tt - zero_shift
    th = np.radians(tt_c) / 2
    lnq = np.log(2 * np.sin(np.clip(th, 1e-4, None)) / wavelength)
    lp = _lp(np.clip(tt_c, 1e-2, None))
    if variance is None:
        m_data = signal / lp
    else:  # Σ over scan points of signal x template / variance; tan θ is the points' density per ln q
        var = np.maximum(variance, VARIANCE_FLOOR * max(float(variance.max()), 1e-30))
        point_weight = lp * np.tan(np.clip(th, 1e-4, None)) / var
        m_data = signal * point_weight
    # range ends on multiples of SCREEN_RANGE_BINS (inward): the cached norms and line sets serve every screen
    # of a scan, whatever the zero shift
    lo_bin = -(-(int(math.ceil((lnq[0] - _GRID_LO) / SCREEN_STEP)) + 1) // SCREEN_RANGE_BINS) * SCREEN_RANGE_BINS
    hi_bin = (int(math.floor((lnq[-1] - _GRID_LO) / SCREEN_STEP)) - 1) // SCREEN_RANGE_BINS * SCREEN_RANGE_BINS
    if hi_bin <= lo_bin:
        return np.zeros(rows.size), np.ones(rows.size)
    centres = _GRID_LO + SCREEN_STEP * np.arange(lo_bin, hi_bin + 1)
    m = np.interp(centres, lnq, m_data)
    # the peak FWHM in ln q at the strongest peak sets the blur (and the matched filter's self-overlap)
    th_i = max(float(th[int(np.argmax(signal))]) if fwhm_at is None else math.radians(fwhm_at) / 2, 1e-3)
    sigma = max(math.radians(fwhm) / 2 / math.tan(th_i) / SCREEN_STEP / 2.355, 1.0)
    from scipy.ndimage import gaussian_filter1d

    m = gaussian_filter1d(m, sigma / math.sqrt(2), mode="constant")
    if variance is None:
        norms = _screen_norms(table, sigma / math.sqrt(2), lo_bin, hi_bin)[rows]
    else:  # each line's self-overlap times the (slowly varying) weight of its bin: the weighted template norm
        self_overlap = _self_overlap(table, sigma / math.sqrt(2))
        w_grid = np.interp(centres, lnq, point_weight * lp)
        inside = (col_l >= lo_bin) & (col_l <= hi_bin)
        w_line = np.zeros(col_l.size)
        w_line[inside] = w_grid[col_l[inside] - lo_bin]
        norms = np.bincount(row_l, weights=self_overlap * w_line, minlength=len(table))[rows]
    full = np.zeros(nb + 1)
    full[lo_bin:hi_bin + 1] = m
    lo_k = int(math.floor(math.log(SCALE_RANGE[0]) / SCREEN_STEP))
    hi_k = int(math.ceil(math.log(SCALE_RANGE[1]) / SCREEN_STEP))
    ks = np.arange(lo_k, hi_k + 1, SCREEN_SHIFT_BINS)
    # scale s moves a line from bin b to b - ln(s)/step: reading the data at b - k is the same as shifting it
    src = np.arange(nb)[:, None] - ks[None, :]
    shifted = np.where((src >= lo_bin) & (src <= hi_bin), full[np.clip(src, 0, nb)], 0.0)
    sub = mat[rows]
    corr = np.asarray(sub @ shifted)
    # a line pushed out of the scan by the shift is not seen: norms over the range are an approximation
    j = corr.argmax(axis=1)
    best = corr[np.arange(rows.size), j]
    # uniform weights: a share of the signal's energy; weighted: the misfit removed (relative within one scan)
    energy = float((m * m).sum()) * math.sqrt(2 * math.pi) * sigma / math.sqrt(2) + 1e-30 if variance is None else 1.0
    score = np.where((best > 0) & (norms > 0), best**2 / np.maximum(norms, 1e-30) / energy, 0.0)
    return score, np.exp(ks[j] * SCREEN_STEP)


# ====================================================================== learned candidates
def learned_candidates(pattern: Pattern, index: Path, model: str | Path | None, table: PhaseTable,
                       allowed: np.ndarray | None, k: int = LEARNED_POOL) -> list[tuple[int, float]]:
    """(table row, cosine) of the crystals nearest to the scan in the model's latent space."""
    from mmmat.io import read_xrd_profile
    from mmmat.retrieval.api import _require, check_model, load_model, open_index

    emb = open_index(index)
    mdir = Path(model) if model is not None else Path(emb.info.get("model_path", ""))
    loaded = load_model(mdir)
    _require(loaded, "xrd")
    check_model(emb, mdir)
    import torch

    with torch.no_grad():
        q = loaded.embed("xrd", read_xrd_profile(pattern)[None]).float().cpu().numpy()[0]
    want = len(emb) if allowed is not None else k
    scores, rows = emb.search_batch(q, min(want, len(emb)))
    id_to_row = {m: i for i, m in enumerate(table.material_id.tolist())}
    allowed_set = None if allowed is None else set(allowed.tolist())
    out = []
    for s, r in zip(scores[0], rows[0]):
        if r < 0:
            continue
        row = id_to_row.get(str(emb.meta.iloc[int(r)]["material_id"]))
        if row is None or (allowed_set is not None and row not in allowed_set):
            continue
        out.append((row, float(s)))
        if len(out) >= k:
            break
    return out


def _has_xrd_model(index: Path, model: str | Path | None) -> bool:
    if model is not None:
        return True
    meta = index / "index.json"
    if not meta.is_file():
        return False
    path = json.loads(meta.read_text()).get("model_path")
    if not path or not (Path(path) / "config.json").is_file():
        return False
    cfg = json.loads((Path(path) / "config.json").read_text())
    return "xrd" in cfg.get("encoders", {})


# ====================================================================== fitting
#: Points are averaged in bins of at least this width (degrees) for the fit.
FIT_STEP = 0.025
#: Lines reach this many FWHMs in the fit (the background absorbs the far tails).
FIT_CUTOFF_FWHM = 6.0
#: Lines weaker than this fraction of a phase's strongest (after Lorentz-polarisation) are left out of the fit.
FIT_MIN_LINE = 2e-3
#: Shape parameters refined with the phases: name -> (lower, upper) bound in the refined coordinate.
_SHAPE_BOUNDS = {"zero_shift": (-0.3, 0.3), "displacement_mm": (-0.6, 0.6),
                 "W": (math.log(1e-5), math.log(0.3)), "U": (0.0, 0.1),
                 "size_nm": (math.log(5.0), math.log(1e4)), "asymmetry": (-0.3, 0.3)}
_LOG_SHAPE = ("W", "size_nm")
_ALL_SHAPE = ("zero_shift", "displacement_mm", "W", "U", "size_nm", "asymmetry")
#: Forward-difference step of each shape parameter (in its refined coordinate).
_SHAPE_STEP = {"zero_shift": 2e-3, "displacement_mm": 5e-3, "W": 0.02, "U": 5e-4, "size_nm": 0.02,
               "asymmetry": 5e-3}
_OFFSET = 10.0


class _Fitter:
    """Weighted whole-pattern fit of a set of phases (variable projection)."""

    def __init__(self, tt: np.ndarray, y: np.ndarray, pattern: Pattern, fwhm: float):
        import torch

        self.torch = torch
        step = float(np.median(np.diff(tt)))
        k = max(1, round(FIT_STEP / step))
        if k > 1:  # average neighbouring points: the fit grid stays finer than a quarter of a peak
            m = (tt.size // k) * k
            tt, y = tt[:m].reshape(-1, k).mean(1), y[:m].reshape(-1, k).mean(1)
        self.tt = tt
        self.y = y
        self.sw = np.sqrt(k / np.maximum(y, 1.0))
        self.grid = torch.as_tensor(tt, dtype=torch.float32)
        self.lam1 = float(pattern.wavelength)
        self.lam2 = float(pattern.wavelength2 or pattern.wavelength)
        self.ratio = float(pattern.ka2_ratio if pattern.ka2_ratio is not None else
                           (0.5 if pattern.wavelength2 else 0.0))
        x = 2 * (tt - tt[0]) / (tt[-1] - tt[0]) - 1
        basis = [np.ones_like(x), x]
        for _ in range(2, BACKGROUND_DEGREE + 1):
            basis.append(2 * x * basis[-1] - basis[-2])
        self.bg = np.stack(basis, axis=1)
        abg = self.bg * self.sw[:, None]  # the background's part of the normal equations, once
        self._nbg = np.sqrt((abg * abg).sum(axis=0))
        self._abg = abg / self._nbg
        self._gbg = self._abg.T @ self._abg
        self._rbg = self._abg.T @ (self.y * self.sw)
        self.shape = {"zero_shift": 0.0, "displacement_mm": 0.0, "W": fwhm**2, "U": 0.0, "size_nm": 1000.0,
                      "asymmetry": 0.0}
        self.n_eff = max((tt[-1] - tt[0]) / fwhm, 10.0)
        self._lines: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def lines(self, key: int, d: np.ndarray, inten: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A phase's lines that can reach the scan, strong enough to matter (cached by ``key``)."""
        if key not in self._lines:
            s = self.lam1 / (2 * d.astype(np.float64) * (1 - SCALE_RANGE[0] + 1))
            tt = np.degrees(2 * np.arcsin(np.clip(s, 0, 1)))
            w = np.where(s < 1, inten * _lp(np.clip(tt, 1e-3, None)), 0.0)
            keep = (s < 1) & (w >= FIT_MIN_LINE * max(float(w.max()) if w.size else 0.0, 1e-30))
            self._lines[key] = (d[keep].astype(np.float64), inten[keep].astype(np.float64))
        return self._lines[key]

    def profiles(self, lines: list[tuple[np.ndarray, np.ndarray]], scales: Sequence[float],
                 shape: dict[str, float] | None = None) -> np.ndarray:
        """(L, n) unit-scale profiles of phases given as (d, intensity) line lists at lattice ``scales``."""
        return self.profiles_batch(lines, [list(scales)], [shape or self.shape])[0]

    def profiles_batch(self, lines: list[tuple[np.ndarray, np.ndarray]], scale_sets: Sequence[Sequence[float]],
                       shapes: Sequence[dict[str, float]]) -> list[np.ndarray]:
        """Profiles of the same phases under several (lattice scales, shape) settings, rendered in one call."""
        from mmmat.xrd.instrument import InstrumentParams, bragg_profiles

        torch = self.torch
        n = len(lines)
        sets = len(scale_sets)
        width = max(1, max(ln[0].size for ln in lines))
        d0 = np.ones((n, width))
        inten = np.zeros((n, width))
        for i, (dl, il) in enumerate(lines):
            d0[i, : dl.size] = dl
            inten[i, : il.size] = il
        sc = np.asarray(scale_sets, dtype=np.float64).reshape(sets, n, 1)
        d = (d0[None] * sc).reshape(sets * n, width)
        rel = inten / np.maximum(inten.max(axis=1, keepdims=True), 1e-30)
        it = torch.as_tensor(np.tile(rel, (sets, 1)), dtype=torch.float32)

        def col(name: str, floor: float | None = None) -> Any:
            v = np.repeat([sh[name] for sh in shapes], n)
            return torch.as_tensor(v if floor is None else np.maximum(v, floor), dtype=torch.float32)

        p = InstrumentParams.fixed(sets * n, dtype=torch.float32, wavelength=self.lam1, wavelength2=self.lam2,
                                   ka2_ratio=self.ratio, W=col("W", 1e-6), U=col("U"), size_nm=col("size_nm"),
                                   asymmetry=col("asymmetry"), zero_shift=col("zero_shift"),
                                   displacement_mm=col("displacement_mm"))
        prof = bragg_profiles(torch.as_tensor(d, dtype=torch.float32), it, it > 0, p, self.grid, lp=True,
                              cutoff_fwhm=FIT_CUTOFF_FWHM)
        scale_back = np.maximum(inten.max(axis=1), 1e-30)
        out = prof.double().numpy().reshape(sets, n, -1)
        return [o.T * scale_back[None, :] for o in out]

    def solve(self, prof: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """Non-negative phase scales and free background by weighted least squares: (coef, RSS_w, fit).

        Normal equations on unit-norm columns; a phase whose scale comes out negative is dropped (set to 0)
        and the rest solved again (an active set over the phase columns).
        """
        n_ph = prof.shape[1]
        ap = prof * self.sw[:, None]
        b = self.y * self.sw
        norm_p = np.sqrt((ap * ap).sum(axis=0))
        norm_p[norm_p == 0] = 1.0
        apn = ap / norm_p
        cross = apn.T @ self._abg
        gram = np.block([[apn.T @ apn, cross], [cross.T, self._gbg]])
        rhs = np.concatenate([apn.T @ b, self._rbg])
        norm = np.concatenate([norm_p, self._nbg])
        a_cols = n_ph + self.bg.shape[1]
        active = np.ones(a_cols, dtype=bool)
        coef = np.zeros(a_cols)
        for _ in range(n_ph + 1):
            g = gram[np.ix_(active, active)] + 1e-10 * np.eye(int(active.sum()))
            coef[:] = 0.0
            coef[active] = np.linalg.solve(g, rhs[active])
            neg = np.flatnonzero(coef[:n_ph] < 0)
            if neg.size == 0:
                break
            active[neg[np.argmin(coef[neg])]] = False
        coef = coef / norm
        fit = prof @ coef[:n_ph] + self.bg @ coef[n_ph:]
        rss = float((((self.y - fit) * self.sw) ** 2).sum())
        return coef, rss, fit

    def bic(self, rss: float, n_phases: int) -> float:
        """BIC over the scan's resolution elements (module docstring)."""
        k = 2 * n_phases + BACKGROUND_DEGREE + 1
        return self.n_eff * math.log(max(rss, 1e-300) / self.y.size) + k * math.log(self.n_eff)

    def refine(self, lines: list[tuple[np.ndarray, np.ndarray]], scales: list[float], free_phases: Sequence[int],
               shape_names: Sequence[str], max_nfev: int = 4) -> tuple[list[float], float]:
        """Refine the lattice scales of ``free_phases`` and the named shape parameters (Levenberg-Marquardt).

        Each iteration renders the current setting and one forward-difference setting per parameter in a
        single batched call, solves the linear parameters of each exactly (variable projection), and takes a
        damped Gauss-Newton step within the bounds; ``max_nfev`` iterations at most.

        Returns:
            (all lattice scales, weighted RSS); the refined shape is kept in ``self.shape``.

        """
        s0 = np.array(scales, dtype=float)
        free = list(free_phases)
        names = list(shape_names)
        lo = np.array([-SCALE_REFINE] * len(free) + [_SHAPE_BOUNDS[nm][0] for nm in names])
        hi = np.array([SCALE_REFINE] * len(free) + [_SHAPE_BOUNDS[nm][1] for nm in names])
        steps = np.array([2e-4] * len(free) + [_SHAPE_STEP[nm] for nm in names])

        def unpack(v: np.ndarray) -> tuple[list[float], dict[str, float]]:
            sc = s0.copy()
            sc[free] = s0[free] * (1 + v[: len(free)])
            sh = dict(self.shape)
            for name, x in zip(names, v[len(free):]):
                sh[name] = math.exp(x) if name in _LOG_SHAPE else float(x)
            return list(sc), sh

        def residuals(settings: list[np.ndarray]) -> list[np.ndarray]:
            unpacked = [unpack(v) for v in settings]
            profs = self.profiles_batch(lines, [u[0] for u in unpacked], [u[1] for u in unpacked])
            return [(self.y - self.solve(pr)[2]) * self.sw for pr in profs]

        v = np.array([0.0] * len(free) + [math.log(self.shape[nm]) if nm in _LOG_SHAPE else self.shape[nm]
                                          for nm in names])
        v = np.clip(v, lo + 1e-9, hi - 1e-9)
        lam = 1e-2
        r = None
        for _ in range(max(1, max_nfev)):
            h = np.where(v + steps < hi, steps, -steps)
            settings = [v] + [v + np.eye(v.size)[j] * h[j] for j in range(v.size)]
            res = residuals(settings) if r is None else [r, *residuals(settings[1:])]
            r = res[0]
            jac = np.stack([(rj - r) / hj for rj, hj in zip(res[1:], h)], axis=1)
            jtj = jac.T @ jac
            g = jac.T @ r
            rss = float(r @ r)
            improved = False
            for _try in range(3):
                delta = -np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-12), g)
                v_new = np.clip(v + delta, lo, hi)
                r_new = residuals([v_new])[0]
                if float(r_new @ r_new) < rss:
                    v, r, lam, improved = v_new, r_new, lam / 3, True
                    break
                lam *= 10
            if not improved:
                break
        sc, sh = unpack(v)
        self.shape = sh
        return sc, float(r @ r)


# ====================================================================== the entry point
def identify(
    pattern: Pattern | str | Path,
    index: str | Path,
    elements: Sequence[str] | None = None,
    max_phases: int = 4,
    model: str | Path | None = None,
    wavelength: float | None = None,
    learned: bool | None = None,
    two_theta_range: tuple[float, float] | None = None,
    include_molecular: bool = False,
) -> IdentifyResult:
    """Identify the crystalline phases of a powder scan and their weight fractions (module docstring).

    Args:
        pattern: A :class:`mmmat.io.Pattern` or a pattern file.
        index: Index folder with peak tables (``mmmat index add``), optionally with crystal embeddings.
        elements: Element symbols the sample may contain; only crystals made of them are candidates.
        max_phases: Most phases reported.
        model: Model folder for the learned route (default: the index's model, when it has an xrd encoder).
        wavelength: Kα1 (or monochromatic) wavelength in Å for a file that gives none (overrides the file's).
        learned: Use the learned route (default: whenever the index has an xrd-capable model).
        two_theta_range: 2θ range to fit, degrees (default: the whole scan from 5°, up to the angle of the
            peak tables' smallest d-spacing).
        include_molecular: Keep crystals made only of H, N, O, F, Cl, noble gases and C (solid O2, H3O2, CO2:
            molecular or gas-phase solids, not expected in a scan at room conditions) as candidates.

    Returns:
        The phases found, Rwp (%), the fitted curves and the ranked candidates.

    Raises:
        InputError: unreadable pattern, no wavelength, an element list that matches no crystal, an index
            without peak tables.

    """
    import torch

    # the fit's tensors are small: one thread is fastest, and several threads spin against each other on a
    # machine busy with other work (one A-Lab scan: 40 s with 2 threads, 5 s with 1, on 2 cores at load 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _identify(pattern, index, elements, max_phases, model, wavelength, learned, two_theta_range,
                         include_molecular)
    finally:
        torch.set_num_threads(threads)


def _identify(pattern: Pattern | str | Path, index: str | Path, elements: Sequence[str] | None, max_phases: int,
              model: str | Path | None, wavelength: float | None, learned: bool | None,
              two_theta_range: tuple[float, float] | None, include_molecular: bool) -> IdentifyResult:
    """:func:`identify` on the calling thread's settings."""
    t0 = time.perf_counter()
    if not isinstance(pattern, Pattern):
        pattern = read_pattern(pattern, wavelength=wavelength)
    elif wavelength is not None:
        pattern = Pattern(pattern.two_theta, pattern.intensity, float(wavelength), None, None, pattern.source,
                          dict(pattern.meta))
    if pattern.wavelength is None:
        raise InputError(f"{pattern.source}: the file gives no wavelength; pass the Kα1 wavelength in Å "
                         "(--wavelength 1.5406 for Cu)")
    if max_phases < 1:
        raise InputError(f"max_phases must be at least 1, got {max_phases}")
    elements = _check_elements(elements)
    index = Path(index)
    table = load_table(index)
    rows = _rows_within(table, elements) if elements else np.arange(len(table))
    if not include_molecular and rows.size:
        rows = rows[~molecular_rows(table)[rows]]
    restricted = bool(elements) or not include_molecular
    if rows.size == 0:
        raise InputError(f"no crystal in {index} is made only of {', '.join(elements or [])} "
                         f"({len(table)} crystals indexed)")

    tt = np.asarray(pattern.two_theta, dtype=np.float64)
    y = np.asarray(pattern.intensity, dtype=np.float64)
    lo, hi = two_theta_range or (5.0, 180.0)
    reach = 2 * math.degrees(math.asin(min(1.0, pattern.wavelength / (2 * D_MIN))))
    hi = min(hi, reach)  # the peak tables stop at d = D_MIN
    sel = (tt >= lo) & (tt <= hi) & np.isfinite(y)
    tt, y = tt[sel], y[sel]
    if tt.size < 50:
        raise InputError(f"{pattern.source}: fewer than 50 points in the 2θ range {lo}-{hi}°")
    y = np.clip(y, 0.0, None)
    net = _net(tt, y)
    if not net.any():
        raise InputError(f"{pattern.source}: no signal above the background")
    fwhm = _fwhm_estimate(tt, net)
    fwhm_at = float(tt[int(np.argmax(net))])

    fitter = _Fitter(tt, y, pattern, fwhm)
    # the screens' signals and weights, on the fit's grid: counts smoothed over half a peak width (a rolling
    # minimum of raw counts sits below the noise, and the net signal would carry that noise everywhere)
    smooth_y = _smooth(fitter.tt, fitter.y, fwhm)
    smooth_net = np.clip(smooth_y - _background(fitter.tt, smooth_y), 0.0, None)

    def screen_scan(signal: np.ndarray, among: np.ndarray, zero_shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        return screen(table, among, fitter.tt, signal, pattern.wavelength, fwhm, zero_shift, fwhm_at=fwhm_at,
                      variance=smooth_y if (WEIGHTED_SCREEN_ELEMENTS if elements else WEIGHTED_SCREEN) else None)

    # classical route: one matched-filter pass over the background-free scan
    scores, scales = screen_scan(smooth_net, rows)
    order = np.argsort(-scores, kind="stable")
    candidates = [{"material_id": str(table.material_id[rows[i]]), "formula": str(table.formula[rows[i]]),
                   "classical_score": round(float(scores[i]), 6), "lattice_scale": round(float(scales[i]), 5)}
                  for i in order[: max(POOL * 3, 30)]]
    by_id = {c["material_id"]: c for c in candidates}

    def entry_of(row: int, lattice_scale: float) -> dict[str, Any]:
        """The candidate entry of a table row, added to the candidates when the screen did not list it."""
        mid = str(table.material_id[row])
        if mid not in by_id:
            by_id[mid] = {"material_id": mid, "formula": str(table.formula[row]), "classical_score": None,
                          "lattice_scale": round(float(lattice_scale), 5)}
            candidates.append(by_id[mid])
        return by_id[mid]

    learned_rows: dict[int, float] = {}
    use_learned = _has_xrd_model(index, model) if learned is None else learned
    if use_learned:
        scale_of_row = dict(zip(rows.tolist(), scales.tolist()))
        hits = learned_candidates(pattern, index, model, table, rows if restricted else None)
        for rank, (row, cos) in enumerate(hits, 1):
            entry = entry_of(row, scale_of_row.get(row, 1.0))
            entry["learned_rank"], entry["learned_score"] = rank, round(cos, 5)
            learned_rows[row] = float(scale_of_row.get(row, 1.0))

    lines_of: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def lines(r: int) -> tuple[np.ndarray, np.ndarray]:
        if r not in lines_of:
            lines_of[r] = fitter.lines(r, *table.peaks(r))
        return lines_of[r]

    def search(fit: np.ndarray, chosen: list[int], first: bool, among: np.ndarray | None = None) -> dict[int, float]:
        """Pool for the next phase: the best matched-filter candidates of the residual, plus the learned ones.

        ``among``: screen only these rows (and add no learned candidate).
        """
        if first and among is None:
            sc, sl = scores, scales
        else:
            signal = smooth_net if first else np.clip(_smooth(fitter.tt, fitter.y - fit, fwhm), 0.0, None)
            sc, sl = screen_scan(signal, rows if among is None else among, fitter.shape["zero_shift"])
        screened = rows if among is None else among
        pool: dict[int, float] = {}
        for i in np.argsort(-sc, kind="stable"):
            r = int(screened[i])
            if sc[i] <= 0 or len(pool) >= POOL:
                break
            if r not in chosen and lines(r)[0].size:
                pool[r] = float(sl[i])
        if among is None:
            for r, s_ in learned_rows.items():
                if r not in chosen and r not in pool and lines(r)[0].size:
                    pool[r] = s_
        return pool

    sets = _cache(table)[("sets",)] if elements else []  # filled by _rows_within

    def unexplained(chosen: list[int]) -> frozenset[str]:
        """Elements of the list that no phase of ``chosen`` holds (none without a list)."""
        return frozenset(elements).difference(*(sets[r] for r in chosen)) if elements else frozenset()

    def carrying_unexplained(chosen: list[int]) -> np.ndarray:
        """Allowed rows holding an element of the list that no phase of ``chosen`` holds (none without a list)."""
        left = unexplained(chosen)
        return rows[[bool(sets[r] & left) for r in rows]] if left else np.zeros(0, dtype=np.int64)

    allowed = np.zeros(len(table), dtype=bool)
    allowed[rows] = True

    def isostructural(row: int, chosen: list[int]) -> np.ndarray:
        """Allowed crystals of ``row``'s structure type (:func:`prototypes`), the phases kept excepted."""
        members = prototype_members(table).get(prototypes(table)[row], np.zeros(0, dtype=np.int64))
        return members[allowed[members] & ~np.isin(members, chosen)]

    def substitutes(row: int, chosen: list[int]) -> np.ndarray:
        """Allowed crystals isostructural with ``row`` (:func:`prototypes`) that hold an unexplained element."""
        left = unexplained(chosen)
        return np.array([r for r in isostructural(row, chosen).tolist() if sets[r] & left], dtype=np.int64)

    def by_coverage(tried: list[tuple[float, int, float]], chosen: list[int]) -> list[tuple[float, int, float]]:
        """Trials ordered by how many unexplained elements each crystal carries (most first), then by misfit.

        One phase explaining every element left is the simpler account of the scan than several.
        """
        left = unexplained(chosen)
        return sorted(tried, key=lambda t: (-len(sets[t[1]] & left), t[0]))

    def trials(chosen: list[int], chosen_scales: list[float], pool: dict[int, float]) -> list[tuple[float, int, float]]:
        """(weighted RSS, row, lattice scale) of the current phases plus each pool candidate, best first."""
        base = fitter.profiles([lines(r) for r in chosen], chosen_scales) if chosen else \
            np.zeros((fitter.y.size, 0))
        t_lines, t_scales, t_owner = [], [], []
        for r, s_ in pool.items():
            for f in (0.998, 1.0, 1.002):
                t_lines.append(lines(r))
                t_scales.append(s_ * f)
                t_owner.append(r)
        if not t_owner:
            return []
        prof = fitter.profiles(t_lines, t_scales)
        best: dict[int, tuple[float, int, float]] = {}
        for j, r in enumerate(t_owner):
            coef, rss_j, _ = fitter.solve(np.concatenate([base, prof[:, j:j + 1]], axis=1))
            if coef[len(chosen)] > 0 and rss_j < best.get(r, (math.inf,))[0]:
                best[r] = (rss_j, r, t_scales[j])
        return sorted(best.values())

    empty = np.zeros((fitter.y.size, 0))
    _, rss0, fit0 = fitter.solve(empty)
    bic0 = fitter.bic(rss0, 0)
    min_drop = MIN_RSS_DROP_ELEMENTS if elements else MIN_RSS_DROP

    def explains(rss_with: float, rss_without: float) -> bool:
        """Whether a phase explains at least ``min_drop`` of the weighted misfit left without it."""
        return rss_with <= (1.0 - min_drop) * rss_without

    def grow(chosen: list[int], chosen_scales: list[float], bic: float, fit: np.ndarray,
             rss: float) -> tuple[list[int], list[float], float, np.ndarray, float]:
        """Phases added greedily to ``chosen`` while the criterion holds (step 2 of the module docstring)."""
        coverage_pass = False
        while True:
            among = None
            if coverage_pass:  # the main search stopped: once more among the crystals of the unexplained elements
                among = carrying_unexplained(chosen)
                if not among.size:
                    break
            pool = search(fit, chosen, not chosen, among)
            tried = trials(chosen, chosen_scales, pool)
            if coverage_pass:
                tried = by_coverage(tried, chosen)
            if len(chosen) >= max_phases or not tried:
                if coverage_pass or not COVERAGE_SEARCH or len(chosen) >= max_phases:
                    break
                coverage_pass = True
                continue
            accepted = False
            for rss_new, row, scale in tried[:REFINED_TRIALS]:  # the best trial, refined; the next ones if it fails
                new_rows, new_scales = [*chosen, row], [*chosen_scales, scale]
                new_lines = [lines(r) for r in new_rows]
                saved = dict(fitter.shape)
                shape_names = ("zero_shift", "displacement_mm", "W") if chosen else _ALL_SHAPE
                new_scales, _ = fitter.refine(new_lines, new_scales, [len(chosen)], shape_names, max_nfev=REFINE_STEPS)
                coef, rss_new, fit_new = fitter.solve(fitter.profiles(new_lines, new_scales))
                bic_new = fitter.bic(rss_new, len(new_rows))
                if bic_new < bic - MIN_DELTA_BIC and coef[len(chosen)] > 0 and explains(rss_new, rss):
                    accepted = True
                    break
                fitter.shape = saved
            if not accepted:
                if coverage_pass or not COVERAGE_SEARCH:
                    break
                coverage_pass = True
                continue
            chosen, chosen_scales, bic, fit, rss = new_rows, new_scales, bic_new, fit_new, rss_new
            alive = [i for i in range(len(chosen)) if coef[i] > 0]
            if len(alive) < len(chosen):  # a phase the new one made redundant
                chosen = [chosen[i] for i in alive]
                chosen_scales = [chosen_scales[i] for i in alive]
                _, _, fit = fitter.solve(fitter.profiles([lines(r) for r in chosen], chosen_scales))
        return chosen, chosen_scales, bic, fit, rss

    shape0 = dict(fitter.shape)
    chosen, chosen_scales, bic, fit, rss = grow([], [], bic0, fit0, rss0)
    starts = FIRST_PHASE_STARTS_ELEMENTS if elements else FIRST_PHASE_STARTS
    if starts > 1 and chosen:
        # other first phases (of other structure types), each grown the same way; the lowest BIC wins
        best_state = (bic, chosen, chosen_scales, fit, rss, dict(fitter.shape))
        used = {prototypes(table)[r] for r in chosen[:1]}
        for _, row, scale in trials([], [], search(fit0, [], True)):
            if len(used) >= starts:
                break
            if prototypes(table)[row] in used:
                continue
            used.add(prototypes(table)[row])
            fitter.shape = dict(shape0)
            scales1, _ = fitter.refine([lines(row)], [scale], [0], _ALL_SHAPE, max_nfev=REFINE_STEPS)
            coef, rss1, fit1 = fitter.solve(fitter.profiles([lines(row)], scales1))
            bic1 = fitter.bic(rss1, 1)
            if not (bic1 < bic0 - MIN_DELTA_BIC and coef[0] > 0 and explains(rss1, rss0)):
                continue
            c1, s1, b1, f1, r1 = grow([row], list(scales1), bic1, fit1, rss1)
            if b1 < best_state[0]:
                best_state = (b1, c1, s1, f1, r1, dict(fitter.shape))
        bic, chosen, chosen_scales, fit, rss, fitter.shape = best_state
    evidence: list[float] = []
    if chosen:
        chosen_scales, _ = fitter.refine([lines(r) for r in chosen], chosen_scales, list(range(len(chosen))),
                                         _ALL_SHAPE, max_nfev=REFINE_STEPS)
    # swap check: each kept phase against the candidates of the residual without it (those that explain the
    # same peaks); one that fits better after refinement replaces it, and the others are its alternatives
    alternatives: dict[int, list[int]] = {}

    def near(rss_new: float, rss_all: float) -> bool:
        """A swap that raises the BIC by less than MIN_DELTA_BIC (phase count unchanged)."""
        return fitter.bic(rss_new, len(chosen)) - fitter.bic(rss_all, len(chosen)) < MIN_DELTA_BIC

    def swap(i: int, trial: tuple[float, int, float], rss_all: float, by_elements: bool) -> bool:
        """Replace phase i by the trial's crystal if it fits better after refinement (``by_elements``: is near)."""
        nonlocal chosen, chosen_scales
        rows_t = [*chosen[:i], trial[1], *chosen[i + 1:]]
        scales_t = [*chosen_scales[:i], trial[2], *chosen_scales[i + 1:]]
        saved = dict(fitter.shape)
        scales_t, rss_new = fitter.refine([lines(r) for r in rows_t], scales_t, [i],
                                          ("zero_shift", "displacement_mm", "W"), max_nfev=REFINE_STEPS)
        if not (near(rss_new, rss_all) if by_elements else rss_new < rss_all):
            fitter.shape = saved
            return False
        old = chosen[i]
        alternatives[trial[1]] = [old] + [r for r in alternatives.pop(old) if r != trial[1]]
        chosen, chosen_scales = rows_t, scales_t
        return True

    for i in range(len(chosen)):
        prof = fitter.profiles([lines(r) for r in chosen], chosen_scales)
        _, rss_all, _ = fitter.solve(prof)
        _, _, fit_o = fitter.solve(np.delete(prof, i, axis=1))
        others, o_scales = chosen[:i] + chosen[i + 1:], chosen_scales[:i] + chosen_scales[i + 1:]
        tried = trials(others, o_scales, search(fit_o, chosen, False))
        if PROTOTYPE_SWAP:
            iso = isostructural(chosen[i], chosen)
            if iso.size:
                seen = {t[1] for t in tried}
                tried = sorted(tried + [t for t in trials(others, o_scales, search(fit_o, chosen, False, iso))
                                        if t[1] not in seen])
        alternatives[chosen[i]] = [r for _, r, _ in tried[:SWAP_ALTERNATIVES]]
        # the best candidate replaces the phase if it fits better after refinement; with an element list, failing
        # that, the best one that explains more listed elements does if the BIC rises by less than MIN_DELTA_BIC
        # the best candidate that fits better replaces the phase; with an element list, one that would leave more
        # listed elements unexplained is passed over (it would undo what the element swaps below establish)
        best = next((t for t in tried if t[0] < rss_all and not (
            KEEP_ELEMENTS and elements
            and len(unexplained([*chosen[:i], t[1], *chosen[i + 1:]])) > len(unexplained(chosen)))), None)
        if best is not None and swap(i, best, rss_all, by_elements=False):
            continue
        if not (ELEMENT_SWAP and elements):
            continue
        left = len(unexplained(chosen))
        swapped = False
        for t in tried[:SWAP_ALTERNATIVES]:
            if len(unexplained([*chosen[:i], t[1], *chosen[i + 1:]])) < left and near(t[0], rss_all):
                swapped = swap(i, t, rss_all, by_elements=True)
                break
        if swapped or not (left and SUBSTITUTE_SWAP):
            continue
        # isostructural substitutes carrying unexplained elements, screened apart; the lattice scale the screen
        # gives them is coarse, so each within SUBSTITUTE_BIC of the fit is refined before the criterion
        subs = substitutes(chosen[i], chosen)
        if subs.size:
            for t in trials(others, o_scales, search(fit_o, chosen, False, subs)):
                if fitter.bic(t[0], len(chosen)) - fitter.bic(rss_all, len(chosen)) < SUBSTITUTE_BIC and \
                        swap(i, t, rss_all, by_elements=True):
                    break
    # backward check with the final peak shape: a phase whose removal does not raise the BIC by more than
    # MIN_DELTA_BIC goes; each kept phase's score is the BIC rise its removal would cause
    while chosen:
        prof = fitter.profiles([lines(r) for r in chosen], chosen_scales)
        _, rss_all, _ = fitter.solve(prof)
        bic_all = fitter.bic(rss_all, len(chosen))
        rise, kept = [], []
        for i in range(len(chosen)):
            _, rss_i, _ = fitter.solve(np.delete(prof, i, axis=1))
            rise.append(fitter.bic(rss_i, len(chosen) - 1) - bic_all)
            kept.append(rise[-1] > MIN_DELTA_BIC and explains(rss_all, rss_i))
        weakest = min(range(len(chosen)), key=lambda i: (kept[i], rise[i]))
        if kept[weakest]:
            evidence = rise
            break
        del chosen[weakest], chosen_scales[weakest]
    prof = fitter.profiles([lines(r) for r in chosen], chosen_scales) if chosen else np.zeros((fitter.y.size, 0))
    coef, rss, fit = fitter.solve(prof)
    # the runners-up: candidates of the final residual, ranked by how much each would lower the misfit
    ranked = []
    for rank, (_, r, s_) in enumerate(trials(chosen, chosen_scales, search(fit, chosen, not chosen)), 1):
        entry = entry_of(r, s_)
        entry["residual_rank"] = rank
        ranked.append(entry["material_id"])
    # the coverage candidates: the crystals of elements still unexplained that would lower the misfit most
    coverage = []
    among = carrying_unexplained(chosen)
    if among.size and COVERAGE_CANDIDATES > 0:
        tried = by_coverage(trials(chosen, chosen_scales, search(fit, chosen, not chosen, among)), chosen)
        coverage = [entry_of(r, s_)["material_id"] for _, r, s_ in tried[:COVERAGE_CANDIDATES]]
    tt, y = fitter.tt, fitter.y
    n = len(chosen)
    background = fitter.bg @ coef[n:]
    mass_vol = np.array([table.mass[r] * table.volume[r] for r in chosen])
    wf = coef[:n] * mass_vol
    wf = wf / wf.sum() if n and wf.sum() > 0 else wf
    w = 1.0 / np.maximum(y, 1.0)
    rwp = 100.0 * math.sqrt(float((w * (y - fit) ** 2).sum()) / float((w * y * y).sum()))
    phases = [PhaseHit(str(table.material_id[r]), str(table.formula[r]), int(table.spacegroup[r]), float(wf[i]),
                       float(chosen_scales[i]), float(evidence[i])) for i, r in enumerate(chosen)]
    contributions = {str(table.material_id[r]): prof[:, i] * coef[i] for i, r in enumerate(chosen)}
    return IdentifyResult(
        phases=phases, rwp=rwp, two_theta=tt, measured=y, fitted=fit, residual=y - fit, background=background,
        contributions=contributions, candidates=candidates, runners_up=ranked, coverage=coverage,
        wavelength=float(pattern.wavelength),
        alternatives={str(table.material_id[r]): [str(table.material_id[a]) for a in alternatives.get(r, [])]
                      for r in chosen},
        source=pattern.source, instrument={k: float(v) for k, v in fitter.shape.items()},
        seconds=time.perf_counter() - t0,
    )
