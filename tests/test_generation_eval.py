import math

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from mmmat.evaluation.generation import (
    ReferenceSet,
    compositional_validity,
    coverage,
    csp_match,
    csp_match_details,
    distribution_distances,
    evaluate_generated,
    novel_mask,
    structural_validity,
    unique_mask,
    validity,
)
from mmmat.evaluation.generation_fingerprints import (
    CN_MOTIFS,
    COMP_FP_DIM,
    STRUCT_FP_DIM,
    composition_fingerprint,
    fingerprints,
    structure_fingerprint,
)
from mmmat.evaluation.generation_stability import HullReference, chgnet_energies, stability


def rocksalt(a: str, b: str, lat: float) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(lat), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.fixture(scope="module")
def nacl():
    return rocksalt("Na", "Cl", 5.64)


@pytest.fixture(scope="module")
def mgo():
    return rocksalt("Mg", "O", 4.21)


@pytest.fixture(scope="module")
def si():
    return Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.47), ["Si"], [[0, 0, 0]])


@pytest.fixture(scope="module")
def cscl_nacl():
    return Structure(Lattice.cubic(3.3), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.fixture(scope="module")
def tiny_hull():
    """CHGNet energies of bcc Na and a Cl2 molecule in a 12 Å box: the end points of Na-Cl."""
    na = Structure(Lattice.cubic(4.23), ["Na", "Na"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    cl2 = Structure(Lattice.cubic(12.0), ["Cl", "Cl"], [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5 + 2.0 / 12]])
    e_na, _ = chgnet_energies([na], relax=True, steps=30, threads=1)
    e_cl, _ = chgnet_energies([cl2], relax=True, steps=50, relax_cell=False, threads=1)
    return HullReference(["Na2", "Cl2"], np.array([e_na[0], e_cl[0]]), ["na-bcc", "cl2-box"])


# ------------------------------------------------------------------------------------------ validity
def test_structural_validity_distances_and_volume(nacl):
    assert structural_validity(nacl)
    close = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.06, 0, 0]])  # 0.3 Å apart
    assert not structural_validity(close)
    across = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0.01, 0, 0], [0.97, 0, 0]])  # 0.2 Å via the image
    assert not structural_validity(across)
    tiny = Structure(Lattice.cubic(0.4), ["Na"], [[0, 0, 0]])  # atom 0.4 Å from its own image, 0.064 Å³
    assert not structural_validity(tiny)
    assert not structural_validity(None)


def test_compositional_validity_cdvae_rules():
    assert compositional_validity("NaCl")
    assert not compositional_validity("NaCl2")  # charge imbalanced
    assert not compositional_validity("Na3Cl")
    assert compositional_validity("Li2O")
    assert compositional_validity("CaTiO3")
    assert compositional_validity("Si")  # one element
    assert compositional_validity("LaNi5")  # all metals: an alloy
    assert not compositional_validity("LaNi5", include_alloys=False)
    # Na3Cl balances only as Na(-1) / Cl(+3), which the Pauling electronegativity test rejects
    assert compositional_validity("Na3Cl", use_pauling_test=False)


def test_validity_arrays(nacl):
    bad = Structure(Lattice.cubic(5.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]])
    v = validity([nacl, bad, None])
    assert v["struct_valid"].tolist() == [True, True, False]
    assert v["comp_valid"].tolist() == [True, False, False]
    assert v["valid"].tolist() == [True, False, False]


# ------------------------------------------------------------------------------------------ matching
def test_uniqueness_flags_a_duplicate(nacl, mgo):
    copy = nacl.get_primitive_structure()
    copy.translate_sites(list(range(len(copy))), [0.1, 0.2, 0.3])
    mask = unique_mask([nacl, mgo, copy, rocksalt("Na", "Cl", 6.0)])
    # the primitive, translated copy and the 6 % larger cell match the first NaCl (volumes are scaled)
    assert mask.tolist() == [True, True, False, False]


def test_novelty_against_reference(nacl, mgo, si, cscl_nacl):
    ref = ReferenceSet([nacl, si], ids=["nacl", "si"])
    copied = nacl.copy()
    copied.perturb(0.01, min_distance=0.005)
    assert novel_mask([copied, mgo, cscl_nacl], ref).tolist() == [False, True, True]


# ------------------------------------------------------------------------------------------ fingerprints
def test_fingerprint_shapes_and_values(nacl, si):
    fp = structure_fingerprint(nacl)
    assert fp.shape == (STRUCT_FP_DIM,) == (61,)
    # layout: per CN, its weight then weight x each motif order parameter
    pos, wt_index = 0, {}
    for cn in range(1, 25):
        wt_index[cn] = pos
        pos += 1 + len(CN_MOTIFS.get(cn, ()))
    assert pos == 61
    weights = fp[[wt_index[cn] for cn in range(1, 25)]]
    # every rocksalt site is octahedral: CN-6 weight 1 and the octahedral order parameter close to 1
    assert weights.argmax() == 5 and weights[5] == pytest.approx(1.0) and weights.sum() == pytest.approx(1.0)
    octahedral = wt_index[6] + 1 + CN_MOTIFS[6].index("octahedral")
    assert fp[octahedral] > 0.9
    c = composition_fingerprint(si.composition)
    assert c.shape == (COMP_FP_DIM,) == (132,)
    assert c[:6].tolist() == [14, 14, 0, 14, 0, 14]  # Number: min, max, range, mean, avg_dev, mode
    c2 = composition_fingerprint("NaCl2")
    assert c2[:6].tolist() == pytest.approx([11, 17, 6, 15, 8 / 3, 17])


def test_coverage_identical_and_far(nacl, mgo, si):
    s, c = fingerprints([nacl, mgo, si])
    same = coverage(s, c, s, c, comp_scaler=(np.zeros(COMP_FP_DIM), np.ones(COMP_FP_DIM)))
    assert same["cov_recall"] == 1.0 and same["cov_precision"] == 1.0
    assert same["amsd_recall"] == pytest.approx(0.0)
    far = coverage(s[:1], c[:1], s[2:], c[2:], struc_cutoff=0.01, comp_cutoff=0.01)
    assert far["cov_recall"] == 0.0 and far["cov_precision"] == 0.0
    # a failed fingerprint still counts in the COV-P denominator
    s_bad = np.vstack([s, np.full((1, STRUCT_FP_DIM), np.nan)])
    c_bad = np.vstack([c, np.full((1, COMP_FP_DIM), np.nan)])
    part = coverage(s_bad, c_bad, s, c, comp_scaler=(np.zeros(COMP_FP_DIM), np.ones(COMP_FP_DIM)))
    assert part["cov_precision"] == pytest.approx(0.75) and part["n_fingerprint_failed"] == 1


def test_distribution_distances(nacl, mgo, si):
    d = distribution_distances([nacl, mgo], [nacl, mgo], {"gap": ([1.0, 2.0], [1.0, 2.0])})
    assert d["wdist_density"] == pytest.approx(0.0) and d["wdist_num_elems"] == 0.0 and d["wdist_gap"] == 0.0
    d2 = distribution_distances([si], [nacl])
    assert d2["wdist_num_elems"] == 1.0
    assert d2["wdist_density"] == pytest.approx(abs(si.density - nacl.density))


# ------------------------------------------------------------------------------------------ CSP
def test_csp_match_perturbed_and_different(nacl, cscl_nacl):
    pert = nacl.copy()
    pert.perturb(0.05, min_distance=0.02)
    pert.scale_lattice(nacl.volume * 1.05)
    rms = csp_match_details([pert, cscl_nacl, None], [nacl, nacl, nacl])
    assert rms[0] is not None and 0 < rms[0] < 0.05
    assert rms[1] is None and rms[2] is None
    rate, rmse = csp_match([pert, cscl_nacl], [nacl, nacl])
    assert rate == 0.5 and rmse == pytest.approx(rms[0])
    # an invalid prediction counts as unmatched unless validity is not checked
    crowded = nacl.copy()
    crowded.append("Na", [0.02, 0.0, 0.0])
    assert csp_match([crowded], [nacl])[0] == 0.0
    rate0, rmse0 = csp_match([cscl_nacl], [nacl])
    assert rate0 == 0.0 and math.isnan(rmse0)
    with pytest.raises(ValueError):
        csp_match([nacl], [nacl, nacl])


# ------------------------------------------------------------------------------------------ stability
def test_stability_relaxed_rocksalt_on_hull(nacl, tiny_hull):
    res = stability([nacl], tiny_hull, relax=True, steps=50, threads=1, add_endpoints=False)
    assert res["e_above_hull"][0] <= 0.1  # NaCl is far below Na + 1/2 Cl2
    assert res["energy_per_atom"][0] < -3.0
    # a squeezed NaCl (80 % of the lattice constant), not relaxed, lies well above a hull holding NaCl
    hull = tiny_hull.extend(HullReference(["NaCl"], res["energy_per_atom"], ["nacl"]))
    squeezed = rocksalt("Na", "Cl", 0.8 * 5.64)
    res2 = stability([squeezed, nacl], hull, relax=False, threads=1, add_endpoints=False)
    assert res2["e_above_hull"][0] > 0.1
    assert abs(res2["e_above_hull"][1]) < 0.05
    # no hull without the end points: NaN
    assert math.isnan(HullReference(["Na2"], [-1.3], ["na"]).e_above_hull(nacl.composition, -3.6))


def test_hull_reference_roundtrip(tmp_path, tiny_hull):
    p = tiny_hull.save(tmp_path / "hull.json")
    back = HullReference.load(p)
    assert back.ids == tiny_hull.ids and np.allclose(back.energies, tiny_hull.energies)
    assert back.elements_with_endpoint == {"Na", "Cl"}


# ------------------------------------------------------------------------------------------ staged run
def test_evaluate_generated_stages(nacl, mgo, si, cscl_nacl, tiny_hull):
    close = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.06, 0, 0]])
    nacl2 = Structure(Lattice.cubic(5.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]])
    dup = cscl_nacl.copy()
    dup.translate_sites([0, 1], [0.25, 0.25, 0.25])
    gen = [nacl, close, nacl2, cscl_nacl, dup, None]
    ref = ReferenceSet([nacl, mgo], ids=["nacl", "mgo"])
    rep = evaluate_generated(
        gen,
        ref,
        stages=("validity", "coverage", "distribution", "uniqueness", "novelty", "stability"),
        coverage_reference=ReferenceSet([nacl, mgo, si]),
        hull=tiny_hull,
        properties={"gap": ([1, 2, 3, 4, 5, 6], [1.0, 2.0])},
        relax=True,
        relax_steps=30,
        threads=1,
    )
    stages = {s["stage"]: s for s in rep["stages"]}
    assert [s["stage"] for s in rep["stages"]] == [
        "validity",
        "coverage",
        "distribution",
        "uniqueness",
        "novelty",
        "stability",
    ]
    assert stages["validity"]["n_in"] == 6 and stages["validity"]["n_out"] == 3  # nacl, cscl, dup
    assert rep["per_sample"]["struct_valid"][:3] == [True, False, True]
    assert rep["per_sample"]["comp_valid"][2] is False
    assert stages["uniqueness"]["n_out"] == 2 and rep["per_sample"]["unique"][4] is False
    assert stages["novelty"]["n_out"] == 1 and rep["per_sample"]["novel"][0] is False
    assert stages["stability"]["n_in"] == 1
    assert rep["per_sample"]["e_above_hull"][3] is not None
    assert 0 <= rep["metrics"]["cov_recall"] <= 1 and "wdist_gap" in rep["metrics"]
    assert rep["metrics"]["validity_survival_of_generated"] == pytest.approx(0.5)
    for s in rep["stages"]:
        assert s["wall_s"] >= 0 and s["gpu_s_per_sample"] == 0.0  # CPU only here
    # S.U.N.: CsCl-type NaCl is valid, unique and novel; it is stable only if CHGNet puts it under 0.1 eV/atom
    eh = rep["per_sample"]["e_above_hull"][3]
    assert rep["metrics"]["sun_rate"] == pytest.approx((1 / 6) if eh <= 0.1 else 0.0)
    assert rep["survivors"] == ([3] if eh <= 0.1 else [])


def test_evaluate_generated_rejects_unknown_stage(nacl):
    with pytest.raises(ValueError):
        evaluate_generated([nacl], [nacl], stages=("validity", "bogus"))


def test_compositions_with_too_many_elements_are_invalid_without_enumeration():
    import time

    from mmmat.evaluation.generation import MAX_SMACT_ELEMENTS

    many = "LiBeNaMgKCaRbSrCsBaFClBrIOS"  # 16 elements: enumeration would take hours
    t0 = time.perf_counter()
    assert not compositional_validity(many)
    assert time.perf_counter() - t0 < 1.0
    assert MAX_SMACT_ELEMENTS >= 6  # every MP-20 material stays within the limit
    assert compositional_validity("Li2NaKMgCaO4")  # 6 elements, charge balanced: still enumerated


def test_chgnet_energies_skip_unphysically_dense_cells(nacl):
    # 0.5 Å³ per atom: far denser than any solid; CHGNet is not asked (its graphs would take gigabytes)
    crushed = Structure(Lattice.cubic(1.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    e, finals = chgnet_energies([crushed, nacl, crushed], threads=1)
    assert np.isnan(e[0]) and np.isnan(e[2]) and np.isfinite(e[1])
    assert finals[0] is crushed and len(finals) == 3
    e_all, _ = chgnet_energies([crushed, nacl], threads=1, min_volume_per_atom=0.0)
    assert np.isfinite(e_all[1])


def test_chgnet_relaxation_over_worker_processes_matches_one_process(nacl, mgo):
    # a strained rock salt and a rattled one relax to the same energies whether one process or two do it
    strained = nacl.copy()
    strained.apply_strain(0.03)
    rattled = mgo.copy()
    rattled.translate_sites([0], [0.02, 0.0, 0.01])
    crushed = Structure(Lattice.cubic(1.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    todo = [strained, crushed, rattled, nacl]
    e1, f1 = chgnet_energies(todo, relax=True, steps=15, threads=1)
    e2, f2 = chgnet_energies(todo, relax=True, steps=15, threads=1, workers=2)
    assert np.isnan(e1[1]) and np.isnan(e2[1]) and f2[1] is crushed
    np.testing.assert_allclose(e2[[0, 2, 3]], e1[[0, 2, 3]], atol=1e-4)
    assert abs(f2[0].volume - f1[0].volume) < 1e-3 and f2[0].volume != strained.volume
