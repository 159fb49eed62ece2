"""Elemental reference energies of the MLIPs, computed once and shipped with the package.

A convex hull needs an end point for every element of a chemical system, and reference sets such as mp20p
lack most elemental crystals. :func:`build_table` relaxes simple prototypes of every element (fcc, bcc, hcp
from :func:`~mmmat.evaluation.generation_stability.elemental_prototypes`, diamond for C, Si, Ge and Sn, and a
dimer in a 12 Å box for the molecular elements) with each MLIP in batched FIRE relaxations
(:func:`~mmmat.evaluation.relax.batched_relax`) and keeps the lowest energy per atom. The result ships as
``mmmat/evaluation/data/elemental_references.json`` with its provenance (versions, steps, force threshold),
so an evaluation never relaxes prototypes again for the elements the table covers. A prototype end point is
an upper bound on the element's true ground state under that MLIP; where a known phase of the element is in
the hull's reference, the lower of the two wins in the hull.

Build it (CPU, tens of minutes; GPU, a minute or two)::

    python -m mmmat.evaluation.elemental --out mmmat/evaluation/data/elemental_references.json

Units: eV/atom.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import numpy as np

#: The shipped table.
TABLE_PATH = Path(__file__).parent / "data" / "elemental_references.json"
#: Elements whose standard state is molecular (a dimer in a box is among their prototypes).
MOLECULAR = frozenset({"H", "N", "O", "F", "Cl", "Br", "I", "He", "Ne", "Ar", "Kr", "Xe"})
#: Bulk prototypes relaxed for every element.
BULK_PROTOTYPES = ("fcc", "bcc", "hcp")
#: Elements that also get the diamond prototype.
DIAMOND = frozenset({"C", "Si", "Ge", "Sn"})
#: The 89 elements of MPtrj, the training set of CHGNet and SevenNet-0 (Z 1-83 and 89-94): the default of
#: :func:`build_table`. Po, At, Rn, Fr and Ra are absent from it; their energies would be extrapolations
#: (SevenNet-0 has no embedding for them at all).
MPTRJ_Z = tuple(range(1, 84)) + tuple(range(89, 95))
#: A relaxed prototype closer than this (Å) between two atoms collapsed: the MLIP left its domain.
MIN_DISTANCE = 0.5
#: Below this (eV/atom) an energy is an MLIP failure, not a ground state (DFT-PBE elements lie above -15).
MIN_ENERGY = -20.0
#: Above this (eV/atom) likewise: no element's ground state lies above its free atoms' energy scale (DFT-PBE
#: elements in the Materials Project are all below 0; noble-gas dimers far from the MLIPs' training data gave
#: +5.7 to +6.0).
MAX_ENERGY = 1.0


def plausible(structure, energy_per_atom: float) -> bool:
    """Whether a relaxed prototype is physical.

    Its energy is finite and between :data:`MIN_ENERGY` and :data:`MAX_ENERGY`, and no two atoms (periodic
    images included) lie within :data:`MIN_DISTANCE` Å.
    """
    if not np.isfinite(energy_per_atom) or not MIN_ENERGY <= energy_per_atom <= MAX_ENERGY:
        return False
    _, _, _, dist = structure.get_neighbor_list(MIN_DISTANCE)
    return not len(dist)


@lru_cache(maxsize=1)
def shipped_table() -> dict:
    """The shipped table: ``{"provenance": {...}, "methods": {method_key: {element: {...}}}}`` (empty if absent)."""
    if not TABLE_PATH.is_file():
        return {"provenance": {}, "methods": {}}
    return json.loads(TABLE_PATH.read_text())


def lookup(method_key: str, element: str) -> tuple[float, str] | None:
    """``(energy eV/atom, source)`` of ``element`` under the method ``method_key``, or None when not shipped."""
    ent = shipped_table().get("methods", {}).get(method_key, {}).get(element)
    if not ent or ent.get("energy_per_atom") is None:
        return None
    return float(ent["energy_per_atom"]), str(ent.get("source", ""))


def relax_prototypes(
    potential, elements: Iterable[str], steps: int = 300, fmax: float = 0.05, relaxer=None,
    max_structures: int | None = None,
) -> dict[str, tuple[float, str]]:
    """Lowest prototype energy per element: ``{element: (eV/atom, "proto:<name>")}``.

    An element is missing when every prototype failed or ended implausible (:func:`plausible`).

    All prototypes of all elements relax together in batched calls (bulk ones with their cell, dimers with
    positions only). With ``relaxer`` (another potential) the prototypes are relaxed by it and ``potential``
    takes single points of the relaxed cells.
    """
    from mmmat.evaluation.generation_stability import elemental_prototypes
    from mmmat.evaluation.relax import batched_relax, single_points

    jobs: dict[bool, list[tuple[str, str, object]]] = {True: [], False: []}
    for el in sorted(set(elements)):
        for name, s, relax_cell in elemental_prototypes(el):
            wanted = name in BULK_PROTOTYPES or (name == "dimer" and el in MOLECULAR)
            if wanted or (name == "diamond" and el in DIAMOND):
                jobs[relax_cell].append((el, name, s))
    best: dict[str, tuple[float, str]] = {}
    for relax_cell, items in jobs.items():
        if not items:
            continue
        structs = [s for _, _, s in items]
        res = batched_relax(relaxer or potential, structs, steps=steps, fmax=fmax, relax_cell=relax_cell,
                            task="elemental prototypes", max_structures=max_structures)
        energies = res.energy_per_atom if relaxer is None else single_points(potential, res.structures)
        for (el, name, _), e, relaxed in zip(items, energies, res.structures):
            if plausible(relaxed, e) and (el not in best or e < best[el][0]):
                best[el] = (float(e), f"proto:{name}")
    return best


def build_table(
    methods: Sequence[str] = ("chgnet", "sevennet"),
    elements: Sequence[str] | None = None,
    steps: int = 150,
    fmax: float = 0.1,
    device: str | None = None,
    out: str | Path = TABLE_PATH,
    max_structures: int | None = None,
    chunk: int = 16,
) -> dict:
    """Relax the prototypes of ``elements`` (default: :data:`MPTRJ_Z`) with each MLIP and write them to ``out``.

    An existing table at ``out`` is extended (methods and elements already there are kept); it is written after
    every ``chunk`` elements.
    """
    from pymatgen.core import Element

    from mmmat.design.oracle import MLIPMethod
    from mmmat.evaluation.relax import load_potential

    els = list(elements) if elements else [Element.from_Z(z).symbol for z in MPTRJ_Z]
    out = Path(out)
    doc = json.loads(out.read_text()) if out.is_file() else {"provenance": {}, "methods": {}}
    for m in methods:
        key = MLIPMethod(m, device).cache_key()
        t0 = time.perf_counter()
        pot = load_potential(m, device)
        table = doc["methods"].setdefault(key, {})
        todo = [el for el in els if el not in table]
        for start in range(0, len(todo), chunk):  # written after every chunk: an interrupted build resumes
            part = todo[start : start + chunk]
            best = relax_prototypes(pot, part, steps=steps, fmax=fmax, max_structures=max_structures)
            for el in part:
                if el in best:
                    table[el] = {"energy_per_atom": round(best[el][0], 6), "source": best[el][1]}
            _write(out, doc, key, steps, fmax, pot, t0, table)
    shipped_table.cache_clear()
    return doc


def _write(out: Path, doc: dict, key: str, steps: int, fmax: float, pot, t0: float, table: dict) -> None:
    """Record the provenance of ``key``'s entries and write ``doc`` to ``out``."""
    from importlib.metadata import version

    doc["provenance"][key] = {
        "how": (
            "lowest energy per atom of FIRE relaxations (UnitCellFilter coordinates, mmmat.evaluation.relax."
            f"batched_relax, at most {steps} steps, fmax {fmax} eV/A) of fcc, bcc and hcp cells "
            "(nearest-neighbour distance twice the atomic radius), diamond for "
            f"{', '.join(sorted(DIAMOND))}, and a dimer in a 12 A box (positions only) for "
            f"{', '.join(sorted(MOLECULAR))}; a relaxed prototype counts only when plausible (energy "
            f"{MIN_ENERGY} to {MAX_ENERGY} eV/atom, no two atoms within {MIN_DISTANCE} A)"
        ),
        "versions": {
            "mmmat.method": key, "torch": version("torch"), "pymatgen": version("pymatgen"),
            "ase": version("ase"), "python": platform.python_version(),
        },
        "device": pot.device,
        "seconds_this_run": round(time.perf_counter() - t0, 1),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "n_elements": len(table),
        "unit": "eV/atom",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, sort_keys=True))


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: build or extend the elemental reference table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(TABLE_PATH))
    ap.add_argument("--methods", default="chgnet,sevennet")
    ap.add_argument("--elements", default=None, help="comma-separated symbols (default: the 89 elements of MPtrj)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--fmax", type=float, default=0.1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-structures", type=int, default=None, help="most structures per potential call")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = ap.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    doc = build_table(
        [m.strip() for m in a.methods.split(",") if m.strip()],
        [e.strip() for e in a.elements.split(",")] if a.elements else None,
        a.steps, a.fmax, a.device, a.out, a.max_structures,
    )
    for key, tab in doc["methods"].items():
        print(f"{key}: {len(tab)} elements")


if __name__ == "__main__":
    main()

__all__ = ["DIAMOND", "MOLECULAR", "TABLE_PATH", "build_table", "lookup", "relax_prototypes", "shipped_table"]
