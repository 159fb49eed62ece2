"""Batched MLIP relaxations equal one-by-one ones (CPU, small structures), and the judge's metric conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

pytest.importorskip("pymatgen")


def _structures():
    from pymatgen.core import Lattice, Structure

    ss = [
        Structure(Lattice.cubic(5.8), ["Na"] * 4 + ["Cl"] * 4,
                  [[0, 0, 0], [.5, .5, 0], [.5, 0, .5], [0, .5, .5], [.5, 0, 0], [0, .5, 0], [0, 0, .5], [.5, .5, .5]]),
        Structure(Lattice.cubic(5.6), ["Si"] * 2, [[0, 0, 0], [.25, .25, .25]]),
        Structure(Lattice.hexagonal(3.1, 5.0), ["Mg", "O"], [[1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, .5]]),
    ]
    for s in ss:
        s.perturb(0.08, seed=0)
    return ss


#: Tolerances: batched vs one-by-one (same algorithm, float32 potential in different batch layouts).
E_TOL = 1e-4  # eV/atom
POS_TOL = 1e-3  # Å
#: Against ASE's FIRE(UnitCellFilter) one structure at a time (same arithmetic, ASE's bookkeeping).
E_TOL_ASE = 1e-3
POS_TOL_ASE = 1e-2


@pytest.mark.parametrize("name", ["chgnet", "sevennet"])
def test_batched_relax_equals_one_by_one(name):
    pytest.importorskip({"chgnet": "chgnet", "sevennet": "sevenn"}[name])
    from mmmat.evaluation.relax import batched_relax, load_potential

    pot = load_potential(name, "cpu")
    ss = _structures()
    steps = 12 if name == "chgnet" else 6
    batched = batched_relax(pot, ss, steps=steps, fmax=0.02)
    assert batched.max_batch == len(ss)  # one call per step for all structures
    assert batched.calls == steps + 1
    for i, s in enumerate(ss):
        one = batched_relax(pot, [s], steps=steps, fmax=0.02)
        assert one.steps[0] == batched.steps[i]
        assert abs(one.energy_per_atom[0] - batched.energy_per_atom[i]) < E_TOL
        a, b = one.structures[0], batched.structures[i]
        assert np.abs(a.lattice.matrix - b.lattice.matrix).max() < POS_TOL
        assert np.abs(a.cart_coords - b.cart_coords).max() < POS_TOL
        assert not np.allclose(b.cart_coords, s.cart_coords)  # it moved


def test_sevennet_device_built_batch_equals_per_structure_ase_graphs():
    pytest.importorskip("sevenn")
    from mmmat.evaluation.relax import SevenNetBatch, _tensors

    ss = _structures()
    skew = ss[0].copy()
    skew.lattice = skew.lattice.__class__.from_parameters(4.1, 4.6, 9.0, 70, 80, 110)  # a thin triclinic cell
    ss.append(skew)
    dev_pot, ase_pot = SevenNetBatch("cpu"), SevenNetBatch("cpu", device_graphs=False)
    assert dev_pot.device_graphs and not ase_pot.device_graphs
    dev_batch, ase_batch = dev_pot._device_batch(*_tensors(ss, "cpu")), ase_pot._ase_batch(ss)
    for k in ("x", "atomic_numbers", "num_atoms", "batch", "ptr"):
        assert torch.equal(dev_batch[k], ase_batch[k]), k
    assert dev_batch.edge_index.shape == ase_batch.edge_index.shape  # the same edges, in another order

    def edges(b):
        key = [(int(i), int(j), *np.round(v, 4)) for (i, j), v in zip(b.edge_index.T.tolist(), b.edge_vec.numpy())]
        return sorted(key)

    assert edges(dev_batch) == edges(ase_batch)
    a, b = dev_pot.compute(ss), ase_pot.compute(ss)
    for (ea, fa, sa), (eb, fb, sb), s in zip(a, b, ss):
        assert abs(ea - eb) / len(s) < 1e-5  # eV/atom: float32 sums in another edge order
        assert np.abs(fa - fb).max() < 1e-4 and np.abs(sa - sb).max() < 1e-6


def test_batched_relax_follows_ase_fire_unitcellfilter():
    pytest.importorskip("chgnet")
    from ase.filters import UnitCellFilter
    from ase.optimize import FIRE
    from pymatgen.io.ase import AseAtomsAdaptor

    from mmmat.design.oracle import _calculator
    from mmmat.evaluation.relax import batched_relax, load_potential

    ss = _structures()
    steps = 12
    res = batched_relax(load_potential("chgnet", "cpu"), ss, steps=steps, fmax=0.02)
    calc = _calculator("chgnet", "cpu")
    for i, s in enumerate(ss):
        atoms = AseAtomsAdaptor.get_atoms(s)
        atoms.calc = calc
        opt = FIRE(UnitCellFilter(atoms), logfile=None)
        opt.run(fmax=0.02, steps=steps)
        assert opt.nsteps == res.steps[i]
        assert abs(atoms.get_potential_energy() / len(atoms) - res.energy_per_atom[i]) < E_TOL_ASE
        assert np.abs(atoms.cell.array - res.structures[i].lattice.matrix).max() < POS_TOL_ASE
        assert np.abs(atoms.positions - res.structures[i].cart_coords).max() < POS_TOL_ASE


def test_failed_structure_costs_only_itself():
    from pymatgen.core import Lattice, Structure

    from mmmat.evaluation.relax import BatchedPotential, batched_relax

    class Flaky(BatchedPotential):
        def compute(self, structures):
            if any(len(s) == 3 for s in structures):
                raise RuntimeError("bad cell")
            return [(-1.0 * len(s), np.zeros((len(s), 3)), np.zeros((3, 3))) for s in structures]

    good = Structure(Lattice.cubic(3.0), ["Cu"], [[0, 0, 0]])
    bad = Structure(Lattice.cubic(6.0), ["Cu"] * 3, [[0, 0, 0], [.3, .3, .3], [.6, .6, .6]])
    dense = Structure(Lattice.cubic(1.0), ["Cu"], [[0, 0, 0]])
    res = batched_relax(Flaky(), [good, bad, dense, good], steps=5, fmax=0.1)
    assert res.energy_per_atom[0] == -1.0 and res.energy_per_atom[3] == -1.0
    assert np.isnan(res.energy_per_atom[1]) and np.isnan(res.energy_per_atom[2])
    assert res.structures[1] is bad


def test_unknown_elements_never_reach_the_potential():
    from pymatgen.core import Lattice, Structure

    from mmmat.evaluation.relax import BatchedPotential, batched_relax

    seen = []

    class CopperOnly(BatchedPotential):
        elements = frozenset({29})

        def compute(self, structures):
            seen.extend(s.composition.reduced_formula for s in structures)
            return [(-1.0 * len(s), np.zeros((len(s), 3)), np.zeros((3, 3))) for s in structures]

    cu = Structure(Lattice.cubic(3.6), ["Cu"], [[0, 0, 0]])
    fm = Structure(Lattice.cubic(3.6), ["Fm"], [[0, 0, 0]])  # Z = 100: beyond CHGNet's 94 embeddings
    res = batched_relax(CopperOnly(), [cu, fm], steps=3, fmax=0.1)
    assert res.energy_per_atom[0] == -1.0 and np.isnan(res.energy_per_atom[1])
    assert set(seen) == {"Cu"} and res.structures[1] is fm


def test_potentials_declare_their_elements():
    pytest.importorskip("chgnet")
    pytest.importorskip("sevenn")
    from pymatgen.core import Lattice, Structure

    from mmmat.evaluation.relax import load_potential

    fm = Structure(Lattice.cubic(3.6), ["Fm"], [[0, 0, 0]])
    nacl = _structures()[0]
    for name, n in (("chgnet", 94), ("sevennet", 89)):
        pot = load_potential(name, "cpu")
        assert len(pot.elements) == n and pot.supports(nacl) and not pot.supports(fm)
