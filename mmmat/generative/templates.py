"""Structure templates by element substitution: the no-learning CSP baseline and the generator's starting points.

For a target composition with N atoms in the cell, the candidate templates are the reference crystals with
the same anonymized formula (pymatgen ``Composition.anonymized_formula``, e.g. ``ABC3``) and the same N.
The cost of a template is the smallest, over the assignments of the target's elements to the template's
elements with the same count in the cell, of Σ |Δχ|/σχ + |Δr|/σr (Pauling electronegativity χ, pymatgen's
empirical atomic radius r in Å, σ their standard deviations over the reference's elements).  Templates are
ranked by cost, ties by lower ``e_above_hull``, then by id.  A template is used by substituting the target's
elements and rescaling its volume by Σ r_new³ / Σ r_old³ over the sites.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def element_table(symbols: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Pauling electronegativity and atomic radius (Å) per element; a missing value gets the mean."""
    from pymatgen.core import Element

    chi, rad = {}, {}
    for s in symbols:
        el = Element(s)
        x = el.X
        r = el.atomic_radius or el.atomic_radius_calculated
        chi[s] = float(x) if x is not None and not math.isnan(float(x)) else math.nan
        rad[s] = float(r) if r is not None else math.nan
    for d in (chi, rad):
        vals = [v for v in d.values() if not math.isnan(v)]
        m = float(np.mean(vals)) if vals else 1.0
        for k, v in d.items():
            if math.isnan(v):
                d[k] = m
    return chi, rad


def counts_of(struct: Any) -> dict[str, int]:
    """Atoms per element symbol in a structure's cell."""
    c: dict[str, int] = defaultdict(int)
    for site in struct:
        c[site.specie.symbol] += 1
    return dict(c)


def best_assignment(
    target: dict[str, int], template: dict[str, int], chi: dict[str, float], rad: dict[str, float],
    s_chi: float, s_rad: float,
) -> tuple[float, dict[str, str] | None]:
    """Lowest-cost map template element -> target element among elements with equal counts in the cell."""
    by_count_t: dict[int, list[str]] = defaultdict(list)
    by_count_s: dict[int, list[str]] = defaultdict(list)
    for e, n in target.items():
        by_count_t[n].append(e)
    for e, n in template.items():
        by_count_s[n].append(e)
    if sorted((n, len(v)) for n, v in by_count_t.items()) != sorted((n, len(v)) for n, v in by_count_s.items()):
        return math.inf, None
    total, mapping = 0.0, {}
    for n, tels in by_count_t.items():
        sels = by_count_s[n]
        best, best_map = math.inf, None
        for perm in itertools.permutations(sels):
            cost = sum(abs(chi[t] - chi[s]) / s_chi + abs(rad[t] - rad[s]) / s_rad for t, s in zip(tels, perm))
            if cost < best - 1e-12:
                best, best_map = cost, dict(zip(perm, tels))
        total += best
        mapping.update(best_map or {})
    return total, mapping


def substitute(template: Any, mapping: dict[str, str], rad: dict[str, float], rescale: bool = True) -> Any:
    """The template with its elements replaced by ``mapping`` and its volume rescaled by the radii."""
    from pymatgen.core import Structure

    species = [mapping[site.specie.symbol] for site in template]
    s = Structure(template.lattice, species, template.frac_coords)
    if rescale:
        old = sum(rad[site.specie.symbol] ** 3 for site in template)
        new = sum(rad[e] ** 3 for e in species)
        s.scale_lattice(template.volume * new / old)
    return s


@dataclass
class Template:
    """One ranked template for a target: its cost, id, e_above_hull and the substituted structure."""

    cost: float
    template_id: str
    e_above_hull: float
    structure: Any


class TemplateLibrary:
    """Reference crystals indexed by (anonymized formula, atoms in the cell).

    Args:
        structures: Reference structures (for example the training split).
        ids: Their ids.
        e_above_hull: Optional energies above hull (eV/atom) for tie-breaking.
        rescale: Rescale substituted volumes by the atomic radii.
    """

    def __init__(self, structures: Sequence[Any], ids: Sequence[str], e_above_hull: Sequence[float] | None = None,
                 rescale: bool = True):
        self.structures = list(structures)
        self.ids = [str(i) for i in ids]
        self.e_hull = [math.inf if e is None or math.isnan(float(e)) else float(e)
                       for e in (e_above_hull if e_above_hull is not None else [math.nan] * len(self.ids))]
        self.rescale = rescale
        self.counts = [counts_of(s) for s in self.structures]
        self.index: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i, s in enumerate(self.structures):
            self.index[(s.composition.anonymized_formula, len(s))].append(i)
        syms = sorted({e for c in self.counts for e in c})
        self.chi, self.rad = element_table(syms)
        self.s_chi = float(np.std([self.chi[e] for e in syms])) or 1.0
        self.s_rad = float(np.std([self.rad[e] for e in syms])) or 1.0

    @classmethod
    def from_records(cls, records: Sequence[Any], rescale: bool = True) -> TemplateLibrary:
        """Build from :class:`~mmmat.data.schema.MaterialRecord` objects."""
        return cls([r.to_structure() for r in records], [r.material_id for r in records],
                   [r.properties.get("e_above_hull", math.nan) for r in records], rescale)

    def _tables(self, target: dict[str, int]) -> None:
        missing = [e for e in target if e not in self.chi]
        if missing:
            chi, rad = element_table(missing)
            self.chi.update(chi)
            self.rad.update(rad)

    def count(self, composition: Any, exclude: Sequence[str] = ()) -> int:
        """How many library crystals share the composition's anonymized formula and atom count."""
        from pymatgen.core import Composition

        target = counts_of(composition) if hasattr(composition, "lattice") else {
            el.symbol: int(round(v)) for el, v in Composition(composition).items()}
        key = (Composition(target).anonymized_formula, sum(target.values()))
        skip = set(exclude)
        return sum(self.ids[j] not in skip for j in self.index.get(key, []))

    def candidates(
        self, composition: Any, k: int = 1, num_atoms: int | None = None, exclude: Sequence[str] = ()
    ) -> list[Template]:
        """The ``k`` best templates for a composition (a Structure, pymatgen Composition or formula string).

        A formula is taken as the cell's content (``Na4Cl4`` is 8 atoms) unless ``num_atoms`` scales it.
        Templates whose id is in ``exclude`` are skipped (leave-one-out over the library's own materials).
        """
        from pymatgen.core import Composition

        if hasattr(composition, "composition") and hasattr(composition, "lattice"):
            target = counts_of(composition)
        else:
            comp = Composition(composition)
            if num_atoms is not None:
                comp = comp * (num_atoms / comp.num_atoms)
            target = {el.symbol: int(round(v)) for el, v in comp.items()}
        n = sum(target.values())
        anon = Composition(target).anonymized_formula
        self._tables(target)
        scored = []
        skip = set(exclude)
        for j in self.index.get((anon, n), []):
            if self.ids[j] in skip:
                continue
            cost, mapping = best_assignment(target, self.counts[j], self.chi, self.rad, self.s_chi, self.s_rad)
            if mapping is not None:
                scored.append((round(cost, 9), self.e_hull[j], self.ids[j], j, mapping))
        scored.sort(key=lambda x: x[:3])
        return [
            Template(c, tid, eh, substitute(self.structures[j], m, self.rad, self.rescale))
            for c, eh, tid, j, m in scored[:k]
        ]


def group_candidates(
    structures: Sequence[Any], stol: float = 0.5, ltol: float = 0.3, angle_tol: float = 10.0
) -> list[int]:
    """Group structures that match each other: the group index of each, groups numbered in input order.

    Greedy: each structure joins the first group whose first member it matches (pymatgen StructureMatcher with
    the given tolerances), else starts a group. Given candidates in order of cost, every group's first member
    is its cheapest.
    """
    from pymatgen.analysis.structure_matcher import StructureMatcher

    sm = StructureMatcher(stol=stol, ltol=ltol, angle_tol=angle_tol)
    heads: list[int] = []
    out: list[int] = []
    for i, s in enumerate(structures):
        for g, h in enumerate(heads):
            try:
                same = sm.fit(structures[h], s)
            except Exception:  # noqa: BLE001 - a comparison pymatgen cannot make is no match
                same = False
            if same:
                out.append(g)
                break
        else:
            heads.append(i)
            out.append(len(heads) - 1)
    return out


def consensus_rank(costs: Sequence[float], groups: Sequence[int], tau: float) -> list[int]:
    """Candidate indices ranked by template consensus.

    Each candidate weighs ``exp(-(cost - lowest cost) / tau)``; a group of matching candidates scores the sum
    of its weights. Groups rank by score (ties: lower cost), candidates within a group by cost. ``tau = 0``
    keeps the plain cost order (the substitution baseline); a large ``tau`` is a majority vote among the
    candidates.

    Args:
        costs: Substitution cost of each candidate.
        groups: Group index of each candidate (:func:`group_candidates`).
        tau: Temperature of the weights, in units of cost.
    """
    order = sorted(range(len(costs)), key=lambda i: (costs[i], i))
    if tau <= 0 or not costs:
        return order
    c0 = min(costs)
    score: dict[int, float] = defaultdict(float)
    first: dict[int, float] = {}
    for i in order:
        score[groups[i]] += math.exp(-(costs[i] - c0) / tau)
        first.setdefault(groups[i], costs[i])
    ranked = sorted(score, key=lambda g: (-score[g], first[g]))
    pos = {g: r for r, g in enumerate(ranked)}
    return sorted(order, key=lambda i: (pos[groups[i]], costs[i], i))
