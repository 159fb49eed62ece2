"""mmmat.io beyond patterns: structures (CIF text, extxyz frames), images, texts and shard discovery."""

import json

import numpy as np
import pytest

from mmmat import io


def test_structure_from_cif_text_file_and_order_policy(tmp_path, nacl):
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.cif import CifWriter

    text = str(CifWriter(nacl))
    assert io.read_structure(text).composition.reduced_formula == "NaCl"
    f = tmp_path / "nacl.cif"
    f.write_text(text)
    assert len(io.read_structure(f)) == len(nacl)
    with pytest.raises(io.InputError, match="bad.cif.*malformed CIF"):
        (tmp_path / "bad.cif").write_text("data_x\n_cell_length_a 3\nloop_\n_atom_site_label\nnot a site\n")
        io.read_structure(tmp_path / "bad.cif")
    disordered = Structure(Lattice.cubic(4.0), [{"Fe": 0.5, "Ni": 0.5}], [[0, 0, 0]])
    (tmp_path / "alloy.cif").write_text(str(CifWriter(disordered)))
    assert not io.read_structure(tmp_path / "alloy.cif").is_ordered
    with pytest.raises(io.InputError, match="alloy.cif"):
        io.read_structure(tmp_path / "alloy.cif", ordered=True)
    with pytest.raises(io.InputError, match="not found"):
        io.read_structure(tmp_path / "missing.cif")


def test_every_extxyz_frame_and_a_frame_without_a_cell(tmp_path, nacl, gan):
    import ase.io
    from ase import Atoms
    from pymatgen.io.ase import AseAtomsAdaptor

    frames = [AseAtomsAdaptor.get_atoms(s) for s in (nacl, gan)]
    ase.io.write(tmp_path / "two.extxyz", frames, format="extxyz")
    got = io.read_structures(tmp_path / "two.extxyz")
    assert [s.composition.reduced_formula for s in got] == ["NaCl", "GaN"]
    assert io.read_structure(tmp_path / "two.extxyz").composition.reduced_formula == "NaCl"
    ase.io.write(tmp_path / "mixed.extxyz", [frames[0], Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]])],
                 format="extxyz")
    with pytest.raises(io.InputError, match=r"mixed.extxyz \(frame 1\): not a periodic crystal"):
        io.read_structures(tmp_path / "mixed.extxyz")
    assert len(io.read_atoms(tmp_path / "mixed.extxyz")) == 2


def test_images_and_texts(tmp_path):
    from PIL import Image

    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "red.png")
    img = io.read_image(tmp_path / "red.png", size=16)
    assert img.shape == (16, 16) and img.dtype == np.uint8 and int(img[0, 0]) == round(0.299 * 200)
    np.save(tmp_path / "f.npy", np.linspace(0, 1, 64).reshape(8, 8))
    arr = io.read_image(tmp_path / "f.npy", size=8)
    assert arr.min() == 0 and arr.max() == 255
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(io.InputError, match="junk.png: not a readable image"):
        io.read_image(tmp_path / "junk.png")
    assert io.read_text("  a layered oxide  ") == "a layered oxide"
    (tmp_path / "q.txt").write_text("perovskite solar absorber\n")
    assert io.read_text(str(tmp_path / "q.txt")) == "perovskite solar absorber"
    with pytest.raises(io.InputError, match="empty text"):
        io.read_text("   ")


def test_find_shards_by_manifest_by_folders_and_by_name(tmp_path):
    for split in ("train", "test", "empty"):
        (tmp_path / split).mkdir()
    for name in ("train/shard-000001.tar", "train/shard-000000.tar", "test/shard-000000.tar"):
        (tmp_path / name).write_bytes(b"")
    assert list(io.find_shards(tmp_path)) == ["test", "train"]  # no manifest: folders holding shards
    assert io.find_shards(tmp_path)["train"] == [str(tmp_path / f"train/shard-00000{i}.tar") for i in (0, 1)]
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"train": {}, "val": {}, "test": {}}}))
    assert list(io.find_shards(tmp_path)) == ["train", "test"]  # manifest order; val has no shards
    assert list(io.find_shards(tmp_path, "test,train")) == ["test", "train"]
    with pytest.raises(FileNotFoundError, match="no shards for split 'val'"):
        io.find_shards(tmp_path, ["val"])
    with pytest.raises(io.InputError, match="not found"):
        io.find_shards(tmp_path / "nowhere")
