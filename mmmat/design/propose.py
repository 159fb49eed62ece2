"""Proposal sources: the conditional generator, template substitution, and mutations of the best so far.

Chemical similarity between elements is Pettifor's Mendeleev number M (pymatgen ``Element.mendeleev_no``): an
element ``a`` is replaced by ``b`` with weight exp(-|M_a - M_b| / w), times 0.2 when the two share no common
oxidation state. A template substitution takes a known crystal, maps its elements one-to-one onto allowed
elements (required ones first, each onto the most similar template element) and rescales the volume by the
atomic radii (:func:`mmmat.generative.templates.substitute`). Mutations replace one element of a parent by a
similar one, or strain its lattice by a random symmetric strain (components up to ``max_strain``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

NOBLE_GASES = frozenset({"He", "Ne", "Ar", "Kr", "Xe", "Rn"})
#: Elements never proposed by default: noble gases, Tc, Pm and everything after Bi.
EXCLUDED = NOBLE_GASES | {"Tc", "Pm"}


@lru_cache(maxsize=256)
def _element_info(sym: str) -> tuple[float, frozenset]:
    from pymatgen.core import Element

    el = Element(sym)
    return float(el.mendeleev_no or el.Z), frozenset(el.common_oxidation_states or ())


def similarity(a: str, b: str, width: float = 4.0) -> float:
    """Chemical similarity of two elements in (0, 1] (see the module docstring)."""
    ma, oa = _element_info(a)
    mb, ob = _element_info(b)
    w = float(np.exp(-abs(ma - mb) / width))
    return w if (oa & ob) else 0.2 * w


def default_allowed(elements: Sequence[str]) -> list[str]:
    """Elements of ``elements`` that proposals may use by default (no noble gases, Tc, Pm, Z > 83)."""
    from pymatgen.core import Element

    return sorted(e for e in set(elements) if e not in EXCLUDED and Element(e).Z <= 83)


def in_family(structure, chem) -> str | None:
    """None when the structure satisfies a :class:`~mmmat.design.config.ChemistryConfig`, else the reason."""
    els = {el.symbol for el in structure.composition.elements}
    if chem.allowed and not els <= set(chem.allowed):
        return "outside_family"
    if not set(chem.required) <= els:
        return "outside_family"
    if any(not (els & set(g)) for g in chem.required_any):
        return "outside_family"
    if len(els) > chem.max_elements or len(structure) > chem.max_atoms:
        return "outside_family"
    return None


def _pick(rng: np.random.Generator, options: Sequence[str], weights: Sequence[float]) -> str | None:
    w = np.asarray(weights, dtype=float)
    if not len(options) or w.sum() <= 0:
        return None
    return str(options[rng.choice(len(options), p=w / w.sum())])


def substitution_map(template_elements: Sequence[str], allowed: Sequence[str], chem, rng: np.random.Generator,
                     width: float = 4.0, keep: float = 0.3) -> dict[str, str] | None:
    """A one-to-one map of a template's elements onto allowed elements that meets the family constraints."""
    tels = list(template_elements)
    mapping: dict[str, str] = {}
    used: set[str] = set()
    needs = [[r] for r in chem.required] + [list(g) for g in chem.required_any]
    for group in needs:
        if any(g in used for g in group):
            continue
        free = [t for t in tels if t not in mapping]
        if not free:
            return None
        opts = [g for g in group if g not in used]
        if not opts:
            return None
        # the (template element, group member) pair of highest similarity, sampled by weight
        pairs = [(t, g) for t in free for g in opts]
        w = [similarity(t, g, width) for t, g in pairs]
        k = rng.choice(len(pairs), p=np.asarray(w) / np.sum(w))
        t, g = pairs[k]
        mapping[t] = g
        used.add(g)
    pool = [a for a in allowed if a not in used]
    for t in rng.permutation(tels):
        t = str(t)
        if t in mapping:
            continue
        if t in pool and t not in used and rng.random() < keep:
            mapping[t] = t
            used.add(t)
            continue
        opts = [a for a in pool if a not in used]
        choice = _pick(rng, opts, [similarity(t, a, width) for a in opts])
        if choice is None:
            return None
        mapping[t] = choice
        used.add(choice)
    if all(k == v for k, v in mapping.items()):
        return None
    return mapping


def template_proposals(templates: Sequence[Any], n: int, allowed: Sequence[str], chem,
                       rng: np.random.Generator, width: float = 4.0) -> list[tuple[Any, str]]:
    """``n`` template substitutions: ``(structure, template id)``."""
    from mmmat.generative.templates import element_table, substitute

    need = len(chem.required) + len(chem.required_any)
    pool = [i for i, (s, _) in enumerate(templates)
            if need <= len(s.composition.elements) <= chem.max_elements and len(s) <= chem.max_atoms]
    out: list[tuple[Any, str]] = []
    if not pool:
        return out
    _, rad = element_table(sorted(set(allowed) | {e.symbol for s, _ in templates for e in s.composition.elements}))
    tries = 0
    while len(out) < n and tries < 20 * n:
        tries += 1
        s, tid = templates[pool[rng.integers(len(pool))]]
        m = substitution_map([e.symbol for e in s.composition.elements], allowed, chem, rng, width)
        if m is None:
            continue
        try:
            out.append((substitute(s, m, rad), tid))
        except Exception:  # noqa: BLE001 - a substitution pymatgen cannot build is skipped
            continue
    return out


def strain(structure, max_strain: float, rng: np.random.Generator):
    """The structure with its lattice strained by a random symmetric strain (fractional coordinates kept)."""
    from pymatgen.core import Lattice, Structure

    e = rng.uniform(-max_strain, max_strain, (3, 3))
    e = 0.5 * (e + e.T)
    lat = Lattice(structure.lattice.matrix @ (np.eye(3) + e))
    return Structure(lat, structure.species, structure.frac_coords)


def mutations(parents: Sequence[tuple[Any, str]], n: int, allowed: Sequence[str], chem, rng: np.random.Generator,
              max_strain: float = 0.04, strain_share: float = 0.3, width: float = 4.0) -> list[tuple[Any, str]]:
    """``n`` mutations of ``parents`` (``(structure, id)``): element substitutions and lattice strains."""
    from mmmat.generative.templates import element_table

    out: list[tuple[Any, str]] = []
    if not parents:
        return out
    _, rad = element_table(sorted(set(allowed) | {e.symbol for s, _ in parents for e in s.composition.elements}))
    tries = 0
    while len(out) < n and tries < 20 * n:
        tries += 1
        s, pid = parents[rng.integers(len(parents))]
        if rng.random() < strain_share:
            out.append((strain(s, max_strain, rng), pid))
            continue
        els = [e.symbol for e in s.composition.elements]
        protected = set(chem.required)
        for g in chem.required_any:
            present = [e for e in els if e in g]
            if len(present) == 1:
                protected.add(present[0])
        free = [e for e in els if e not in protected]
        if not free:
            continue
        old = free[rng.integers(len(free))]
        group = next((g for g in chem.required_any if old in g), None)
        opts = [a for a in (group or allowed) if a not in els and (not chem.allowed or a in chem.allowed)]
        new = _pick(rng, opts, [similarity(old, a, width) for a in opts])
        if new is None:
            continue
        from mmmat.generative.templates import substitute

        out.append((substitute(s, {e: (new if e == old else e) for e in els}, rad), pid))
    return out


def generator_proposals(gen, n: int, targets: dict[str, float], guidance: float, steps: int,
                        seed: int) -> list[Any]:
    """``n`` de novo samples of a loaded generator with property ``targets`` (None where a cell degenerated)."""
    from mmmat.generative.api import generate

    structures, _ = generate(gen, n, targets=targets or None, seed=seed, steps=steps,
                             guidance=guidance if targets else 1.0)
    return structures
