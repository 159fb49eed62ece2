"""Tests of the periodic radius graph against pymatgen and for its invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from mmmat.data.graph import radius_graph_pbc, radius_graph_pbc_from_frac

SPECIES = ["H", "Li", "O", "Na", "Si", "Fe", "Cu", "Ba"]
BOUNDARY_TOL = 1e-7  # pairs this close to the cutoff may fall on either side


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_lattice(rng: np.random.Generator, thin: bool = False) -> np.ndarray:
    """Random triclinic lattice (rows, Å), lengths 2.5-9 Å, angles 60-120°, randomly rotated."""
    while True:
        abc = rng.uniform(2.5, 9.0, 3)
        angles = rng.uniform(60.0, 120.0, 3)
        if thin:
            abc[rng.integers(3)] = rng.uniform(2.5, 3.0)
            angles[rng.integers(3)] = rng.choice([rng.uniform(60.0, 64.0), rng.uniform(116.0, 120.0)])
        try:
            lat = Lattice.from_parameters(*abc, *angles)
        except ValueError:
            continue
        if lat.volume > 0.15 * np.prod(abc):
            return lat.matrix @ random_rotation(rng).T


def random_structure(rng: np.random.Generator, n_atoms: int, thin: bool = False) -> Structure:
    matrix = random_lattice(rng, thin)
    species = [SPECIES[k] for k in rng.integers(len(SPECIES), size=n_atoms)]
    return Structure(Lattice(matrix), species, rng.random((n_atoms, 3)))


def graph_of(structures: list[Structure], cutoff: float, dtype=torch.float64, **kwargs):
    pos = torch.tensor(np.concatenate([s.cart_coords for s in structures]), dtype=dtype)
    lattice = torch.tensor(np.array([s.lattice.matrix for s in structures]), dtype=dtype)
    batch = torch.repeat_interleave(torch.arange(len(structures)), torch.tensor([len(s) for s in structures]))
    return radius_graph_pbc(pos, lattice, batch, cutoff, **kwargs)


def edge_dict(edge_index, offsets, distances) -> dict[tuple[int, ...], float]:
    """{(target i, source j, o0, o1, o2): distance}."""
    keys = zip(edge_index[1].tolist(), edge_index[0].tolist(), offsets.tolist())
    out = {(i, j, *o): d for (i, j, o), d in zip(keys, distances.tolist())}
    assert len(out) == edge_index.shape[1], "duplicate edges"
    return out


def pymatgen_dict(structure: Structure, cutoff: float, shift: int = 0) -> dict[tuple[int, ...], float]:
    centers, points, images, dists = structure.get_neighbor_list(cutoff)
    return {
        (int(c) + shift, int(p) + shift, *map(int, np.round(o))): float(d)
        for c, p, o, d in zip(centers, points, images, dists)
    }


def assert_same_edges(ours: dict, ref: dict, cutoff: float, atol: float = 1e-5) -> None:
    for key in set(ours) ^ set(ref):
        d = ours.get(key, ref.get(key))
        assert abs(d - cutoff) < BOUNDARY_TOL, f"edge {key} at {d} Å is in only one graph"
    common = set(ours) & set(ref)
    assert len(common) >= 0.99 * max(len(ours), 1)
    diff = max((abs(ours[k] - ref[k]) for k in common), default=0.0)
    assert diff < atol


def neighbour_distances(edge_index, distances, n_atoms: int) -> list[np.ndarray]:
    tgt = edge_index[1].numpy()
    d = distances.detach().numpy()
    return [np.sort(d[tgt == i]) for i in range(n_atoms)]


@pytest.fixture(scope="module")
def cells() -> list[tuple[Structure, float]]:
    rng = np.random.default_rng(20240611)
    out = []
    for k in range(24):
        s = random_structure(rng, int(rng.integers(1, 13)), thin=k % 3 == 0)
        out.append((s, float(rng.uniform(4.0, 7.0))))
    return out


def test_matches_pymatgen_on_random_triclinic_cells(cells):
    several_images = 0
    for s, cutoff in cells:
        ours = edge_dict(*graph_of([s], cutoff))
        ref = pymatgen_dict(s, cutoff)
        assert len(ref) > 0
        assert_same_edges(ours, ref, cutoff)
        several_images += max(abs(k[2 + a]) for k in ours for a in range(3)) >= 2
    assert several_images >= 5  # thin cells exercised more than one image per axis


def test_batch_is_concatenation_of_single_crystals(cells):
    structures = [s for s, _ in cells]
    cutoff = 5.5
    ei, off, dist = graph_of(structures, cutoff)
    parts, shift = [], 0
    for s in structures:
        e, o, d = graph_of([s], cutoff)
        parts.append((e + shift, o, d))
        shift += len(s)
    assert torch.equal(ei, torch.cat([p[0] for p in parts], dim=1))
    assert torch.equal(off, torch.cat([p[1] for p in parts]))
    torch.testing.assert_close(dist, torch.cat([p[2] for p in parts]), rtol=0, atol=1e-12)
    # and the whole batch against pymatgen
    ref, shift = {}, 0
    for s in structures:
        ref.update(pymatgen_dict(s, cutoff, shift))
        shift += len(s)
    assert_same_edges(edge_dict(ei, off, dist), ref, cutoff)
    # edges are sorted by target, then source
    key = ei[1] * len(ei[0]) + ei[0]
    assert bool((key[1:] >= key[:-1]).all())


def test_chunking_gives_the_same_graph(cells):
    structures = [s for s, _ in cells[:8]]
    full = graph_of(structures, 5.0)
    chunked = graph_of(structures, 5.0, max_candidates=500)
    for a, b in zip(full, chunked):
        assert torch.equal(a, b)


def test_atom_order_invariance(cells):
    rng = np.random.default_rng(1)
    for s, cutoff in cells[:8]:
        perm = rng.permutation(len(s))
        permuted = Structure(s.lattice, [s.species[p] for p in perm], s.frac_coords[perm])
        ref = edge_dict(*graph_of([s], cutoff))
        ours = edge_dict(*graph_of([permuted], cutoff))
        relabelled = {(int(perm[i]), int(perm[j]), *o): d for (i, j, *o), d in ours.items()}
        assert relabelled.keys() == ref.keys()
        assert max(abs(relabelled[k] - ref[k]) for k in ref) < 1e-10


def supercell(s: Structure, scale: tuple[int, int, int]) -> tuple[Structure, np.ndarray]:
    """Diagonal supercell built by hand; returns it and the original index of each of its atoms."""
    shifts = np.array([(a, b, c) for a in range(scale[0]) for b in range(scale[1]) for c in range(scale[2])])
    frac = np.concatenate([(s.frac_coords + t) / np.array(scale) for t in shifts])
    lattice = Lattice(s.lattice.matrix * np.array(scale)[:, None])
    species = [sp for _ in shifts for sp in s.species]
    return Structure(lattice, species, frac), np.tile(np.arange(len(s)), len(shifts))


@pytest.mark.parametrize("scale", [(2, 1, 1), (2, 2, 2)])
def test_supercell_invariance(cells, scale):
    for s, cutoff in cells[:6]:
        ei, _, d = graph_of([s], cutoff)
        ref = neighbour_distances(ei, d, len(s))
        big, origin = supercell(s, scale)
        ei, _, d = graph_of([big], cutoff)
        got = neighbour_distances(ei, d, len(big))
        for k, o in enumerate(origin):
            assert len(got[k]) == len(ref[o])
            np.testing.assert_allclose(got[k], ref[o], atol=1e-8)


@pytest.mark.parametrize("matrix", [[[1, 1, 0], [0, 1, 0], [0, 0, 1]], [[1, 0, 0], [2, 1, 0], [-1, 1, 1]]])
def test_unimodular_cell_change_invariance(cells, matrix):
    m = np.array(matrix, dtype=float)
    assert abs(np.linalg.det(m)) == pytest.approx(1.0)
    for s, cutoff in cells[:8]:
        ei, _, d = graph_of([s], cutoff)
        ref = neighbour_distances(ei, d, len(s))
        new_frac = (s.frac_coords @ np.linalg.inv(m)) % 1.0
        other = Structure(Lattice(m @ s.lattice.matrix), s.species, new_frac)
        ei, _, d = graph_of([other], cutoff)
        got = neighbour_distances(ei, d, len(s))
        for k in range(len(s)):
            assert len(got[k]) == len(ref[k])
            np.testing.assert_allclose(got[k], ref[k], atol=1e-8)


def test_translation_invariance(cells):
    rng = np.random.default_rng(2)
    for s, cutoff in cells[:8]:
        pos = torch.tensor(s.cart_coords)
        lattice = torch.tensor(s.lattice.matrix)[None]
        batch = torch.zeros(len(s), dtype=torch.long)
        ei, off, d = radius_graph_pbc(pos, lattice, batch, cutoff)
        shift = torch.tensor(rng.normal(scale=3.0, size=3))
        # unwrapped shift: identical graph
        ei2, off2, d2 = radius_graph_pbc(pos + shift, lattice, batch, cutoff)
        assert torch.equal(ei, ei2) and torch.equal(off, off2)
        torch.testing.assert_close(d, d2, rtol=0, atol=1e-10)
        # shifted and wrapped back into the cell: same neighbour distances per atom
        frac = torch.remainder((pos + shift) @ torch.linalg.inv(lattice[0]), 1.0)
        ei3, _, d3 = radius_graph_pbc_from_frac(frac, lattice, batch, cutoff)
        for a, b in zip(neighbour_distances(ei, d, len(s)), neighbour_distances(ei3, d3, len(s))):
            np.testing.assert_allclose(a, b, atol=1e-8)


def test_rotation_invariance(cells):
    rng = np.random.default_rng(3)
    for s, cutoff in cells[:8]:
        rot = torch.tensor(random_rotation(rng))
        pos = torch.tensor(s.cart_coords)
        lattice = torch.tensor(s.lattice.matrix)[None]
        batch = torch.zeros(len(s), dtype=torch.long)
        ei, off, d = radius_graph_pbc(pos, lattice, batch, cutoff)
        ei2, off2, d2 = radius_graph_pbc(pos @ rot.T, lattice @ rot.T, batch, cutoff)
        assert torch.equal(ei, ei2) and torch.equal(off, off2)
        torch.testing.assert_close(d, d2, rtol=0, atol=1e-10)


def test_atoms_outside_the_cell(cells):
    rng = np.random.default_rng(4)
    for s, cutoff in cells[:8]:
        lattice = torch.tensor(s.lattice.matrix)[None]
        batch = torch.zeros(len(s), dtype=torch.long)
        frac = torch.tensor(s.frac_coords)
        n = torch.tensor(rng.integers(-3, 4, size=(len(s), 3)))
        ref = edge_dict(*radius_graph_pbc_from_frac(frac, lattice, batch, cutoff))
        ours = edge_dict(*radius_graph_pbc_from_frac(frac + n, lattice, batch, cutoff))
        # frac[j] + n[j] + o' - frac[i] - n[i] = frac[j] + o - frac[i]  =>  o' = o - n[j] + n[i]
        nn = n.tolist()
        mapped = {(i, j, *(o[a] - nn[j][a] + nn[i][a] for a in range(3))): d for (i, j, *o), d in ref.items()}
        assert mapped.keys() == ours.keys()
        assert max(abs(mapped[k] - ours[k]) for k in ours) < 1e-9


def test_single_atom_sees_its_periodic_images():
    lattice = torch.eye(3, dtype=torch.float64)[None] * 3.0
    frac = torch.tensor([[0.25, 0.5, 0.75]], dtype=torch.float64)
    ei, off, d = radius_graph_pbc_from_frac(frac, lattice, None, 3.5)
    assert ei.shape == (2, 6) and bool((ei == 0).all())
    assert sorted(map(tuple, off.tolist())) == sorted(
        [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    )
    torch.testing.assert_close(d, torch.full((6,), 3.0, dtype=torch.float64))
    ei, off, d = radius_graph_pbc_from_frac(frac, lattice, None, 4.5)
    assert ei.shape[1] == 18  # 6 faces + 12 edges (3 * sqrt 2 = 4.24 Å)
    # self loop only on request
    ei, off, d = radius_graph_pbc_from_frac(frac, lattice, None, 3.5, self_loops=True)
    assert ei.shape[1] == 7 and (off == 0).all(dim=1).sum() == 1 and d.min() == 0


def test_single_atom_in_tiny_skewed_cell_matches_pymatgen():
    s = Structure(Lattice.from_parameters(1.3, 2.6, 1.9, 62, 117, 75), ["Cu"], [[0.1, 0.7, 0.3]])
    ours = edge_dict(*graph_of([s], 6.0))
    assert len(ours) > 200 and max(abs(o) for k in ours for o in k[2:]) >= 4
    assert_same_edges(ours, pymatgen_dict(s, 6.0), 6.0)


def test_max_num_neighbors_keeps_the_nearest(cells):
    structures = [s for s, _ in cells[:10]]
    n_atoms = sum(len(s) for s in structures)
    full_ei, full_off, full_d = graph_of(structures, 6.0)
    full = edge_dict(full_ei, full_off, full_d)
    ref = neighbour_distances(full_ei, full_d, n_atoms)
    for k in (1, 5, 12):
        ei, off, d = graph_of(structures, 6.0, max_num_neighbors=k)
        kept = edge_dict(ei, off, d)
        assert kept.keys() <= full.keys()
        got = neighbour_distances(ei, d, n_atoms)
        for a in range(n_atoms):
            assert len(got[a]) == min(k, len(ref[a]))
            np.testing.assert_allclose(got[a], ref[a][:k], atol=1e-12)


def test_max_num_neighbors_breaks_ties_deterministically():
    lattice = torch.eye(3, dtype=torch.float64)[None] * 3.0
    frac = torch.zeros(1, 3, dtype=torch.float64)
    first = radius_graph_pbc_from_frac(frac, lattice, None, 3.5, max_num_neighbors=4)
    again = radius_graph_pbc_from_frac(frac, lattice, None, 3.5, max_num_neighbors=4)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # six equal distances: the first four in offset order are kept
    assert first[1].tolist() == [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, 1]]


def test_float32_and_from_frac(cells):
    structures = [s for s, _ in cells[:10]]
    ei64, off64, d64 = graph_of(structures, 5.0)
    ei32, off32, d32 = graph_of(structures, 5.0, dtype=torch.float32)
    assert d32.dtype == torch.float32
    assert edge_dict(ei64, off64, d64).keys() == edge_dict(ei32, off32, d32).keys()
    torch.testing.assert_close(d32.double(), d64, rtol=0, atol=1e-4)
    frac = torch.tensor(np.concatenate([s.frac_coords for s in structures]))
    lattice = torch.tensor(np.array([s.lattice.matrix for s in structures]))
    batch = torch.repeat_interleave(torch.arange(len(structures)), torch.tensor([len(s) for s in structures]))
    ei, off, d = radius_graph_pbc_from_frac(frac, lattice, batch, 5.0)
    assert torch.equal(ei, ei64) and torch.equal(off, off64)
    torch.testing.assert_close(d, d64, rtol=0, atol=1e-10)


def test_distances_are_differentiable(cells):
    s, cutoff = cells[1]
    pos = torch.tensor(s.cart_coords, requires_grad=True)
    lattice = torch.tensor(s.lattice.matrix)[None].requires_grad_(True)
    batch = torch.zeros(len(s), dtype=torch.long)
    _, _, d = radius_graph_pbc(pos, lattice, batch, cutoff)
    (d**2).sum().backward()
    assert pos.grad is not None and lattice.grad is not None
    torch.testing.assert_close(pos.grad.sum(0), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-8)
    assert torch.autograd.gradcheck(lambda p: radius_graph_pbc(p, lattice.detach(), batch, cutoff)[2], pos)


def test_edge_cases_and_errors():
    lattice = torch.eye(3, dtype=torch.float64)[None] * 4.0
    ei, off, d = radius_graph_pbc(torch.zeros(0, 3, dtype=torch.float64), lattice, None, 5.0)
    assert ei.shape == (2, 0) and off.shape == (0, 3) and d.shape == (0,)
    ei, off, d = radius_graph_pbc(torch.zeros(1, 3, dtype=torch.float64), lattice, None, 3.9)
    assert ei.shape == (2, 0)
    # two atoms on the same point are not joined to each other, only to the images
    pos = torch.zeros(2, 3, dtype=torch.float64)
    ei, off, d = radius_graph_pbc(pos, lattice, None, 4.5)
    assert ei.shape[1] == 2 * 2 * 6 and bool((d > 3.9).all())
    two = torch.cat([lattice, lattice])
    with pytest.raises(ValueError, match="sorted"):
        radius_graph_pbc(torch.zeros(2, 3), two, torch.tensor([1, 0]), 3.0)
    with pytest.raises(ValueError, match="batch"):
        radius_graph_pbc(torch.zeros(2, 3), two, None, 3.0)
    with pytest.raises(ValueError, match="cutoff"):
        radius_graph_pbc(torch.zeros(2, 3), lattice, None, 0.0)
    with pytest.raises(ValueError, match="degenerate"):
        radius_graph_pbc(torch.zeros(2, 3), torch.zeros(1, 3, 3), None, 3.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(cells):
    structures = [s for s, _ in cells]
    cpu = graph_of(structures, 5.5, max_num_neighbors=16)
    pos = torch.tensor(np.concatenate([s.cart_coords for s in structures]), device="cuda")
    lattice = torch.tensor(np.array([s.lattice.matrix for s in structures]), device="cuda")
    batch = torch.repeat_interleave(
        torch.arange(len(structures)), torch.tensor([len(s) for s in structures])
    ).cuda()
    gpu = radius_graph_pbc(pos, lattice, batch, 5.5, max_num_neighbors=16)
    assert all(t.device.type == "cuda" for t in gpu)
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
    torch.testing.assert_close(cpu[2], gpu[2].cpu(), rtol=0, atol=1e-10)
