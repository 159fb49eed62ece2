"""Tests of mmmat.evaluation.chgnet_graph against CHGNet's own graph converter and ``predict_graph``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("chgnet")
pytestmark = [pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad"),
              pytest.mark.usefixtures("one_torch_thread")]

from pymatgen.core import Lattice, Structure  # noqa: E402

from mmmat.evaluation.chgnet_graph import chgnet_edges, chgnet_efs  # noqa: E402

E_ATOL = 1e-5  # eV/atom
F_ATOL = 2e-4  # eV/Å
S_ATOL = 1e-3  # GPa


def _structures() -> dict[str, Structure]:
    """Small periodic structures covering the graph's special cases."""
    rock_salt = Structure(
        Lattice.cubic(5.64), ["Na"] * 4 + ["Cl"] * 4,
        [[0, 0, 0], [.5, .5, 0], [.5, 0, .5], [0, .5, .5], [.5, 0, 0], [0, .5, 0], [0, 0, .5], [.5, .5, .5]],
    )
    perovskite = Structure(
        Lattice.from_parameters(3.9, 3.95, 4.0, 89, 91, 90.5), ["Sr", "Ti", "O", "O", "O"],
        [[0, 0, 0], [.52, .49, .5], [.5, .5, .03], [.5, .02, .5], [0, .5, .48]],
    )
    bcc = Structure(Lattice(1.435 * np.array([[-1, 1, 1], [1, -1, 1], [1, 1, -1]])), ["Fe"], [[0, 0, 0]])
    # H is 4.5 Å from the nearest Li: in the atom graph but not the bond graph.
    sparse = Structure(Lattice.orthorhombic(3.4, 3.5, 9.0), ["Li", "Li", "H"], [[0, 0, 0], [.5, .5, 0], [0, 0, .5]])
    triclinic = Structure(
        Lattice.from_parameters(4.6, 5.3, 6.2, 72, 98, 111), ["Mg", "Al", "Si", "O", "O", "O", "O"],
        [[1.477, .762, .46], [.708, .2, .204], [.783, -.285, .691], [.102, .911, .315], [.519, .413, .295],
         [.764, .9, .978], [.096, .359, -.111]],
    )
    strained = rock_salt.copy()
    strained.apply_strain([0.03, -0.02, 0.05])
    rattle = np.random.default_rng(0).normal(0, 0.08, (8, 3))
    rattled = Structure(strained.lattice, strained.species, strained.cart_coords + rattle, coords_are_cartesian=True)
    isolated = Structure(Lattice.cubic(7.0), ["Cu"], [[0, 0, 0]])
    # Lattice vector a is exactly 3 Å long, the bond-graph cutoff.
    boundary = Structure(Lattice.from_parameters(3.0, 3.1, 3.3, 60, 65, 70), ["C", "N"],
                         [[1.3, -0.2, 0.1], [0.4, 0.6, 2.7]], coords_are_cartesian=True)
    return {"rock_salt": rock_salt, "perovskite": perovskite, "bcc": bcc, "sparse": sparse,
            "triclinic": triclinic, "rattled": rattled, "isolated": isolated, "boundary": boundary}


@pytest.fixture(scope="module")
def model():
    from mmmat.evaluation.generation_stability import load_chgnet

    return load_chgnet("cpu")


@pytest.fixture(scope="module")
def converter(model):
    from chgnet.graph import CrystalGraphConverter

    conv = model.graph_converter
    return CrystalGraphConverter(atom_graph_cutoff=conv.atom_graph_cutoff, bond_graph_cutoff=conv.bond_graph_cutoff,
                                 on_isolated_atoms="ignore")


@pytest.fixture(scope="module")
def structures() -> list[Structure]:
    return list(_structures().values())


@pytest.fixture(scope="module")
def reference(model, converter, structures):
    return _reference(model, converter, structures)


def _batch(structures: list[Structure], dtype=torch.float64) -> tuple[torch.Tensor, ...]:
    pos = torch.tensor(np.concatenate([s.cart_coords for s in structures]), dtype=dtype)
    lattice = torch.tensor(np.stack([s.lattice.matrix for s in structures]), dtype=dtype)
    numbers = torch.tensor(np.concatenate([s.atomic_numbers for s in structures]))
    counts = torch.tensor([len(s) for s in structures])
    return pos, lattice, numbers, counts


def _reference(model, converter, structures: list[Structure]) -> tuple[np.ndarray, ...]:
    preds = model.predict_graph([converter(s) for s in structures], task="efs", batch_size=len(structures))
    preds = [preds] if isinstance(preds, dict) else preds
    return (np.array([float(p["e"]) for p in preds]), np.concatenate([p["f"] for p in preds]),
            np.stack([p["s"] for p in preds]))


def _assert_close(ours, ref) -> None:
    energy, forces, stress = (t.numpy() for t in ours)
    np.testing.assert_allclose(energy, ref[0], rtol=0, atol=E_ATOL)
    np.testing.assert_allclose(forces, ref[1], rtol=0, atol=F_ATOL)
    np.testing.assert_allclose(stress, ref[2], rtol=0, atol=S_ATOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_predict_graph(model, structures, reference, dtype):
    with torch.no_grad():
        ours = chgnet_efs(model, *_batch(structures, dtype))
    assert ours[0].shape == (len(structures),)
    assert ours[1].shape == (sum(map(len, structures)), 3)
    assert ours[2].shape == (len(structures), 3, 3)
    _assert_close(ours, reference)


def test_graph_sizes_match_converter(model, converter):
    structures = [s for name, s in _structures().items() if name != "boundary"]
    pos, lattice, _, counts = _batch(structures)
    batch = torch.repeat_interleave(torch.arange(len(structures)), counts)
    conv = model.graph_converter
    edges = chgnet_edges(pos, lattice, batch, conv.atom_graph_cutoff, conv.bond_graph_cutoff)
    n = len(structures)
    n_directed = torch.bincount(batch[edges.center], minlength=n).tolist()
    n_undirected = torch.bincount(batch[edges.center[edges.undirected2directed]], minlength=n).tolist()
    n_angles = torch.bincount(batch[edges.center[edges.angle_edges[0]]], minlength=n).tolist()
    graphs = [converter(s) for s in structures]
    assert n_directed == [g.atom_graph.reshape(-1, 2).shape[0] for g in graphs]
    assert n_undirected == [len(g.undirected2directed) for g in graphs]
    assert n_angles == [g.bond_graph.reshape(-1, 5).shape[0] for g in graphs]
    assert n_angles[list(_structures()).index("sparse")] > 0

    # Each undirected edge joins (i, j, n) and (j, i, -n); bond-graph pairs share their centre.
    d2u, u2d = edges.directed2undirected, edges.undirected2directed
    assert torch.equal(d2u[u2d], torch.arange(len(u2d)))
    assert torch.equal(torch.bincount(d2u), torch.full((len(u2d),), 2))
    order = torch.argsort(d2u * 2 + (torch.arange(len(d2u)) != u2d[d2u]).long())
    a, b = order[0::2], order[1::2]
    assert torch.equal(edges.center[a], edges.neighbor[b]) and torch.equal(edges.image[a], -edges.image[b])
    e1, e2 = edges.angle_edges
    assert torch.equal(edges.center[e1], edges.center[e2]) and bool((e1 != e2).all())


def test_isolated_atoms_only(model, converter):
    structures = [Structure(Lattice.cubic(7.0), ["Cu"], [[0, 0, 0]]),
                  Structure(Lattice.cubic(8.0), ["O", "Zn"], [[0, 0, 0], [.5, .5, .5]])]
    _assert_close(chgnet_efs(model, *_batch(structures)), _reference(model, converter, structures))


def test_atom_order_invariance(model):
    structures = [_structures()[k] for k in ("perovskite", "triclinic", "rattled")]
    pos, lattice, numbers, counts = _batch(structures)
    perm = torch.cat([torch.randperm(int(c), generator=torch.Generator().manual_seed(1)) + int(o)
                      for c, o in zip(counts, torch.cumsum(counts, 0) - counts)])
    energy, forces, stress = chgnet_efs(model, pos, lattice, numbers, counts)
    energy_p, forces_p, stress_p = chgnet_efs(model, pos[perm], lattice, numbers[perm], counts)
    torch.testing.assert_close(energy_p, energy, rtol=0, atol=E_ATOL)
    torch.testing.assert_close(forces_p, forces[perm], rtol=0, atol=F_ATOL)
    torch.testing.assert_close(stress_p, stress, rtol=0, atol=S_ATOL)
