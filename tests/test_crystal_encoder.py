"""Tests of the periodic crystal encoder: invariances, unit-cell independence, batching, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from mmmat.data.batch import Collator
from mmmat.data.schema import MaterialRecord
from mmmat.encoders import create_encoder, list_encoders
from mmmat.encoders.crystal import CrystalEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-6  # float64 model on float32 collated geometry; observed errors are about 1e-8


def random_orthogonal(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def gan() -> Structure:
    return Structure.from_spacegroup(
        "P6_3mc", Lattice.hexagonal(3.19, 5.19), ["Ga", "N"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.375]]
    )


def triclinic() -> Structure:
    rng = np.random.default_rng(0)
    lat = Lattice.from_parameters(4.1, 5.3, 6.2, 81, 97, 104)
    return Structure(lat, ["Li", "Fe", "P", "O", "O"], rng.random((5, 3)))


def record(lattice, frac, numbers, mid: str = "x") -> MaterialRecord:
    return MaterialRecord(material_id=mid, lattice=lattice, frac_coords=frac, numbers=numbers)


def rec_of(s: Structure, mid: str = "x") -> MaterialRecord:
    return MaterialRecord.from_structure(s, mid)


@pytest.fixture(scope="module")
def model() -> CrystalEncoder:
    torch.manual_seed(0)
    m = CrystalEncoder(hidden=32, num_interactions=3, cutoff=5.0, num_rbf=20, radial_dim=16, out_dim=24)
    return m.double().eval()


def embed(model, records, **collate_kw) -> torch.Tensor:
    with torch.no_grad():
        return model(Collator(**collate_kw)(records))


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    err = (a - b).abs().max().item()
    assert err < tol, f"max abs difference {err:.3g} >= {tol}"


def test_registered_and_shapes(model):
    assert "crystal/schnet" in list_encoders()
    enc = create_encoder("crystal/schnet", hidden=16, num_interactions=2, num_rbf=8, radial_dim=8, out_dim=12)
    assert isinstance(enc, CrystalEncoder) and enc.out_dim == 12
    assert create_encoder("crystal/schnet", hidden=16, num_interactions=1).out_dim == 16
    structures = [nacl(), gan(), triclinic()]
    batch = Collator()([rec_of(s, str(i)) for i, s in enumerate(structures)])
    out = enc(batch)
    assert out.shape == (3, 12) and torch.isfinite(out).all()
    nodes = enc.node_features(batch)
    assert nodes.shape == (sum(len(s) for s in structures), 16)
    emb, nodes2 = enc.encode(batch.crystal)  # the crystal graph batch alone works too
    assert torch.allclose(emb, out) and torch.allclose(nodes2, nodes)


def test_rotation_invariance(model):
    rng = np.random.default_rng(1)
    for s in (gan(), triclinic()):
        ref = embed(model, [rec_of(s)])
        for _ in range(3):
            q = random_orthogonal(rng)  # proper or improper
            rot = record(s.lattice.matrix @ q.T, s.frac_coords, s.atomic_numbers)
            assert_close(embed(model, [rot]), ref)


def test_translation_invariance(model):
    rng = np.random.default_rng(2)
    s = triclinic()
    ref = embed(model, [rec_of(s)])
    for _ in range(3):
        shift_cart = rng.normal(size=3) * 3.0
        frac = (s.frac_coords + shift_cart @ np.linalg.inv(s.lattice.matrix)) % 1.0
        out = embed(model, [record(s.lattice.matrix, frac, s.atomic_numbers)])
        assert_close(out, ref)


def test_permutation_invariance(model):
    rng = np.random.default_rng(3)
    s = triclinic()
    ref = embed(model, [rec_of(s)])
    perm = rng.permutation(len(s))
    out = embed(model, [record(s.lattice.matrix, s.frac_coords[perm], np.array(s.atomic_numbers)[perm])])
    assert_close(out, ref)


def test_supercell_invariance(model):
    for s in (gan(), triclinic()):
        ref = embed(model, [rec_of(s)])
        sup = s.copy()
        sup.make_supercell([2, 2, 1])
        assert len(sup) == 4 * len(s)
        assert_close(embed(model, [rec_of(sup)]), ref)


def test_supercell_node_features_repeat_primitive(model):
    s = triclinic()
    sup = s.copy()
    sup.make_supercell([2, 1, 2])
    with torch.no_grad():
        prim = model.node_features(Collator()([rec_of(s)]))
        big = model.node_features(Collator()([rec_of(sup)]))
    # Every supercell atom has the features of one primitive atom (order-free comparison).
    gap = torch.cdist(big, prim).min(dim=1).values
    assert gap.max().item() < TOL
    # ... and each primitive atom occurs exactly 4 times.
    assert torch.bincount(torch.cdist(big, prim).argmin(dim=1), minlength=len(s)).tolist() == [4] * len(s)


@pytest.mark.parametrize("transform", [[[1, 1, 0], [0, 1, 0], [0, 0, 1]], [[1, 0, 0], [2, 1, 0], [-1, 1, 1]]])
def test_unimodular_cell_change(model, transform):
    s = triclinic()
    ref = embed(model, [rec_of(s)])
    m = np.array(transform, dtype=float)
    assert abs(abs(np.linalg.det(m)) - 1) < 1e-12
    new_lat = m @ s.lattice.matrix  # rows: new lattice vectors, e.g. [a + b, b, c]
    frac = (s.cart_coords @ np.linalg.inv(new_lat)) % 1.0
    assert_close(embed(model, [record(new_lat, frac, s.atomic_numbers)]), ref)


def test_primitive_vs_conventional_cell(model):
    conv = nacl()
    prim = conv.get_primitive_structure()
    assert len(conv) == 8 and len(prim) == 2
    assert_close(embed(model, [rec_of(prim)]), embed(model, [rec_of(conv)]))


def test_batch_independence(model):
    a, b, c = rec_of(nacl(), "a"), rec_of(gan(), "b"), rec_of(triclinic(), "c")
    alone = embed(model, [c])
    for batch in ([a, c], [c, b, a], [a, b, c]):
        out = embed(model, batch)
        assert_close(out[[r.material_id for r in batch].index("c")], alone[0])


def test_different_crystals_differ(model):
    kcl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(6.29), ["K", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    strained = nacl()
    strained.scale_lattice(strained.volume * 1.05)
    recs = [rec_of(s, str(i)) for i, s in enumerate([nacl(), gan(), triclinic(), kcl, strained])]
    out = embed(model, recs)
    dist = torch.cdist(out, out)
    off_diag = dist[~torch.eye(len(recs), dtype=torch.bool)]
    assert off_diag.min().item() > 1e-3


def test_gradients_reach_every_parameter_and_positions():
    torch.manual_seed(0)
    enc = CrystalEncoder(hidden=16, num_interactions=2, num_rbf=12, radial_dim=8)
    batch = Collator()([rec_of(nacl(), "a"), rec_of(triclinic(), "b")])
    batch.crystal.pos.requires_grad_(True)
    batch.crystal.lattice.requires_grad_(True)
    out = enc(batch)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"
    assert batch.crystal.pos.grad.abs().sum() > 0
    assert batch.crystal.lattice.grad.abs().sum() > 0


def test_graph_from_collator_equals_graph_built_in_forward(model):
    recs = [rec_of(gan(), "a"), rec_of(triclinic(), "b")]
    pre = Collator(build_graph=True)(recs)
    lazy = Collator(build_graph=False)(recs)
    assert "edge_index" in pre.crystal and "edge_index" not in lazy.crystal
    with torch.no_grad():
        assert_close(model(lazy), model(pre))
    # A collator graph with a longer cutoff adds only edges of zero weight.
    assert_close(embed(model, recs, cutoff=6.5), embed(model, recs))


def test_distances_recomputed_from_positions(model):
    s = gan()
    ref = rec_of(s)
    strained = record(s.lattice.matrix * 1.03, s.frac_coords, s.atomic_numbers)
    batch = Collator()([ref])
    # Same graph (edge list and offsets) but scaled geometry: the encoder must use the new distances.
    batch.crystal.lattice = batch.crystal.lattice * 1.03
    batch.crystal.pos = batch.crystal.pos * 1.03
    with torch.no_grad():
        out = model(batch)
    assert_close(out, embed(model, [strained]))
    assert (out - embed(model, [ref])).abs().max().item() > 1e-3


def test_max_num_neighbors_and_isolated_atoms():
    torch.manual_seed(0)
    enc = CrystalEncoder(hidden=16, num_interactions=2, cutoff=3.0, max_num_neighbors=4)
    far = Structure(Lattice.cubic(8.0), ["Fe"], [[0, 0, 0]])  # no neighbour within 3 Å
    batch = Collator(build_graph=False)([rec_of(far, "a"), rec_of(triclinic(), "b")])
    out = enc(batch)
    assert out.shape == (2, 16) and torch.isfinite(out).all()


def test_autocast_bf16_runs():
    torch.manual_seed(0)
    enc = CrystalEncoder(hidden=16, num_interactions=2)
    batch = Collator()([rec_of(nacl(), "a"), rec_of(gan(), "b")])
    ref = enc(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(batch)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()
