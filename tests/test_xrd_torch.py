"""Tests of the torch powder-pattern calculator (against pymatgen) and of the "crystal/schnet_xrd" encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from mmmat.data.batch import Collator
from mmmat.data.schema import MaterialRecord
from mmmat.data.xrd import TWO_THETA, compute_peaks, d_to_two_theta, render_profile, xrd_profile
from mmmat.data.xrd_torch import (
    atomic_scattering_factor,
    powder_pattern_structures,
    powder_pattern_torch,
    reflections_torch,
    structure_tensors,
)
from mmmat.encoders import create_encoder, list_encoders
from mmmat.encoders.crystal_xrd import CrystalXRDEncoder
from mmmat.latent.model import MultimodalModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------- fixtures
def nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def si() -> Structure:
    return Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]])


def zno() -> Structure:
    return Structure.from_spacegroup(
        "P6_3mc", Lattice.hexagonal(3.25, 5.207), ["Zn", "O"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.382]]
    )


def srtio3() -> Structure:
    return Structure.from_spacegroup(
        "Pm-3m", Lattice.cubic(3.905), ["Sr", "Ti", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]]
    )


def triclinic() -> Structure:
    rng = np.random.default_rng(0)
    lat = Lattice.from_parameters(5.1, 6.3, 7.2, 79, 95, 108)
    return Structure(lat, ["Li", "Li", "Fe", "Fe", "P", "O", "O", "O", "O", "O"], rng.random((10, 3)))


def monoclinic() -> Structure:
    rng = np.random.default_rng(1)
    lat = Lattice.monoclinic(7.5, 6.1, 9.3, 103.0)
    return Structure.from_spacegroup("P2_1/c", lat, ["K", "Bi", "S"], rng.random((3, 3)))


CRYSTALS = {"NaCl": nacl, "Si": si, "ZnO": zno, "SrTiO3": srtio3, "triclinic": triclinic, "monoclinic": monoclinic}


def pattern(structures, dtype=torch.float64, **kw) -> np.ndarray:
    t = structure_tensors(structures, dtype=dtype)
    return powder_pattern_torch(t["lattice"], t["frac"], t["z"], t["batch"], **kw).double().numpy()


def pattern_of(lattice, frac, numbers, dtype=torch.float64) -> np.ndarray:
    lat = torch.as_tensor(np.array(lattice), dtype=dtype)[None]
    frac = torch.as_tensor(np.asarray(frac), dtype=dtype)
    z = torch.as_tensor(np.asarray(numbers), dtype=torch.long)
    return powder_pattern_torch(lat, frac, z, torch.zeros(len(z), dtype=torch.long))[0].double().numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def random_orthogonal(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def merged_peaks(structure: Structure, min_rel: float) -> np.ndarray:
    """(2θ, relative intensity %) of the torch reflections, equal-2θ reflections merged, above ``min_rel`` %."""
    t = structure_tensors([structure], dtype=torch.float64)
    r = reflections_torch(t["lattice"], t["frac"], t["z"], t["batch"])
    tt, inten = r.two_theta.numpy(), r.intensity.numpy()
    keys = np.round(tt / 1e-5).astype(np.int64)
    uniq, inv = np.unique(keys, return_inverse=True)
    total = np.bincount(inv, weights=inten)
    pos = np.array([tt[inv == i][0] for i in range(len(uniq))])
    rel = 100 * total / total.max()
    keep = rel > min_rel
    return np.stack([pos[keep], rel[keep]], 1)


# ---------------------------------------------------------------------------------------------- physics
@pytest.mark.parametrize("name", list(CRYSTALS))
def test_profile_matches_pymatgen(name):
    s = CRYSTALS[name]()
    ref = render_profile(compute_peaks(s))
    for dtype in (torch.float64, torch.float32):
        ours = pattern([s], dtype=dtype)[0]
        assert ours.shape == TWO_THETA.shape and ours.max() == pytest.approx(1.0)
        assert cosine(ours, ref) > 0.9999, name
        assert np.abs(ours - ref).max() < 1e-3, name


@pytest.mark.parametrize("name", list(CRYSTALS))
def test_peak_positions_and_intensities_match_pymatgen(name):
    s = CRYSTALS[name]()
    peaks = compute_peaks(s)
    ref = np.stack([d_to_two_theta(peaks[:, 0]), peaks[:, 1]], 1)
    ref = ref[ref[:, 1] > 0.5]
    ours = merged_peaks(s, 0.5)
    # every visible pymatgen peak is one of ours, at the same 2θ, with the same relative intensity, and back
    for a, b in ((ref, ours), (ours, ref)):
        for tt, rel in a:
            j = np.argmin(np.abs(b[:, 0] - tt))
            assert abs(b[j, 0] - tt) < 2e-4, (name, tt)
            assert abs(b[j, 1] - rel) < 0.05 + 1e-3 * rel, (name, tt, rel, b[j, 1])
    assert len(ref) == len(ours)


def test_systematic_absences_and_multiplicity():
    # fcc NaCl: only unmixed hkl; (111) and (200) carry 8 and 6 reflections; Si: (200) is absent
    t = structure_tensors([nacl()], dtype=torch.float64)
    r = reflections_torch(t["lattice"], t["frac"], t["z"], t["batch"])
    strong = r.intensity > 1e-9 * r.intensity.max()
    parity = r.hkl.remainder(2)
    assert bool(((parity == parity[:, :1]).all(1) | ~strong).all())
    d = r.d.numpy()
    assert np.isclose(d, 5.64 / np.sqrt(3)).sum() == 4 and np.isclose(d, 5.64 / 2).sum() == 3  # half-space
    t = structure_tensors([si()], dtype=torch.float64)
    r = reflections_torch(t["lattice"], t["frac"], t["z"], t["batch"])
    at_200 = np.isclose(r.d.numpy(), 5.431 / 2)
    assert at_200.any() and float(r.intensity[torch.from_numpy(at_200)].max()) < 1e-9 * float(r.intensity.max())


def test_scattering_factor_formula():
    from pymatgen.analysis.diffraction.xrd import ATOMIC_SCATTERING_PARAMS

    s2 = torch.linspace(0.0, 0.35, 15, dtype=torch.float64)
    for z, symbol in ((8, "O"), (26, "Fe"), (56, "Ba")):
        coeff = np.asarray(ATOMIC_SCATTERING_PARAMS[symbol])
        x = s2.numpy()
        expected = z - 41.78214 * x * (coeff[:, 0] * np.exp(-coeff[:, 1] * x[:, None])).sum(1)
        f = atomic_scattering_factor(torch.full((15,), z), s2).numpy()
        assert np.allclose(f, expected, rtol=1e-12, atol=1e-12)
        assert f[0] == pytest.approx(z) and (np.diff(f) < 0).all()
    assert atomic_scattering_factor(torch.tensor([0]), s2[:1]).item() == 0.0


def test_batch_equals_single_and_chunking_is_exact():
    structures = [CRYSTALS[n]() for n in CRYSTALS]
    together = pattern(structures)
    for i, s in enumerate(structures):
        assert np.abs(together[i] - pattern([s])[0]).max() < 1e-12
    tiny_chunks = pattern(structures, max_pairs=257)
    assert np.abs(tiny_chunks - together).max() < 1e-12


def test_rotation_translation_permutation_invariance():
    rng = np.random.default_rng(4)
    for s in (zno(), triclinic()):
        lat, frac, num = s.lattice.matrix, s.frac_coords, np.array(s.atomic_numbers)
        ref = pattern_of(lat, frac, num)
        for _ in range(2):
            q = random_orthogonal(rng)
            assert np.abs(pattern_of(lat @ q.T, frac, num) - ref).max() < 1e-8
            shifted = (frac + rng.normal(size=3) @ np.linalg.inv(lat) * 3.0) % 1.0
            assert np.abs(pattern_of(lat, shifted, num) - ref).max() < 1e-8
            perm = rng.permutation(len(num))
            assert np.abs(pattern_of(lat, frac[perm], num[perm]) - ref).max() < 1e-8
        # float32 geometry: equal within the rounding of the inputs
        q = random_orthogonal(rng)
        rot32 = pattern_of(lat @ q.T, frac, num, dtype=torch.float32)
        assert np.abs(rot32 - ref).max() < 2e-3


def test_cell_choice_invariance():
    s = triclinic()
    ref = pattern([s])[0]
    sup = s.copy()
    sup.make_supercell([[2, 0, 0], [0, 1, 1], [0, 0, 2]])
    m = np.array([[1, 1, 0], [0, 1, 0], [-1, 2, 1]], dtype=float)  # unimodular: a skewed cell of the crystal
    new_lat = m @ s.lattice.matrix
    skewed = Structure(Lattice(new_lat), s.species, (s.cart_coords @ np.linalg.inv(new_lat)) % 1.0)
    niggli = skewed.get_reduced_structure("niggli")
    for other in (sup, skewed, niggli):
        assert np.abs(pattern([other])[0] - ref).max() < 1e-8
    conv = nacl()
    prim = conv.get_primitive_structure()
    assert len(prim) == 2 and np.abs(pattern([prim])[0] - pattern([conv])[0]).max() < 1e-8


def test_occupancy_matches_pymatgen_for_a_disordered_crystal():
    s = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(4.2), [{"Mg": 0.6, "Ni": 0.4}, "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )
    ours = powder_pattern_structures([s])[0].double().numpy()
    assert cosine(ours, render_profile(compute_peaks(s))) > 0.9999


def test_empty_degenerate_and_out_of_range_rows_are_zero():
    lat = torch.stack([torch.eye(3) * 5.0, torch.zeros(3, 3), torch.eye(3) * 5.0, torch.eye(3) * 0.5])
    frac = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    z = torch.tensor([26, 8, 8])
    batch = torch.tensor([0, 1, 3])  # crystal 2 has no atom; crystal 3's lattice is too fine for Cu Kα
    out = powder_pattern_torch(lat, frac, z, batch)
    assert out.shape == (4, 1701) and torch.isfinite(out).all()
    assert out[0].max().item() == pytest.approx(1.0)
    assert out[1:].abs().max().item() == 0.0


def test_large_cell_runs_within_memory_bound():
    rng = np.random.default_rng(5)
    lat = Lattice.from_parameters(15.0, 14.0, 15.5, 88, 95, 101)
    big = Structure(lat, ["O"] * 12 + ["Fe"] * 8, rng.random((20, 3)))
    ref = render_profile(compute_peaks(big))
    t = structure_tensors([big, nacl()])
    bounded = powder_pattern_torch(t["lattice"], t["frac"], t["z"], t["batch"], max_pairs=20_000)
    free = powder_pattern_torch(t["lattice"], t["frac"], t["z"], t["batch"])
    assert (bounded - free).abs().max().item() < 1e-6
    assert cosine(bounded[0].double().numpy(), ref) > 0.999


# ---------------------------------------------------------------------------------------------- encoder
XRD_SMALL = {"out_dim": 16, "num_bins": 256, "widths": [8, 16], "depths": [1, 1], "hidden_dim": 32}
ENC = {"hidden": 16, "num_interactions": 2, "cutoff": 5.0, "num_rbf": 12, "radial_dim": 8, "out_dim": 24}


@pytest.fixture(scope="module")
def encoder() -> CrystalXRDEncoder:
    torch.manual_seed(0)
    return CrystalXRDEncoder(**ENC, xrd=XRD_SMALL).eval()


def rec_of(s: Structure, mid: str = "x") -> MaterialRecord:
    return MaterialRecord.from_structure(s, mid)


def record(lattice, frac, numbers, mid: str = "x") -> MaterialRecord:
    return MaterialRecord(material_id=mid, lattice=lattice, frac_coords=frac, numbers=numbers)


def embed(enc, records) -> torch.Tensor:
    with torch.no_grad():
        return enc(Collator()(records))


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-4) -> None:
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
    assert err < tol, f"relative max difference {err:.3g} >= {tol}"


def test_encoder_registered_shapes_and_pattern(encoder):
    assert "crystal/schnet_xrd" in list_encoders()
    enc = create_encoder("crystal/schnet_xrd", **ENC, xrd=XRD_SMALL, fusion="sum")
    assert enc.out_dim == 24 and enc.cutoff == 5.0
    structures = [nacl(), zno(), triclinic()]
    batch = Collator()([rec_of(s, str(i)) for i, s in enumerate(structures)])
    for e in (enc, encoder):
        out = e(batch)
        assert out.shape == (3, 24) and torch.isfinite(out).all()
    emb, atoms = encoder.encode(batch.crystal)
    assert torch.allclose(emb, encoder(batch)) and atoms.shape == (sum(len(s) for s in structures), 16)
    # the pattern the encoder computes from pos/lattice is the data set's profile of the crystal
    prof = encoder.pattern(batch).double().numpy()
    for i, s in enumerate(structures):
        assert cosine(prof[i], xrd_profile(s)[0]) > 0.9999
    with pytest.raises(ValueError, match="fusion"):
        CrystalXRDEncoder(fusion="product")


def test_encoder_invariances(encoder):
    rng = np.random.default_rng(6)
    s = triclinic()
    lat, frac, num = s.lattice.matrix, s.frac_coords, np.array(s.atomic_numbers)
    ref = embed(encoder, [rec_of(s)])
    q = random_orthogonal(rng)
    assert_close(embed(encoder, [record(lat @ q.T, frac, num)]), ref)
    shifted = (frac + rng.normal(size=3) @ np.linalg.inv(lat) * 3.0) % 1.0
    assert_close(embed(encoder, [record(lat, shifted, num)]), ref)
    perm = rng.permutation(len(num))
    assert_close(embed(encoder, [record(lat, frac[perm], num[perm])]), ref)
    sup = s.copy()
    sup.make_supercell([2, 1, 1])
    assert_close(embed(encoder, [rec_of(sup)]), ref)
    other = embed(encoder, [rec_of(zno())])
    assert (other - ref).abs().max().item() > 1e-3


def test_trains_through_multimodal_model():
    torch.manual_seed(0)
    model = MultimodalModel(
        {"crystal": {"name": "crystal/schnet_xrd", **ENC, "xrd": XRD_SMALL}, "xrd": {"name": "xrd/cnn", **XRD_SMALL}},
        embed_dim=8,
    )
    assert model.config["cutoff"] == 5.0
    records = []
    for i, s in enumerate([nacl(), si(), zno(), monoclinic()]):
        prof, peaks = xrd_profile(s)
        records.append(MaterialRecord.from_structure(s, f"m{i}", xrd=prof, xrd_peaks=peaks))
    batch = Collator(build_graph=False)(records)
    emb = model(batch)
    assert set(emb) == {"crystal", "xrd"} and emb["crystal"].shape == (4, 8)
    logits = emb["crystal"] @ emb["xrd"].T / 0.1
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    loss.backward()
    crystal_enc = model.encoders["crystal"]
    for branch in (crystal_enc.gnn, crystal_enc.xrd, crystal_enc.fuse):
        grads = [p.grad for p in branch.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0
    # embedding raw structures goes through the same encoder
    out = model.embed("crystal", [nacl(), zno()])
    assert out.shape == (2, 8) and torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-5)
