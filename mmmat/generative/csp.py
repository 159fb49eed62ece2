"""Crystal structure prediction: template retrieval and substitution, flow refinement, ranking.

    lib = TemplateLibrary.from_records(train_records)
    csp = CSPPipeline(lib, flow=load_generator("runs/generate/model").flow, energy=chgnet_energy())
    predictions = csp.predict(["Na4Cl4", "Ca4Ti4O12"])          # one list of ranked candidates per formula

Methods (``method=``):

* ``template``: the substituted template of lowest substitution cost (:mod:`mmmat.generative.templates`).
* ``flow``: the generator alone, from noise (no templates).
* ``pipeline`` (default): the ``k`` cheapest templates, each also refined by the generator (the flow restarted
  at ``t_start`` from the template; a retrieval-augmented generator, ``template_k > 0``, sees the templates as
  context too), all ranked by the learned re-ranker (:class:`TemplateRanker`) when one is given, else by an
  energy per atom (any callable, e.g. :func:`chgnet_energy`), else by template consensus
  (:func:`~mmmat.generative.templates.consensus_rank`).  A composition without a template gets a flow sample.

With ``space_group`` only templates of that space group are kept (spglib, 0.01 Å), their refinements are
projected back onto it, and a flow sample starts from a random crystal on the group's Wyckoff positions instead
of noise, its result projected back onto the group (:mod:`mmmat.generative.symmetry`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmmat.generative.templates import TemplateLibrary, consensus_rank, counts_of, group_candidates

#: StructureMatcher tolerances of CSP matching (CDVAE / DiffCSP).
MATCHER = {"stol": 0.5, "angle_tol": 10, "ltol": 0.3}
METHODS = ("pipeline", "template", "flow")
#: Symmetry tolerance (Å) when templates are checked against a requested space group.
SYMPREC = 0.01
EnergyFn = Callable[[list], Sequence[float]]


@dataclass
class Candidate:
    """One predicted structure with where it came from and its ranking inputs.

    ``source`` is ``template``, ``refined``, ``flow`` or ``symmetry``; ``cost`` the substitution cost of its
    template (inf without one); ``energy`` eV/atom from the ranking energy (NaN when not computed);
    ``score`` the ranker's score where one ranked it.
    """

    structure: Any
    source: str
    template_id: str | None = None
    cost: float = math.inf
    e_above_hull: float = math.inf
    rank: int = 0
    group: int = 0
    energy: float = math.nan
    score: float = math.nan
    n_templates: int = 0
    info: dict = field(default_factory=dict)


def parse_cell(composition: Any) -> dict[str, int]:
    """Atoms per element of a cell: from a Structure, pymatgen Composition or formula (``Na4Cl4`` is 8 atoms)."""
    from pymatgen.core import Composition

    if hasattr(composition, "lattice"):
        return counts_of(composition)
    try:
        comp = Composition(composition)
    except Exception as exc:
        raise ValueError(f"cannot read the composition {composition!r}: {exc}") from None
    out = {el.symbol: int(round(v)) for el, v in comp.items()}
    if not out or any(abs(v - round(v)) > 1e-6 or v <= 0 for v in comp.values()):
        raise ValueError(f"composition {composition!r} must have whole positive atom counts per cell")
    return out


def chgnet_energy(device: str | None = None, batch_size: int = 32, threads: int | None = None) -> EnergyFn:
    """Single-point CHGNet energy per atom (eV/atom) through the evaluation code; NaN where CHGNet fails."""

    def energy(structures: list) -> list[float]:
        from mmmat.evaluation.generation_stability import chgnet_energies

        if not structures:
            return []
        e, _ = chgnet_energies(structures, relax=False, device=device, batch_size=batch_size, threads=threads)
        return np.asarray(e, dtype=float).tolist()

    return energy


FEATURES = ["cost", "cost_gap", "rank", "e_hull", "group_weight", "group_size", "group_head", "energy_gap",
            "energy_rank", "log_templates", "n_candidates"]


def candidate_features(costs: Sequence[float], groups: Sequence[int], e_hull: Sequence[float],
                       energy: Sequence[float], n_templates: int, tau: float = 0.5) -> np.ndarray:
    """(k, F) features of one composition's k template candidates (:data:`FEATURES`); none looks at a truth.

    Substitution cost and its gap to the best, rank, the template's e_above_hull (capped at 1 eV/atom), the
    weight and size of its consensus group, whether it heads the group, energy per atom minus the lowest and
    its rank, log(1 + templates available) and k.
    """
    c = np.asarray(costs, dtype=float)
    k = len(c)
    w = np.exp(-(c - c.min()) / tau)
    g = np.asarray(groups)
    gw = np.array([w[g == x].sum() for x in g]) / w.sum()
    gs = np.array([(g == x).sum() for x in g], dtype=float)
    head = np.array([float(i == int(np.flatnonzero(g == g[i])[0])) for i in range(k)])
    e = np.asarray(energy, dtype=float)
    e = np.where(np.isfinite(e), e, np.nanmax(e) + 1.0 if np.isfinite(e).any() else 0.0)
    eh = np.asarray([min(x, 1.0) if np.isfinite(x) else 1.0 for x in e_hull], dtype=float)
    return np.stack([
        c, c - c.min(), np.arange(k) / max(k - 1, 1), eh, gw, gs, head, e - e.min(),
        np.argsort(np.argsort(e)) / max(k - 1, 1), np.full(k, math.log1p(n_templates)), np.full(k, k),
    ], axis=1)


class TemplateRanker:
    """Learned re-ranker of template candidates: gradient boosting on (features -> matches the true structure).

    Trained on materials of the training split whose candidates come from the rest of it (leave-one-out);
    the candidate of highest predicted probability is the prediction.  ``threads``: OpenMP threads of
    scikit-learn while fitting and scoring.
    """

    def __init__(self, seed: int = 0, tau: float = 0.5, max_iter: int = 300, threads: int = 1):
        from sklearn.ensemble import HistGradientBoostingClassifier

        self.tau, self.threads = tau, threads
        self.model = HistGradientBoostingClassifier(max_iter=max_iter, learning_rate=0.05, max_leaf_nodes=15,
                                                    l2_regularization=1.0, random_state=seed)

    def fit(self, features: Sequence[np.ndarray], matched: Sequence[Sequence[bool]]) -> TemplateRanker:
        """Fit on per-material feature arrays (k, F) and whether each candidate matched its truth."""
        X = np.concatenate([f for f in features if len(f)])
        y = np.concatenate([np.asarray(m, dtype=int) for m, f in zip(matched, features) if len(f)])
        if len(set(y.tolist())) < 2:
            raise ValueError("the re-ranker needs both matching and non-matching candidates to learn from")
        from threadpoolctl import threadpool_limits

        with threadpool_limits(self.threads):  # OpenMP threads of a small fit only contend on a busy machine
            self.model.fit(X, y)
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        """Probability that each candidate matches (higher is better)."""
        from threadpoolctl import threadpool_limits

        with threadpool_limits(self.threads):
            return self.model.predict_proba(features)[:, 1]


class CSPPipeline:
    """Crystal structure prediction by templates, flow refinement and ranking (see the module docstring).

    Args:
        library: Template library (None: the flow alone).
        flow: A :class:`~mmmat.generative.flow.CrystalFlow` for refinement and fall-back (None: templates only).
        k: Templates retrieved per composition.
        refine: Refine every template with the flow (pipeline method, needs ``flow``).
        t_start: Flow time at which a template (or a Wyckoff-constrained start) enters.
        steps: Integration steps over the whole [0, 1] flow time (a refinement from ``t_start`` takes
            ``round(steps * (1 - t_start))`` of them, at least 1).
        coord_anneal: Coordinate velocity scaling of the flow sampler.
        energy: Callable structures -> energies (eV/atom) ranking the candidates (None: no energy).
        ranker: Fitted :class:`TemplateRanker` (None: rank by energy, else by consensus).
        tau: Consensus temperature when neither ranker nor energy ranks (0: plain substitution cost).
        batch_size: Flow samples per batch.
        workers: Processes that retrieve and group templates (fork; 1: this process).
    """

    def __init__(self, library: TemplateLibrary | None = None, flow: Any = None, k: int = 5, refine: bool = True,
                 t_start: float = 0.8, steps: int = 100, coord_anneal: float = 0.0, energy: EnergyFn | None = None,
                 ranker: TemplateRanker | None = None, tau: float = 0.0, batch_size: int = 512, workers: int = 1):
        self.library, self.flow, self.k, self.refine = library, flow, int(k), refine
        self.t_start, self.steps, self.coord_anneal = float(t_start), int(steps), float(coord_anneal)
        self.energy, self.ranker, self.tau, self.batch_size = energy, ranker, float(tau), int(batch_size)
        self.workers = int(workers)

    # ------------------------------------------------------------------ pieces
    def templates(self, composition: Any, exclude: Sequence[str] = ()) -> list[Candidate]:
        """The ``k`` cheapest substituted templates of a composition, grouped by mutual StructureMatcher fit."""
        if self.library is None:
            return []
        cands = self.library.candidates(composition, self.k, exclude=exclude)
        if not cands:
            return []
        n = self.library.count(composition, exclude=exclude)
        groups = group_candidates([c.structure for c in cands], **MATCHER)
        return [Candidate(c.structure, "template", c.template_id, c.cost, c.e_above_hull, r, g, n_templates=n)
                for r, (c, g) in enumerate(zip(cands, groups))]

    def _templates_many(self, cells: list[dict[str, int]], excl: list) -> list[list[Candidate]]:
        jobs = [(c, tuple(e)) for c, e in zip(cells, excl)]
        if self.workers <= 1 or len(jobs) < 2 * self.workers:
            return [self.templates(c, e) for c, e in jobs]
        from multiprocessing import get_context

        global _POOL_PIPE
        _POOL_PIPE = self
        try:
            with get_context("fork").Pool(self.workers) as pool:
                return pool.map(_templates_job, jobs, chunksize=8)
        finally:
            _POOL_PIPE = None

    def _flow_samples(self, cells: list[dict[str, int]], seed: int, starts: list | None = None,
                      context: list | None = None, space_group: int | None = None) -> list:
        """One flow sample per cell, from noise or from ``starts`` at ``t_start``; Wyckoff-constrained with a group."""
        from mmmat.generative.api import sample_structures

        ops = None
        if space_group is not None:
            from mmmat.generative.symmetry import operations_with_permutations, random_symmetric

            starts = [random_symmetric(c, space_group, seed=seed + i) for i, c in enumerate(cells)]
            ops = [operations_with_permutations(s) for s in starts]
        if starts is not None:
            z = [int(x) for s in starts for x in s.atomic_numbers]
            counts = [len(s) for s in starts]
        else:
            counts = [sum(c.values()) for c in cells]
            z = [_z(e) for c in cells for e in sorted(c) for _ in range(c[e])]
        if self.flow is None:
            out = list(starts) if starts is not None else [None] * len(cells)
        else:
            t0 = self.t_start if starts is not None else 0.0
            steps = max(1, round(self.steps * (1.0 - t0)))
            out = sample_structures(self.flow, counts, z, None, steps=steps, coord_anneal=self.coord_anneal,
                                    seed=seed, batch_size=self.batch_size, start=starts, t_start=t0,
                                    context=context)
        if ops is not None:
            from mmmat.generative.symmetry import project

            out = [None if s is None else project(s, o) for s, o in zip(out, ops)]
        return out

    def add_energies(self, cands: Sequence[Candidate]) -> None:
        """Fill in the ranking energy (eV/atom) of candidates that have none, in one call of ``energy``."""
        todo = [c for c in cands if math.isnan(c.energy) and c.structure is not None]
        if self.energy is not None and todo:
            for c, e in zip(todo, self.energy([c.structure for c in todo])):
                c.energy = float(e)

    def features(self, cands: Sequence[Candidate]) -> np.ndarray:
        """Re-ranker features (:func:`candidate_features`) of one composition's candidates."""
        return candidate_features([c.cost for c in cands], [c.group for c in cands], [c.e_above_hull for c in cands],
                                  [c.energy for c in cands], cands[0].n_templates if cands else 0,
                                  self.ranker.tau if self.ranker is not None else 0.5)

    def rank(self, cands: list[Candidate]) -> list[Candidate]:
        """Candidates best first: learned ranker, else energy, else consensus over the template candidates."""
        return self._rank(list(cands))

    def _rank(self, cands: list[Candidate]) -> list[Candidate]:
        if len(cands) <= 1:
            return cands
        self.add_energies(cands)
        if self.ranker is not None:
            for c, s in zip(cands, self.ranker.score(self.features(cands))):
                c.score = float(s)
            return sorted(cands, key=lambda c: (-c.score, c.cost))
        if self.energy is not None:
            return sorted(cands, key=lambda c: (c.energy if math.isfinite(c.energy) else math.inf, c.cost))
        order = consensus_rank([c.cost for c in cands], [c.group for c in cands], self.tau)
        return [cands[i] for i in order]

    # ------------------------------------------------------------------ prediction
    def predict(self, compositions: Sequence[Any], method: str = "pipeline", seed: int = 0,
                exclude: Sequence[Sequence[str]] | None = None, space_group: int | None = None,
                ranked: bool = True) -> list[list[Candidate]]:
        """Ranked candidates (best first; empty where nothing could be built) for each composition.

        Args:
            compositions: Cell formulas, pymatgen Compositions or Structures (their cell content).
            method: ``pipeline``, ``template`` or ``flow``.
            seed: Seed of the flow's noise.
            exclude: Per composition, template ids to leave out (leave-one-out over the library).
            space_group: Constrain flow samples to this space group (1-230); needs pyxtal.
            ranked: Rank the pipeline's candidates (False: templates then refinements, in cost order).
        """
        if method not in METHODS:
            raise ValueError(f"method {method!r} is not one of {METHODS}")
        if method in ("pipeline", "template") and self.library is None:
            raise ValueError(f"method {method!r} needs a template library")
        if method == "flow" and self.flow is None and space_group is None:
            raise ValueError("method 'flow' needs a generator")
        cells = [parse_cell(c) for c in compositions]
        excl = list(exclude) if exclude is not None else [()] * len(cells)
        if method == "flow":
            out = self._flow_samples(cells, seed, space_group=space_group)
            return [[Candidate(s, "symmetry" if space_group else "flow")] if s is not None else [] for s in out]
        per = self._templates_many(cells, excl)
        if space_group is not None:  # only templates of the requested space group
            from mmmat.generative.symmetry import space_group_number

            per = [[c for c in p if space_group_number(c.structure, SYMPREC) == space_group] for p in per]
        if method == "template":
            return [[min(p, key=lambda c: c.rank)] if p else [] for p in per]
        # pipeline: refinements of every template (with their templates as context), fall-back samples
        if self.flow is not None and self.refine:
            flat = [c for p in per for c in p]
            if flat:
                starts = [c.structure.get_reduced_structure() for c in flat]
                context = None
                if getattr(self.flow, "template_k", 0):
                    context = [[x.structure for x in p] for p in per for _ in p]
                ref = self._flow_samples([counts_of(s) for s in starts], seed + 1, starts=starts, context=context)
                if space_group is not None:  # refinements projected back onto their template's group
                    from mmmat.generative.symmetry import operations_with_permutations, project

                    ref = [None if r is None else project(r, operations_with_permutations(s, SYMPREC))
                           for r, s in zip(ref, starts)]
                it = iter(ref)
                for p in per:
                    extra = []
                    for c in p:
                        s = next(it)
                        if s is not None:
                            extra.append(Candidate(s, "refined", c.template_id, c.cost, c.e_above_hull, c.rank,
                                                   c.group, n_templates=c.n_templates))
                    p.extend(extra)
        missing = [i for i, p in enumerate(per) if not p]
        if missing and (self.flow is not None or space_group is not None):
            fb = self._flow_samples([cells[i] for i in missing], seed, space_group=space_group)
            for i, s in zip(missing, fb):
                if s is not None:
                    per[i] = [Candidate(s, "symmetry" if space_group else "flow")]
        return [self._rank(p) for p in per] if ranked else per


_POOL_PIPE: CSPPipeline | None = None


def _templates_job(job: tuple) -> list[Candidate]:
    import warnings

    warnings.simplefilter("ignore")
    return _POOL_PIPE.templates(*job)


def best(predictions: list[list[Candidate]]) -> list[Any]:
    """The top structure of each composition's ranked candidates (None where there is none)."""
    return [p[0].structure if p else None for p in predictions]


def _z(symbol: str) -> int:
    from pymatgen.core import Element

    return int(Element(symbol).Z)
