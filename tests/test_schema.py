import math

import numpy as np
import pytest

from mmmat.data.schema import MaterialRecord, RecordError, TextItem, parse_cif, sample_key


def test_structure_round_trip(gan):
    rec = MaterialRecord.from_structure(gan, "mp-804", properties={"band_gap": 1.7})
    back = rec.to_structure()
    assert back.matches(gan)
    assert np.allclose(back.lattice.matrix, gan.lattice.matrix)
    assert [s.specie.symbol for s in back] == [s.specie.symbol for s in gan]
    assert rec.formula == "GaN"
    assert rec.num_atoms == len(gan)


def test_ase_round_trip(triclinic):
    rec = MaterialRecord.from_structure(triclinic, "x")
    atoms = rec.to_ase()
    assert atoms.pbc.all()
    rec2 = MaterialRecord.from_ase(atoms, "x")
    assert np.allclose(rec2.lattice, rec.lattice)
    assert np.allclose(rec2.cart_coords, rec.cart_coords, atol=1e-8)
    assert (rec2.numbers == rec.numbers).all()


def test_cif_round_trip(triclinic):
    rec = MaterialRecord.from_structure(triclinic, "tri")
    rec2 = MaterialRecord.from_cif(rec.to_cif(), "tri")
    assert rec2.to_structure().matches(triclinic)


def test_sample_round_trip_keeps_everything(nacl):
    rec = MaterialRecord.from_structure(
        nacl,
        "mp-22862",
        properties={"band_gap": 5.0, "formation_energy_per_atom": float("nan")},
        xrd=np.linspace(0, 1, 1701, dtype=np.float32),
        xrd_peaks=np.array([[3.2, 100.0], [2.8, 40.0]], dtype=np.float32),
        image=(np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64),
        image_meta={"kind": "simulated_zcontrast", "simulated": True},
        processing_texts=[TextItem("NaCl from the melt", "recipes", ref="10.1/x")],
        literature_texts=[TextItem("Rocksalt NaCl.", "describe", generated=True)],
        source_ids={"mp_id": "mp-22862"},
        split="train",
    )
    sample = rec.to_sample()
    assert sample["__key__"] == "mp-22862"
    back = MaterialRecord.from_sample(sample)
    assert back.material_id == "mp-22862" and back.split == "train"
    assert np.allclose(back.lattice, rec.lattice) and np.allclose(back.frac_coords, rec.frac_coords)
    assert back.properties["band_gap"] == 5.0
    assert math.isnan(back.properties["formation_energy_per_atom"])
    assert np.allclose(back.xrd, rec.xrd, atol=1e-3)  # stored as float16
    assert (back.image == rec.image).all()
    assert back.processing_texts[0].ref == "10.1/x"
    assert back.literature_texts[0].generated is True
    assert back.modalities() == {
        "crystal": True, "xrd": True, "image": True, "processing_text": True,
        "literature_text": False, "generated_text": True,
    }
    # deterministic bytes
    assert rec.to_sample() == sample


def test_nan_and_garbage_labels_become_nan(nacl):
    rec = MaterialRecord.from_structure(nacl, "a", properties={"x": "n/a", "y": None, "z": float("inf"), "w": "1.5"})
    assert math.isnan(rec.properties["x"]) and math.isnan(rec.properties["y"]) and math.isnan(rec.properties["z"])
    assert rec.properties["w"] == 1.5


def test_malformed_cif_names_the_record():
    with pytest.raises(RecordError, match="bad-1.*malformed CIF|bad-1.*no structure"):
        parse_cif("data_x\n_cell_length_a 3\nthis is not a cif loop_ _atom_site", "bad-1")
    with pytest.raises(RecordError, match="bad-2.*empty CIF"):
        parse_cif("   ", "bad-2")


def test_empty_structure_rejected():
    rec = MaterialRecord("empty-1", np.eye(3) * 4, np.zeros((0, 3)), [])
    with pytest.raises(RecordError, match="empty-1.*empty structure"):
        rec.validate()


def test_overlapping_atoms_rejected():
    rec = MaterialRecord("ov-1", np.eye(3) * 4, [[0, 0, 0], [0.05, 0, 0]], [8, 8])
    with pytest.raises(RecordError, match="ov-1.*overlapping atoms.*0.200"):
        rec.validate()
    # through the periodic boundary: 0.98 and 0.02 are 0.16 Å apart in a 4 Å cell
    rec = MaterialRecord("ov-2", np.eye(3) * 4, [[0.98, 0, 0], [0.02, 0, 0]], [8, 8])
    with pytest.raises(RecordError, match="ov-2.*overlapping"):
        rec.validate()
    # coincident atoms
    rec = MaterialRecord("ov-3", np.eye(3) * 4, [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], [8, 8])
    with pytest.raises(RecordError, match="ov-3.*overlapping"):
        rec.validate()


def test_unknown_element_rejected():
    rec = MaterialRecord("z-1", np.eye(3) * 4, [[0, 0, 0]], [150])
    with pytest.raises(RecordError, match="z-1.*unknown element"):
        rec.validate()


def test_good_record_validates_and_min_distance(nacl):
    rec = MaterialRecord.from_structure(nacl, "ok")
    rec.validate()
    assert rec.min_distance() == pytest.approx(5.64 / 2, abs=1e-6)
    single = MaterialRecord("one", np.eye(3) * 3.0, [[0, 0, 0]], [29])
    assert single.min_distance() == pytest.approx(3.0)


def test_sample_key_is_webdataset_safe():
    assert sample_key("mp-1.2/x y") == "mp-1_2_x_y"


def test_reduced_cell_is_the_same_crystal(nacl):
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Lattice, Structure

    # a skewed supercell basis of the primitive rock salt cell: a = a1, b = a2 + a1, c = a3 + 2 a1
    prim = nacl.get_primitive_structure()
    m = np.array([[1, 0, 0], [1, 1, 0], [2, 0, 1]])
    skewed = Structure(Lattice(m @ prim.lattice.matrix), prim.species, prim.cart_coords,
                       coords_are_cartesian=True, to_unit_cell=True)
    rec = MaterialRecord.from_structure(skewed, "mp-skewed", properties={"band_gap": 5.0}, split="train")
    red = rec.reduced()
    assert red.material_id == "mp-skewed" and red.properties == rec.properties and red.split == "train"
    assert list(red.numbers) == list(rec.numbers)  # atom order kept
    assert abs(red.volume - rec.volume) < 1e-6
    assert max(np.linalg.norm(red.lattice, axis=1)) < max(np.linalg.norm(rec.lattice, axis=1)) - 1.0
    np.testing.assert_allclose(sorted(red.to_structure().lattice.abc), [3.988] * 3, atol=1e-3)
    assert ((red.frac_coords >= 0) & (red.frac_coords < 1)).all()
    assert StructureMatcher().fit(red.to_structure(), skewed)
    # an already reduced cell stays as it is, and an empty record is returned unchanged
    again = red.reduced()
    np.testing.assert_allclose(again.lattice, red.lattice, atol=1e-8)
