"""Oracles that verify candidates: relaxation and energy above the hull of known phases, per method.

:class:`Oracle` is the pluggable interface: ``evaluate(structures)`` returns one JSON-ready dict per structure
(see :data:`RESULT_KEYS`); a user can put DFT behind it. :class:`MLIPOracle` relaxes every candidate with
each of its machine-learned interatomic potentials (CHGNet, whose weights ship in ``chgnet``, and SevenNet-0,
whose weights ship in ``sevenn``) and computes its energy above the convex hull of the known phases evaluated
with the same potential, so candidate and reference energies share one scale. Known phases are evaluated as
given (single points of the DFT-relaxed structures) and only in the chemical systems the candidates touch;
their energies are cached on disk under a key of the potential and each structure. Elemental end points the
known phases lack come from relaxed simple prototypes
(:func:`~mmmat.evaluation.generation_stability.elemental_prototypes`).

:class:`StandInOracle` replaces the potentials by a cheap analytic energy for tests and the tiny config only:
its numbers are not physics.

Units: energies in eV/atom, forces in eV/Å, the relaxation RMSD normalised by (V/n)^(1/3) (pymatgen
StructureMatcher), volumes in Å³.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

#: Keys of an oracle result.
RESULT_KEYS = (
    "energy_per_atom", "e_hull", "rmsd", "volume_change", "relaxed_cif", "n_known_phases", "properties",
    "seconds", "error",
)
#: Cells denser than this (Å³ per atom) are not passed to a potential (no known solid is; graphs explode).
MIN_VOLUME_PER_ATOM = 2.0


class Oracle:
    """Interface of an oracle.

    Attributes:
        methods: Names of the methods whose energy above hull each candidate gets (a hit needs all of them).
    """

    methods: tuple[str, ...] = ()
    #: Structures per :meth:`evaluate` call that use the oracle best (0: every pick of a round at once). The loop
    #: writes the ledger after each call, so a run killed during a call evaluates that call's structures again.
    batch_size: int = 1

    def evaluate(self, structures: Sequence[Any]) -> list[dict[str, Any]]:
        """One result per structure (JSON-ready dicts).

        Keys: ``energy_per_atom`` and ``e_hull`` ({method: eV/atom}), ``rmsd`` ({method: normalised RMS or
        None}), ``volume_change`` ({method: fraction}), ``relaxed_cif``, ``n_known_phases`` (known phases in the
        chemical system, its subsystems included), ``properties`` (other labels, e.g. the relaxed ``density`` in
        g/cm³), ``seconds``, ``error`` (None when fine).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release processes and models."""


# ------------------------------------------------------------------------------------------- methods
class EnergyMethod:
    """One way to compute energies: single points and relaxations (eV/atom)."""

    name = "method"

    def cache_key(self) -> str:
        """A string that changes whenever the method's energies would."""
        return self.name

    def single_points(self, structures: Sequence[Any]) -> np.ndarray:
        """Energies per atom of the structures as given."""
        return self.relax(structures, steps=0, fmax=1.0)[0]

    def relax(self, structures: Sequence[Any], steps: int, fmax: float) -> tuple[np.ndarray, list]:
        """Relax positions and cell (``steps`` at most, force threshold ``fmax``); energies and final cells."""
        raise NotImplementedError


def _calculator(name: str, device: str):
    if name == "chgnet":
        from chgnet.model.dynamics import CHGNetCalculator

        from mmmat.evaluation.generation_stability import load_chgnet

        with contextlib.redirect_stdout(io.StringIO()):
            return CHGNetCalculator(model=load_chgnet(device), use_device=device)
    if name == "sevennet":
        from sevenn.calculator import SevenNetCalculator

        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SevenNetCalculator("7net-0", device=device)
    raise ValueError(f"unknown MLIP {name!r} (chgnet, sevennet)")


class MLIPMethod(EnergyMethod):
    """An MLIP (CHGNet or SevenNet-0) relaxed in batches by :mod:`mmmat.evaluation.relax`.

    ASE's FIRE on UnitCellFilter coordinates, every running structure in one call of the potential.

    ``calc`` still gives the ASE calculator for one-structure use.
    """

    def __init__(self, name: str, device: str | None = None):
        from mmmat.evaluation.generation_stability import resolve_device

        self.name = name
        self.device = resolve_device(device)
        self._calc = None

    def cache_key(self) -> str:
        """The MLIP, its package version and the single-point convention."""
        from importlib.metadata import version

        pkg = {"chgnet": "chgnet", "sevennet": "sevenn"}[self.name]
        return f"{self.name}-{version(pkg)}-{'7net-0' if self.name == 'sevennet' else 'default'}"

    @property
    def calc(self):
        """The ASE calculator, built on first use."""
        if self._calc is None:
            self._calc = _calculator(self.name, self.device)
        return self._calc

    def single_points(self, structures: Sequence[Any]) -> np.ndarray:
        """Energies per atom of the structures as given, in batched calls."""
        from mmmat.evaluation.relax import load_potential, single_points

        return single_points(load_potential(self.name, self.device), structures)

    def relax(self, structures: Sequence[Any], steps: int, fmax: float) -> tuple[np.ndarray, list]:
        """Batched FIRE relaxation of positions and cell (:func:`mmmat.evaluation.relax.batched_relax`).

        A structure the potential fails on gets NaN and keeps its input structure.
        """
        from mmmat.evaluation.relax import batched_relax, load_potential

        res = batched_relax(load_potential(self.name, self.device), structures, steps=steps, fmax=fmax,
                            task=self.name)
        return res.energy_per_atom, res.structures


class StandInMethod(EnergyMethod):
    """A cheap analytic energy for tests only (NOT physics).

    E/atom = -0.8 Σ_pairs x_a x_b |Δχ| + 0.5 (v/v₀ - 1)² + noise, with x the atomic fractions, χ Pauling
    electronegativity, v the volume per atom and v₀ the mean of (4/3)π r³ / 0.6 over the atoms (r the atomic
    radius); ``noise`` is a deterministic hash of the reduced formula scaled by ``noise`` eV/atom. A relaxation
    moves the volume toward v₀ by half of the gap per step (positions unchanged).
    """

    def __init__(self, name: str = "stand_in", noise: float = 0.0):
        self.name = name
        self.noise = float(noise)

    def cache_key(self) -> str:
        """Name and noise."""
        return f"{self.name}-{self.noise}"

    def _v0(self, s) -> float:
        r = [float(site.specie.atomic_radius or 1.5) for site in s]
        return float(np.mean([4.0 / 3.0 * math.pi * x**3 / 0.6 for x in r]))

    def energy(self, s) -> float:
        """Energy per atom (stand-in units, called eV/atom for the pipeline's sake)."""
        comp = s.composition.fractional_composition
        els = list(comp.elements)
        mix = 0.0
        for a, b in combinations(els, 2):
            xa, xb = float(a.X or 2.0), float(b.X or 2.0)
            mix -= 0.8 * comp[a] * comp[b] * abs(xa - xb)
        v = s.volume / len(s)
        e = mix + 0.5 * (v / self._v0(s) - 1.0) ** 2
        if self.noise:
            h = int(hashlib.sha1(s.composition.reduced_formula.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            e += self.noise * (2.0 * h - 1.0)
        return float(e)

    def relax(self, structures: Sequence[Any], steps: int, fmax: float) -> tuple[np.ndarray, list]:
        """Volume relaxation toward v₀."""
        finals = []
        for s in structures:
            t = s.copy()
            if steps > 0:
                v0 = self._v0(t) * len(t)
                t.scale_lattice(v0 + (t.volume - v0) * 0.5 ** min(steps, 30))
            finals.append(t)
        return np.array([self.energy(t) for t in finals]), finals


# ------------------------------------------------------------------------------------------- known phases
def _sha(structure) -> str:
    return hashlib.sha1(json.dumps(structure.as_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]


class KnownPhases:
    """Known crystals (the hull and novelty reference), indexed by chemical system.

    Args:
        structures: pymatgen structures.
        ids: Their ids.
    """

    def __init__(self, structures: Sequence[Any], ids: Sequence[str]):
        self.structures = list(structures)
        self.ids = [str(i) for i in ids]
        self.by_system: dict[frozenset, list[int]] = {}
        self.by_formula: dict[str, list[int]] = {}
        self._keys: dict[int, str] = {}
        for i, s in enumerate(self.structures):
            self.by_system.setdefault(frozenset(el.symbol for el in s.composition.elements), []).append(i)
            self.by_formula.setdefault(s.composition.reduced_formula, []).append(i)

    def __len__(self) -> int:
        return len(self.ids)

    def in_system(self, elements: Sequence[str]) -> list[int]:
        """Indices of the known phases whose elements are a subset of ``elements``."""
        els = sorted(set(elements))
        out: list[int] = []
        for k in range(1, len(els) + 1):
            for sub in combinations(els, k):
                out.extend(self.by_system.get(frozenset(sub), []))
        return out

    def elements(self) -> set[str]:
        """Every element of the known phases."""
        return {e for k in self.by_system for e in k}

    def key(self, i: int) -> str:
        """``<id>:<structure hash>`` of known phase ``i``, the key of its cached energies (computed once)."""
        if i not in self._keys:
            self._keys[i] = f"{self.ids[i]}:{_sha(self.structures[i])}"
        return self._keys[i]

    def elemental(self, elements: Sequence[str]) -> dict[str, list[int]]:
        """The known phases of each single element of ``elements``."""
        return {el: self.by_system[frozenset([el])] for el in set(elements) if frozenset([el]) in self.by_system}


class MethodHull:
    """Hull of the known phases for one method: energies computed for touched systems only, cached on disk."""

    def __init__(self, method: EnergyMethod, known: KnownPhases, cache_dir: str | Path | None,
                 steps: int = 200, fmax: float = 0.1, relaxer: EnergyMethod | None = None):
        self.method = method
        self.relaxer = relaxer
        self.known = known
        self.steps, self.fmax = steps, fmax
        key = method.cache_key() + ("" if relaxer is None else f"@{relaxer.cache_key()}")
        self.path = None if cache_dir is None else Path(cache_dir) / f"{key}.json"
        self.energy: dict[str, float] = {}
        self.proto: dict[str, tuple[str, float]] = {}
        self._cache: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            try:
                self._cache = json.loads(self.path.read_text()).get("entries", {})
            except (OSError, json.JSONDecodeError):
                self._cache = {}
        self._ref = None
        self.computed = 0

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")  # runs sharing a cache folder never share it
        tmp.write_text(json.dumps({"method": self.method.cache_key(), "unit": "eV/atom", "entries": self._cache}))
        tmp.replace(self.path)

    def _single_points(self, todo: list[tuple[int, str]]) -> None:
        """Single-point energies (eV/atom) of the known phases ``(index, cache key)``, cached and counted."""
        if not todo:
            return
        e = self.method.single_points([self.known.structures[i] for i, _ in todo])
        for (i, key), v in zip(todo, e):
            v = float(v) if np.isfinite(v) else None
            self._cache[key] = {"e": v}
            self.energy[self.known.ids[i]] = v
        self.computed += len(todo)

    def _have(self, elements: Sequence[str]) -> set[str]:
        """Which of ``elements`` have a known elemental phase with an energy."""
        return {el for el, idx in self.known.elemental(elements).items()
                if any(self.energy.get(self.known.ids[i]) is not None for i in idx)}

    def ensure(self, elements: Sequence[str], save: bool = True) -> bool:
        """Compute (or read from the cache) every known phase of the system and missing elemental end points.

        Returns whether anything was added; ``save`` False leaves writing the cache file to the caller.
        """
        idx = [i for i in self.known.in_system(elements) if self.known.ids[i] not in self.energy]
        todo = []
        for i in idx:
            key = self.known.key(i)
            if key in self._cache:
                self.energy[self.known.ids[i]] = self._cache[key]["e"]
            else:
                todo.append((i, key))
        changed = bool(idx)
        self._single_points(todo)
        have = self._have(elements)
        from mmmat.evaluation.elemental import lookup

        for el in sorted(set(elements)):  # shipped end points join the hull whenever present (the lowest wins)
            if el in self.proto:
                continue
            shipped = lookup(self.method.cache_key(), el) if self.relaxer is None else None
            if shipped is not None:
                self.proto[el] = (f"table:{el}:{shipped[1]}", shipped[0])
                changed = True
        self._relax_missing_prototypes(sorted(set(elements) - have - set(self.proto)))
        for el in sorted(set(elements) - have):
            if el in self.proto:
                continue
            key = f"proto:{el}:{self.steps}:{self.fmax}"
            if key not in self._cache:
                from mmmat.evaluation.generation_stability import elemental_prototypes

                best, best_name = math.nan, ""
                for name, s, _ in elemental_prototypes(el):
                    if self.relaxer is None:
                        e, _ = self.method.relax([s], steps=self.steps, fmax=self.fmax)
                    else:  # relaxed by another method, then a single point of this one
                        _, f = self.relaxer.relax([s], steps=self.steps, fmax=self.fmax)
                        e = self.method.single_points(f)
                    if np.isfinite(e[0]) and not (e[0] >= best):
                        best, best_name = float(e[0]), name
                self._cache[key] = {"e": best if np.isfinite(best) else None, "name": best_name}
                self.computed += 1
            ent = self._cache[key]
            if ent["e"] is not None:
                self.proto[el] = (f"proto:{el}:{ent.get('name', '')}", ent["e"])
            changed = True
        if todo or changed:
            self._ref = None
            if save:
                self._save()
        return bool(todo or changed)

    def ensure_many(self, systems: Sequence[Sequence[str]]) -> None:
        """:meth:`ensure` for many chemical systems, with the known phases' energies in one batched call."""
        systems = [sorted(set(x)) for x in systems]
        todo, seen = [], set()
        for els in systems:
            for i in self.known.in_system(els):
                mid = self.known.ids[i]
                if mid in self.energy or i in seen:
                    continue
                seen.add(i)
                key = self.known.key(i)
                if key in self._cache:
                    self.energy[mid] = self._cache[key]["e"]
                else:
                    todo.append((i, key))
        if todo:
            self._single_points(todo)
            self._ref = None
        from mmmat.evaluation.elemental import lookup

        elements = {el for els in systems for el in els}
        have = self._have(elements)
        if self.relaxer is None:
            missing = [el for el in elements if lookup(self.method.cache_key(), el) is None]
        else:
            missing = list(elements)
        self._relax_missing_prototypes(sorted(set(missing) - have - set(self.proto)))
        changed = bool(todo)
        for els in systems:
            changed = self.ensure(els, save=False) or changed
        if changed:
            self._save()  # once: the cache file is rewritten whole (it was once per system)

    def _relax_missing_prototypes(self, elements: Sequence[str]) -> None:
        """Relax the prototypes of several elements in batched calls (MLIP methods; cached like the others)."""
        todo = [el for el in elements if f"proto:{el}:{self.steps}:{self.fmax}" not in self._cache]
        if len(todo) < 1 or not isinstance(self.method, MLIPMethod):
            return
        from mmmat.evaluation.elemental import relax_prototypes
        from mmmat.evaluation.relax import load_potential

        pot = load_potential(self.method.name, self.method.device)
        rel = None
        if isinstance(self.relaxer, MLIPMethod):
            rel = load_potential(self.relaxer.name, self.relaxer.device)
        best = relax_prototypes(pot, todo, steps=self.steps, fmax=self.fmax, relaxer=rel)
        for el in todo:
            e, name = best.get(el, (None, ""))
            self._cache[f"proto:{el}:{self.steps}:{self.fmax}"] = {"e": e, "name": name.removeprefix("proto:")}
            self.computed += 1

    def reference(self):
        """The :class:`~mmmat.evaluation.generation_stability.HullReference` of everything computed so far."""
        from mmmat.evaluation.generation_stability import HullReference

        if self._ref is None:
            pos = {mid: i for i, mid in enumerate(self.known.ids)}
            formulas, energies, ids = [], [], []
            for mid, e in self.energy.items():
                if e is not None:
                    formulas.append(self.known.structures[pos[mid]].composition.formula)
                    energies.append(e)
                    ids.append(mid)
            for el, (pid, e) in self.proto.items():
                formulas.append(el)
                energies.append(e)
                ids.append(pid)
            self._ref = HullReference(formulas, np.asarray(energies, dtype=float), ids)
        return self._ref

    def e_above_hull(self, composition, energy_per_atom: float) -> float:
        """Energy above this method's hull, eV/atom (NaN: no energy or no end point)."""
        self.ensure([el.symbol for el in composition.elements])
        return self.reference().e_above_hull(composition, energy_per_atom)


def relaxation_rmsd(initial, final) -> float | None:
    """Pymatgen's normalised RMS displacement between a structure and its relaxed self (None: no mapping)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    try:
        sm = StructureMatcher(primitive_cell=False, scale=True, attempt_supercell=False, ltol=0.5, stol=0.6,
                              angle_tol=15)
        d = sm.get_rms_dist(initial, final)
    except Exception:  # noqa: BLE001 - a pair the matcher cannot process has no RMSD
        return None
    return None if d is None else float(d[0])


# ------------------------------------------------------------------------------------------- the oracle
_WORKER: dict[str, Any] = {}


def _worker_init(kinds: list[tuple[str, dict]], threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
    _WORKER["methods"] = [_make_method(k, kw) for k, kw in kinds]


def _make_method(kind: str, kw: dict) -> EnergyMethod:
    if kind == "mlip":
        return MLIPMethod(**kw)
    return StandInMethod(**kw)


def _relax_with(methods, relaxing, structures, steps, fmax) -> list[list[tuple[float, Any]]]:
    """Per structure, per method: (energy per atom, final structure).

    Methods not in ``relaxing`` take single points of the first relaxing method's final structures.
    """
    res: dict[str, tuple[np.ndarray, list]] = {}
    for m in methods:
        if m.name in relaxing:
            res[m.name] = m.relax(structures, steps, fmax)
    finals = res[relaxing[0]][1]
    for m in methods:
        if m.name not in res:
            res[m.name] = (m.single_points(finals), list(finals))
    return [[(float(res[m.name][0][i]), res[m.name][1][i]) for m in methods] for i in range(len(structures))]


def _worker_relax(cif: str, steps: int, fmax: float, relaxing: list[str]) -> list[tuple[float, str]]:
    from pymatgen.core import Structure

    s = Structure.from_str(cif, fmt="cif")
    return [(e, f.to(fmt="cif")) for e, f in _relax_with(_WORKER["methods"], relaxing, [s], steps, fmax)[0]]


class HullOracle(Oracle):
    """Relax with each method and compute the energy above that method's hull of the known phases.

    Args:
        methods: The energy methods.
        known: Known phases.
        steps: Most relaxation steps per structure.
        fmax: Force threshold, eV/Å.
        cache: Folder of the known phases' energy cache (None: no cache).
        workers: Processes that relax at once on a CPU, one structure each (1: this process, every structure
            of a call in one batch per method; always so when the methods run on a GPU).
        method_specs: ``[(kind, kwargs)]`` that rebuild ``methods`` in worker processes (needed when
            ``workers > 1``).
        relax_methods: Methods that relax (None: all). The others compute a single point of the structure the
            first relaxing method relaxed (and of elemental prototypes relaxed the same way): cheaper where a
            method is slow, and stated in the results (``relaxed_by``).
    """

    def __init__(self, methods: Sequence[EnergyMethod], known: KnownPhases, steps: int = 200, fmax: float = 0.1,
                 cache: str | Path | None = None, workers: int = 1,
                 method_specs: Sequence[tuple[str, dict]] | None = None,
                 relax_methods: Sequence[str] | None = None):
        self._methods = list(methods)
        self.methods = tuple(m.name for m in self._methods)
        self.known = known
        self.steps, self.fmax = int(steps), float(fmax)
        relaxing = list(self.methods) if relax_methods is None else [m for m in self.methods if m in relax_methods]
        if not relaxing:
            raise ValueError(f"relax_methods {relax_methods} names none of {self.methods}")
        self.relaxing = relaxing
        first = self._methods[self.methods.index(relaxing[0])]
        self.hulls = {m.name: MethodHull(m, known, cache, steps, fmax, None if m.name in relaxing else first)
                      for m in self._methods}
        self.workers = int(workers)
        self.method_specs = list(method_specs or [])
        self._pool = None
        self.stats = {"structures": 0, "relax_seconds": 0.0}

    @property
    def batch_size(self) -> int:
        """0 (the whole round in one batched relaxation per method) on a GPU; two per worker process; else 1."""
        if not self._on_cpu():
            return 0
        return 2 * self.workers if self.workers > 1 and self.method_specs else 1

    def _on_cpu(self) -> bool:
        return all(str(getattr(m, "device", "cpu")).startswith("cpu") for m in self._methods)

    def _relax_all(self, structures: Sequence[Any]) -> list[list[tuple[float, Any]]]:
        from pymatgen.core import Structure

        # worker processes relax one structure each: a CPU's way to use its cores; on a GPU one batched call
        # per method (every structure of the round at once) is faster than any number of them
        if self.workers > 1 and len(structures) > 1 and self.method_specs and self._on_cpu():
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                    initargs=(self.method_specs, 1),
                )
            futs = [self._pool.submit(_worker_relax, s.to(fmt="cif"), self.steps, self.fmax, self.relaxing)
                    for s in structures]
            res = [f.result() for f in futs]
            return [[(e, Structure.from_str(c, fmt="cif")) for e, c in r] for r in res]
        return _relax_with(self._methods, self.relaxing, structures, self.steps, self.fmax)

    def evaluate(self, structures: Sequence[Any]) -> list[dict[str, Any]]:
        """Relax and place on each method's hull; see :meth:`Oracle.evaluate`."""
        t0 = time.perf_counter()
        relaxed = self._relax_all(structures)
        dt = (time.perf_counter() - t0) / max(1, len(structures))
        self.stats["structures"] += len(structures)
        self.stats["relax_seconds"] += time.perf_counter() - t0
        results = []
        for s, per in zip(structures, relaxed):
            els = [el.symbol for el in s.composition.elements]
            res: dict[str, Any] = {k: {} for k in ("energy_per_atom", "e_hull", "rmsd", "volume_change")}
            res.update(relaxed_cif=None, n_known_phases=len(self.known.in_system(els)), properties={},
                       seconds=dt, error=None, relaxed_by=list(self.relaxing))
            errors = []
            for m, (e, f) in zip(self.methods, per):
                res["energy_per_atom"][m] = e if np.isfinite(e) else None
                eh = self.hulls[m].e_above_hull(f.composition, e) if np.isfinite(e) else math.nan
                res["e_hull"][m] = float(eh) if np.isfinite(eh) else None
                res["rmsd"][m] = relaxation_rmsd(s, f)
                res["volume_change"][m] = float(f.volume / s.volume - 1.0)
                if res["relaxed_cif"] is None:
                    res["relaxed_cif"] = f.to(fmt="cif")
                    res["properties"] = {"density": float(f.density), "volume_per_atom": float(f.volume / len(f))}
                if not np.isfinite(e):
                    errors.append(f"{m}: no energy")
            res["error"] = "; ".join(errors) or None
            results.append(res)
        return results

    def close(self) -> None:
        """Shut the worker processes down."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


class MLIPOracle(HullOracle):
    """CHGNet and/or SevenNet-0 relaxations and hulls (see the module docstring).

    Args:
        known: Known phases.
        methods: ``chgnet`` and/or ``sevennet``.
        steps: Most FIRE steps per structure.
        fmax: Force threshold, eV/Å.
        device: Torch device (None: CUDA when available).
        cache: Folder of the known phases' energy cache.
        workers: Processes that relax at once on a CPU (each loads its own models); ignored on a GPU, where
            one batched call per method relaxes every structure of the round.
        relax_methods: MLIPs that relax (None: both); see :class:`HullOracle`.
    """

    def __init__(self, known: KnownPhases, methods: Sequence[str] = ("chgnet", "sevennet"), steps: int = 200,
                 fmax: float = 0.1, device: str | None = None, cache: str | Path | None = None, workers: int = 1,
                 relax_methods: Sequence[str] | None = None):
        specs = [("mlip", {"name": m, "device": device}) for m in methods]
        super().__init__([MLIPMethod(m, device) for m in methods], known, steps, fmax, cache, workers, specs,
                         relax_methods)


class StandInOracle(HullOracle):
    """A cheap analytic oracle for tests and the tiny config only: its energies are NOT physics.

    Two stand-in methods (``stand_in_a``, ``stand_in_b``; the second adds a deterministic ±``noise`` eV/atom)
    play the two MLIPs so that the agreement guard has something to measure.

    Args:
        known: Known phases.
        steps: Relaxation steps.
        noise: Amplitude of the second method's deviation, eV/atom.
        delay: Seconds of sleep per structure (lets a test kill the run in the middle of a round).
        call_log: A file to which each evaluated structure's formula and CIF hash is appended (tests count
            oracle calls with it).
        cache: Folder of the energy cache.
        workers: Ignored (the stand-in is cheap).
    """

    def __init__(self, known: KnownPhases, steps: int = 5, noise: float = 0.05, delay: float = 0.0,
                 call_log: str | None = None, cache: str | Path | None = None, workers: int = 1):
        super().__init__([StandInMethod("stand_in_a", 0.0), StandInMethod("stand_in_b", noise)], known, steps, 0.1,
                         cache, 1)
        self.delay = float(delay)
        self.call_log = call_log

    def evaluate(self, structures: Sequence[Any]) -> list[dict[str, Any]]:
        """As :meth:`HullOracle.evaluate`, one structure at a time, logging each call."""
        out = []
        for s in structures:
            if self.delay:
                time.sleep(self.delay)
            out.extend(super().evaluate([s]))
            if self.call_log:
                with open(self.call_log, "a") as fh:
                    fh.write(f"{s.composition.reduced_formula} {_sha(s)}\n")
        return out


def build_oracle(cfg, known: KnownPhases, cache: str | Path | None) -> Oracle:
    """The oracle an :class:`~mmmat.design.config.OracleConfig` names."""
    if cfg.kind == "mlip":
        return MLIPOracle(known, cfg.methods, cfg.steps, cfg.fmax, cfg.device, cache, cfg.workers,
                          cfg.relax_methods)
    if cfg.kind == "stand_in":
        return StandInOracle(known, steps=cfg.steps, cache=cache, **cfg.options)
    mod, _, cls = cfg.kind.partition(":")
    if not cls:
        raise ValueError(f"oracle.kind {cfg.kind!r}: use mlip, stand_in or module:Class")
    klass = getattr(importlib.import_module(mod), cls)
    oracle = klass(known=known, **cfg.options)
    if not isinstance(oracle, Oracle):
        raise TypeError(f"oracle.kind {cfg.kind!r} is not an mmmat.design.Oracle")
    return oracle
