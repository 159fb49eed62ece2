"""Reference sets are read by mmmat and shared with the shard builder: same rows on both sides."""

import pytest
from conftest import shared_data

from data_pipelines.base import get_source
from mmmat.data.reference import RawRow, read_reference, read_split_tables, row_structure
from mmmat.data.schema import RecordError
from mmmat.io import InputError


def _ids(splits):
    return {k: [r.material_id for r in v] for k, v in splits.items()}


def test_builtin_rows_are_the_builder_rows():
    ref = read_reference("builtin", limit=5)
    src = get_source("builtin")(None, limit=5)
    assert ref.property_columns == src.property_columns == ["density", "volume_per_atom", "num_atoms"]
    assert _ids(ref.splits) == _ids(src.splits) and all(len(v) == 5 for v in ref.splits.values())
    row = ref.splits["train"][0]
    s = row_structure(row)
    assert row.properties["num_atoms"] == len(s) and row.extra_texts and row.extra_texts[0].generated


def test_split_tables_and_crystals_from_source_skip_a_bad_row(tmp_path, nacl, gan):
    import pandas as pd

    folder = tmp_path / "perov"
    folder.mkdir()
    df = pd.DataFrame({
        "material_id": ["nacl", "gan", "bad"],
        "cif": [nacl.to(fmt="cif"), gan.to(fmt="cif"), "data_x\n_cell_length_a 3\nnot a cif\n"],
        "formula": ["NaCl", "GaN", "X"],
        "heat_all": [-1.5, -0.8, 0.0], "heat_ref": [0.1, 0.2, 0.3], "dir_gap": [5.0, 3.4, 0.0],
        "ind_gap": [5.1, 3.5, 0.0],
    })
    df.to_csv(folder / "val.csv.xz", index=False)
    splits = read_split_tables(folder, ["heat_all", "dir_gap"], "formula")
    assert list(splits) == ["val"] and _ids(splits) == {"val": ["nacl", "gan", "bad"]}
    assert splits["val"][1].properties == {"heat_all": -0.8, "dir_gap": 3.4} and splits["val"][1].formula == "GaN"
    # the builder reads the same rows through the same reader
    assert _ids(get_source("perov5")(folder).splits) == _ids(splits)
    with pytest.raises(RecordError, match="'bad'"):
        row_structure(splits["val"][2])
    with pytest.raises(FileNotFoundError, match="train/val/test"):
        read_split_tables(tmp_path, ["heat_all"])

    from mmmat.xrd.phases import crystals_from_source

    crystals, problems = crystals_from_source("perov5", folder)
    assert [c["material_id"] for c in crystals] == ["nacl", "gan"]
    assert len(problems) == 1 and "[bad]" in problems[0] and "malformed" in problems[0]
    with pytest.raises(InputError, match="unknown reference set 'extxyz'.*shards"):
        crystals_from_source("extxyz", folder)
    with pytest.raises(InputError, match="train/val/test"):
        crystals_from_source("carbon24", tmp_path / "nowhere")


def test_row_without_structure_is_named():
    with pytest.raises(RecordError, match="'r1'.*neither"):
        row_structure(RawRow("r1"))


@pytest.mark.slow
def test_mp20p_rows_match_the_builder():
    root = shared_data("mp_20")
    ref = read_reference("mp20", root, limit=50)
    src = get_source("mp20")(root, limit=50, joins=False)
    assert _ids(ref.splits) == _ids(src.splits) and set(ref.splits) == {"train", "val", "test"}
    assert [r.properties for r in ref.splits["test"]] == [r.properties for r in src.splits["test"]]
    assert ref.property_columns == src.property_columns
    with pytest.raises(ValueError, match="needs its folder"):
        read_reference("mp20")
