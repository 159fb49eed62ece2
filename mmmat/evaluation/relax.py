"""Batched relaxations with machine-learned interatomic potentials (CHGNet, SevenNet-0).

One implementation serves the staged evaluation (:mod:`mmmat.evaluation.generation_stability`) and the design
oracle (:mod:`mmmat.design.oracle`): :func:`batched_relax` runs ASE's FIRE algorithm on ASE's
``UnitCellFilter`` coordinates (positions and cell relaxed together, zero external pressure) for many
structures at once. Every optimisation step evaluates all structures still running in ONE call of the
potential (a batch of graphs, on the GPU when there is one); structures leave the batch as they converge and
waiting ones take their place, so the batch stays full. The FIRE arithmetic per structure is ASE's (same
parameters: dt 0.1, dtmax 1.0, maxstep 0.2 Å, Nmin 5, finc 1.1, fdec 0.5, astart 0.1, fa 0.99) and the
convergence test is ASE's (largest generalised force, cell rows included, below ``fmax``), so a structure
relaxed in a batch follows the trajectory it would follow alone, up to the potential's float32 round-off
(tests/test_relax.py checks it against ASE's ``FIRE(UnitCellFilter(atoms))`` one structure at a time).

Potentials (:class:`BatchedPotential`): :class:`CHGNetBatch` (CHGNet graphs, built over a thread pool on
CUDA, predicted in one batch) and :class:`SevenNetBatch` (SevenNet-0 graphs collated into one
``torch_geometric`` batch). Both ship their weights in their wheels. torch-sim-atomistic was evaluated as the
alternative (benchmarks/judge.py relaxers): 0.3.0, the newest installable for Python 3.11 here, installs
without touching torch but has no CHGNet model, and its SevenNet wrapper fails with sevenn 0.13 (it imports a
name sevenn removed); sevenn's own torch-sim wrapper needs torch-sim >= 0.6. This loop therefore serves both
potentials; on 2 CPU cores it was 1.37x (CHGNet) and 1.15x (SevenNet) faster than ASE one structure at a
time, with the same energies (benchmarks/results/judge_relaxers.json).

Units: energies eV (per atom where the name says so), forces eV/Å, stresses eV/Å³ (ASE's sign: positive is
tensile), lengths Å.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmmat.progress import note, report

#: Cells denser than this (Å³ per atom) are not passed to a potential (no known solid is; graphs explode).
MIN_VOLUME_PER_ATOM = 2.0
#: ASE FIRE's parameters (ase.optimize.FIRE defaults).
FIRE_PARAMS: dict[str, float] = {
    "dt": 0.1, "dtmax": 1.0, "maxstep": 0.2, "Nmin": 5, "finc": 1.1, "fdec": 0.5, "astart": 0.1, "fa": 0.99,
}
#: Names of the potentials :func:`load_potential` builds.
POTENTIALS = ("chgnet", "sevennet")


def resolve_device(device: str | None = None) -> str:
    """``device`` or, when None, ``"cuda"`` if a CUDA device is visible, else ``"cpu"``."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------- potentials
class BatchedPotential:
    """Energies, forces and stresses of many structures in one call.

    Attributes:
        name: Short name (``chgnet``, ``sevennet``).
        device: Torch device.
    """

    name = "potential"
    device = "cpu"

    def version(self) -> str:
        """A string that changes whenever the potential's numbers would (package version and weights)."""
        return self.name

    def compute(self, structures: Sequence[Any]) -> list[tuple[float, np.ndarray, np.ndarray]]:
        """Per structure: (energy eV, forces (n, 3) eV/Å, stress (3, 3) eV/Å³, ASE sign)."""
        raise NotImplementedError


_CACHE: dict[tuple[str, str], Any] = {}
_POOLS: dict[int, Any] = {}


def _graph_threads(device: str, n: int | None) -> int:
    """Threads that build graphs on the CPU: ``n``, else the cores present when the model runs on CUDA, else 1."""
    if n:
        return int(n)
    if not str(device).startswith("cuda"):
        return 1
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _map(fn, items: list, threads: int) -> list:
    """``[fn(x) for x in items]``, over a thread pool when ``threads > 1`` and there are enough items."""
    if threads <= 1 or len(items) < 2 * threads:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads)
    return list(_POOLS[threads].map(fn, items))


class CHGNetBatch(BatchedPotential):
    """CHGNet (bundled weights) through ``CHGNet.predict_structure`` on a list of structures."""

    name = "chgnet"

    def __init__(self, device: str | None = None, graph_threads: int | None = None):
        from mmmat.evaluation.generation_stability import load_chgnet

        self.device = resolve_device(device)
        self.model = load_chgnet(self.device)
        self.graph_threads = _graph_threads(self.device, graph_threads)

    def version(self) -> str:
        """``chgnet-<package version>-<model version>``."""
        from importlib.metadata import version

        return f"chgnet-{version('chgnet')}-{getattr(self.model, 'version', None) or 'default'}"

    def compute(self, structures: Sequence[Any]) -> list[tuple[float, np.ndarray, np.ndarray]]:
        """One ``predict_structure`` call for the whole list (CHGNet's stress, GPa, converted to eV/Å³)."""
        from ase import units

        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            graphs = _map(self.model.graph_converter, list(structures), self.graph_threads)
            preds = self.model.predict_graph(graphs, task="efs", batch_size=max(1, len(graphs)))
        if isinstance(preds, dict):
            preds = [preds]
        out = []
        for s, p in zip(structures, preds):
            e = float(np.asarray(p["e"]).reshape(-1)[0]) * len(s)  # CHGNet predicts eV/atom
            out.append((e, np.asarray(p["f"], dtype=np.float64), np.asarray(p["s"], dtype=np.float64) * units.GPa))
        return out


class SevenNetBatch(BatchedPotential):
    """SevenNet-0 (``7net-0``, weights in the ``sevenn`` wheel): one batch graph per call.

    With ``device_graphs`` (the default) the batch's neighbour list is built on the model's device for every
    structure at once (:func:`mmmat.data.graph.radius_graph_pbc`); otherwise one ASE neighbour list per
    structure on the CPU, collated (SevenNet's own loader's way). Both give the same edges; on the CPU the
    per-structure neighbour lists cost about 12 ms per 10-atom structure and call, which the relaxation of
    many structures repeats every step.
    """

    name = "sevennet"

    def __init__(self, device: str | None = None, checkpoint: str = "7net-0", graph_threads: int | None = None,
                 device_graphs: bool = True):
        from sevenn.util import load_checkpoint

        self.device = resolve_device(device)
        self.graph_threads = _graph_threads(self.device, graph_threads)
        self.device_graphs = device_graphs
        self.checkpoint = checkpoint
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cp = load_checkpoint(checkpoint)
            model = cp.build_model()
        import sevenn._keys as key

        self.cutoff = float(cp.config[key.CUTOFF])
        model.set_is_batch_data(True)
        self.model = model.to(self.device).eval()

    def version(self) -> str:
        """``sevennet-<package version>-<checkpoint>``."""
        from importlib.metadata import version

        return f"sevennet-{version('sevenn')}-{self.checkpoint}"

    def compute(self, structures: Sequence[Any]) -> list[tuple[float, np.ndarray, np.ndarray]]:
        """One forward pass over the collated graphs of all structures."""
        import sevenn._keys as key

        if self.device_graphs:
            batch = self._device_batch(list(structures))
        else:
            batch = self._ase_batch(list(structures)).to(self.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.model(batch)
        energy = out[key.PRED_TOTAL_ENERGY].detach().cpu().double().numpy().reshape(-1)
        forces = out[key.PRED_FORCE].detach().cpu().double().numpy()
        stress6 = -out[key.PRED_STRESS].detach().cpu().double().numpy().reshape(-1, 6)  # xx yy zz xy yz zx
        res, start = [], 0
        for b, s in enumerate(structures):
            n = len(s)
            xx, yy, zz, xy, yz, zx = stress6[b]
            st = np.array([[xx, xy, zx], [xy, yy, yz], [zx, yz, zz]])
            res.append((float(energy[b]), forces[start : start + n], st))
            start += n
        return res

    def _ase_batch(self, structures: list) -> Any:
        """The collated batch of ``structures`` (on the CPU) from one :meth:`_graph` per structure."""
        from torch_geometric.loader.dataloader import Collater

        graphs = _map(self._graph, structures, self.graph_threads)
        return Collater([], follow_batch=None, exclude_keys=None)(graphs)

    def _device_batch(self, structures: list) -> Any:
        """The collated batch of ``structures`` with every edge within the cutoff found on the device at once.

        Edges as :meth:`_graph` makes them: ``edge_index`` rows (i, j) with ``edge_vec`` the vector from atom i
        to the periodic image of atom j, self-images of other cells included, the atom itself not.
        """
        import torch
        from sevenn.atom_graph_data import AtomGraphData

        from mmmat.data.graph import radius_graph_pbc

        dev = self.device
        counts = torch.tensor([len(s) for s in structures], dtype=torch.long)
        pos = torch.as_tensor(np.concatenate([s.cart_coords for s in structures]), dtype=torch.float64).to(dev)
        lat = torch.as_tensor(np.stack([s.lattice.matrix for s in structures]), dtype=torch.float64).to(dev)
        z = torch.as_tensor(np.concatenate([s.atomic_numbers for s in structures]), dtype=torch.long).to(dev)
        batch = torch.repeat_interleave(torch.arange(len(structures)), counts).to(dev)
        edge_index, offsets, _ = radius_graph_pbc(pos, lat, batch, self.cutoff)
        j, i = edge_index  # rows (source j, target i): the vector from i to j's image
        vec = pos[j] + torch.einsum("ei,eij->ej", offsets.to(pos.dtype), lat[batch[j]]) - pos[i]
        ptr = torch.zeros(len(structures) + 1, dtype=torch.long)
        ptr[1:] = torch.cumsum(counts, 0)
        return AtomGraphData(
            x=z, edge_index=torch.stack([i, j]), pos=pos.float(), atomic_numbers=z, edge_vec=vec.float(),
            cell_volume=torch.linalg.det(lat).abs().float(), num_atoms=counts.to(dev), batch=batch,
            ptr=ptr.to(dev), data_info={},
        )

    def _graph(self, s):
        """SevenNet's input graph of one periodic structure: every pair within the cutoff, self-images included.

        Built with ASE's ``primitive_neighbor_list`` as SevenNet's own loader does without matscipy (its
        training-data module, which needs scikit-learn, is not imported).
        """
        import sevenn._keys as key
        from ase.neighborlist import primitive_neighbor_list
        from sevenn.atom_graph_data import AtomGraphData

        pos = np.array(s.cart_coords, dtype=np.float64)
        cell = np.array(s.lattice.matrix, dtype=np.float64)
        src, dst, vec = primitive_neighbor_list("ijD", (True, True, True), cell, pos, self.cutoff,
                                                self_interaction=True)
        keep = ~((src == dst) & np.all(vec == 0, axis=1))
        z = np.array(s.atomic_numbers, dtype=np.int64)
        data = {
            key.NODE_FEATURE: z,
            key.ATOMIC_NUMBERS: z,
            key.POS: pos,
            key.EDGE_IDX: np.array([src[keep], dst[keep]], dtype=np.int64),
            key.EDGE_VEC: vec[keep],
            key.CELL_VOLUME: np.array(abs(float(np.linalg.det(cell)))),
            key.NUM_ATOMS: np.array(len(z)),
            key.INFO: {},
        }
        return AtomGraphData.from_numpy_dict(data)


def load_potential(name: str, device: str | None = None) -> BatchedPotential:
    """The batched potential ``name`` (``chgnet`` or ``sevennet``) on ``device``, built once per process."""
    dev = resolve_device(device)
    k = (name, dev)
    if k not in _CACHE:
        if name == "chgnet":
            _CACHE[k] = CHGNetBatch(dev)
        elif name == "sevennet":
            _CACHE[k] = SevenNetBatch(dev)
        else:
            raise ValueError(f"unknown MLIP {name!r} (known: {', '.join(POTENTIALS)})")
    return _CACHE[k]


# ------------------------------------------------------------------------------------------- FIRE
@dataclass
class _System:
    """One structure's FIRE state on UnitCellFilter coordinates."""

    index: int
    numbers: list
    orig_cell: np.ndarray
    x: np.ndarray  # (n + 3, 3) generalised positions
    n: int
    relax_cell: bool
    vel: np.ndarray | None = None
    dt: float = FIRE_PARAMS["dt"]
    a: float = FIRE_PARAMS["astart"]
    nsteps_pos: int = 0
    steps: int = 0
    energy: float = math.nan
    history: list = field(default_factory=list)

    def structure(self):
        """The pymatgen structure at the current generalised positions."""
        from pymatgen.core import Lattice, Structure

        f = self.x[self.n :] / self.n
        cell = self.orig_cell @ f.T
        pos = self.x[: self.n] @ f.T
        return Structure(Lattice(cell), self.numbers, pos, coords_are_cartesian=True)

    def gradient(self, forces: np.ndarray, stress: np.ndarray) -> np.ndarray:
        """UnitCellFilter's generalised forces (n + 3, 3)."""
        f = self.x[self.n :] / self.n
        cell = self.orig_cell @ f.T
        vol = abs(float(np.linalg.det(cell)))
        g = np.zeros((self.n + 3, 3))
        g[: self.n] = forces @ f
        if self.relax_cell:
            virial = -vol * 0.5 * (stress + stress.T)
            virial = np.linalg.solve(f, virial.T).T
            g[self.n :] = virial / self.n
        return g

    def step(self, g: np.ndarray) -> None:
        """One ASE FIRE step (``ase.optimize.FIRE.step`` without the downhill check)."""
        p = FIRE_PARAMS
        if self.vel is None:
            self.vel = np.zeros_like(self.x)
        else:
            vf = float(np.vdot(g, self.vel))
            if vf > 0.0:
                g2 = float(np.vdot(g, g))
                self.vel = (1.0 - self.a) * self.vel + self.a * g / math.sqrt(g2) * math.sqrt(
                    float(np.vdot(self.vel, self.vel))
                )
                if self.nsteps_pos > p["Nmin"]:
                    self.dt = min(self.dt * p["finc"], p["dtmax"])
                    self.a *= p["fa"]
                self.nsteps_pos += 1
            else:
                self.vel[:] *= 0.0
                self.a = p["astart"]
                self.dt *= p["fdec"]
                self.nsteps_pos = 0
        self.vel += self.dt * g
        dr = self.dt * self.vel
        norm = math.sqrt(float(np.vdot(dr, dr)))
        if norm > p["maxstep"]:
            dr = p["maxstep"] * dr / norm
        self.x = self.x + dr
        self.steps += 1


def _system(index: int, s, relax_cell: bool) -> _System:
    n = len(s)
    orig = np.array(s.lattice.matrix, dtype=np.float64)
    x = np.zeros((n + 3, 3))
    x[:n] = np.array(s.cart_coords, dtype=np.float64)
    x[n:] = n * np.eye(3)
    return _System(index, [site.specie for site in s], orig, x, n, relax_cell)


@dataclass
class RelaxResult:
    """Result of :func:`batched_relax`.

    Attributes:
        energy_per_atom: (N,) eV/atom at the final structure (NaN: skipped or failed).
        structures: Final structures (the input where skipped or failed).
        steps: (N,) FIRE steps taken.
        converged: (N,) whether the largest generalised force fell below ``fmax``.
        calls: Potential calls made (one per optimisation step over the whole batch).
        max_batch: Largest number of structures evaluated in one call.
    """

    energy_per_atom: np.ndarray
    structures: list
    steps: np.ndarray
    converged: np.ndarray
    calls: int = 0
    max_batch: int = 0


def batched_relax(
    potential: BatchedPotential,
    structures: Sequence[Any],
    steps: int = 500,
    fmax: float = 0.1,
    relax_cell: bool = True,
    max_atoms: int | None = None,
    max_structures: int | None = None,
    task: str | None = None,
    min_volume_per_atom: float = MIN_VOLUME_PER_ATOM,
) -> RelaxResult:
    """Relax many structures with ASE's FIRE on UnitCellFilter coordinates, all running ones per call.

    Args:
        potential: A :class:`BatchedPotential`.
        structures: pymatgen ``Structure`` objects.
        steps: Most FIRE steps per structure (0: single points only).
        fmax: Force threshold, eV/Å (cell rows included, as ASE's filters do).
        relax_cell: Relax the cell too (False: positions only).
        max_atoms: Most atoms in one call (default: 4,000 on CUDA, 400 on CPU).
        max_structures: Most structures in one call (default: 512 on CUDA, 32 on CPU).
        task: Name under which progress is reported (None: silent).
        min_volume_per_atom: Cells denser than this (Å³ per atom) get NaN without being passed on.

    Returns:
        A :class:`RelaxResult`. A batch the potential fails on is retried one structure at a time, so one bad
        cell costs only itself (NaN energy, its input structure kept).

    """
    structures = list(structures)
    n = len(structures)
    cuda = str(getattr(potential, "device", "cpu")).startswith("cuda")
    max_atoms = max_atoms or (4000 if cuda else 400)
    max_structures = max_structures or (512 if cuda else 32)
    energies = np.full(n, np.nan)
    finals = list(structures)
    nsteps = np.zeros(n, dtype=int)
    conv = np.zeros(n, dtype=bool)
    queue = [i for i, s in enumerate(structures) if len(s) > 0 and s.volume / len(s) >= min_volume_per_atom]
    queue.reverse()
    active: list[_System] = []
    calls = max_batch = done = 0
    total = len(queue)
    t_start, t_potential = time.perf_counter(), 0.0
    while queue or active:
        atoms_in = sum(s.n for s in active)
        while queue and len(active) < max_structures:
            nxt = len(structures[queue[-1]])
            if active and atoms_in + nxt > max_atoms:
                break
            i = queue.pop()
            active.append(_system(i, structures[i], relax_cell))
            atoms_in += nxt
        t_call = time.perf_counter()
        current = [s.structure() for s in active]
        try:
            results: list = potential.compute(current)
        except Exception:  # noqa: BLE001 - retry one by one so that one bad cell costs only itself
            results = []
            for c in current:
                try:
                    results.append(potential.compute([c])[0])
                except Exception:  # noqa: BLE001
                    results.append(None)
        calls += 1
        t_potential += time.perf_counter() - t_call
        max_batch = max(max_batch, len(active))
        still = []
        for sysm, cur, res in zip(active, current, results):
            if res is None or not np.isfinite(res[0]) or not np.isfinite(res[1]).all():
                done += 1
                continue
            e, f, st = res
            g = sysm.gradient(f, st)
            converged = float(np.sqrt((g**2).sum(axis=1)).max()) < fmax
            if converged or sysm.steps >= steps:
                energies[sysm.index] = e / sysm.n
                finals[sysm.index] = cur if steps > 0 else structures[sysm.index]
                nsteps[sysm.index] = sysm.steps
                conv[sysm.index] = converged
                done += 1
                continue
            sysm.step(g)
            still.append(sysm)
        active = still
        if task and (calls % 20 == 0 or not (queue or active)):
            report(f"{task} relaxations (≤ {steps} steps)", done, total)
        if task and calls % 100 == 0:
            wall = time.perf_counter() - t_start
            note(f"{task}: call {calls}, {done} of {total} done, {len(active)} running; {wall:.0f} s, of which "
                 f"{t_potential:.0f} s in the potential (structures, graphs, forward)")
    return RelaxResult(energies, finals, nsteps, conv, calls, max_batch)


def single_points(
    potential: BatchedPotential, structures: Sequence[Any], max_atoms: int | None = None,
    max_structures: int | None = None, task: str | None = None,
) -> np.ndarray:
    """Energies per atom (eV/atom) of structures as given, in batched calls (NaN where the potential fails)."""
    return batched_relax(potential, structures, steps=0, max_atoms=max_atoms, max_structures=max_structures,
                         task=task).energy_per_atom


__all__ = [
    "FIRE_PARAMS",
    "POTENTIALS",
    "BatchedPotential",
    "CHGNetBatch",
    "RelaxResult",
    "SevenNetBatch",
    "batched_relax",
    "load_potential",
    "resolve_device",
    "single_points",
]
