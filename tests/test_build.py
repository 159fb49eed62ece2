import json

import pytest
from conftest import csv_rows

from data_pipelines.base import BuildOptions, Joins, RawRow, SourceData, get_source, hash_split
from data_pipelines.build import build_shards, load_manifest
from mmmat.data.loader import load_records
from mmmat.data.schema import TextItem

BAD_CIF = "data_broken\n_cell_length_a 4.0\nloop_\n_atom_site_label\n_atom_site_fract_x\nNa1 0.0 0.0\n"

OVERLAP_CIF = """data_overlap
_cell_length_a 4.0
_cell_length_b 4.0
_cell_length_c 4.0
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
O1 O 0.0 0.0 0.0
O2 O 0.02 0.0 0.0
"""

UNKNOWN_CIF = OVERLAP_CIF.replace("O2 O 0.02 0.0 0.0", "X2 Xx 0.5 0.5 0.5").replace("data_overlap", "data_unk")


class HugeLiterature:
    """A literature index that returns a 100,000-character text for one formula."""

    def lookup(self, formula, max_items=8):
        if formula == "NaCl":
            return [TextItem("NaCl " * 20000, "test_corpus")]
        return []


def make_source(nacl, gan, triclinic, n_good=6):
    from pymatgen.core import Lattice, Structure

    goods = {}
    for i in range(n_good):
        s = [nacl, gan, triclinic][i % 3].copy()
        s.apply_strain(0.01 * i)
        goods[f"good-{i}"] = s
    rows = []
    for mid, s in goods.items():
        rows.append(RawRow(mid, structure=s.as_dict(), properties={"y": float(len(mid)), "z": "nan"}))
    rows.append(RawRow("bad-cif", cif=BAD_CIF))
    rows.append(RawRow("empty", structure=Structure(Lattice.cubic(4), [], []).as_dict()))
    rows.append(RawRow("overlap", cif=OVERLAP_CIF))
    rows.append(RawRow("unknown-element", cif=UNKNOWN_CIF))
    rows.append(RawRow("no-structure"))
    return SourceData("test", {"train": rows[:7], "val": rows[7:]}, Joins(literature=HugeLiterature()), ["y", "z"])


def test_build_reports_bad_rows_and_keeps_good_ones(tmp_path, nacl, gan, triclinic):
    src = make_source(nacl, gan, triclinic)
    m = build_shards(src, tmp_path / "s", workers=2, shard_size=3, progress=False)
    assert m["splits"]["train"]["rows"] == 7 and m["splits"]["val"]["rows"] == 4
    assert m["total_samples"] == 6
    reasons = {f["material_id"]: f["reason"] for f in m["failures"]}
    assert set(reasons) == {"bad-cif", "empty", "overlap", "unknown-element", "no-structure"}
    assert "malformed CIF" in reasons["bad-cif"] or "no structure" in reasons["bad-cif"]
    assert "empty structure" in reasons["empty"]
    assert "overlapping atoms" in reasons["overlap"]
    assert "unknown element 'Xx" in reasons["unknown-element"]
    assert "neither a CIF nor a structure" in reasons["no-structure"]
    # every good record is there with every modality
    recs = load_records(sorted(str(p) for p in (tmp_path / "s").rglob("*.tar")))
    assert sorted(r.material_id for r in recs) == [f"good-{i}" for i in range(6)]
    for r in recs:
        assert r.xrd is not None and r.xrd.shape == (1701,) and r.xrd.max() == pytest.approx(1.0, abs=1e-3)
        assert r.image is not None and r.image_meta["simulated"] is True
        assert r.properties["y"] == 6.0 and r.properties["z"] != r.properties["z"]  # NaN label kept as missing
    # the 100,000-character text was clipped and counted
    nacl_recs = [r for r in recs if r.formula == "NaCl"]
    assert nacl_recs and all(len(t.text) <= 8192 for r in nacl_recs for t in r.literature_texts)
    assert m["splits"]["train"]["texts_clipped"] + m["splits"]["val"]["texts_clipped"] == len(nacl_recs)
    # manifest on disk, coverage and checksums
    disk = load_manifest(tmp_path / "s")
    assert disk["total_failures"] == 5
    assert disk["splits"]["train"]["coverage"]["xrd"] == disk["splits"]["train"]["samples"]
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in disk["splits"]["train"]["shards"])
    assert disk["versions"]["pymatgen"]


def _checksums(m):
    return {s["path"]: s["sha256"] for sp in m["splits"].values() for s in sp["shards"]}


def test_build_is_deterministic_and_resumable(tmp_path, nacl, gan, triclinic):
    src = make_source(nacl, gan, triclinic, n_good=9)
    a = build_shards(src, tmp_path / "a", workers=1, shard_size=2, progress=False)
    b = build_shards(src, tmp_path / "b", workers=2, shard_size=2, progress=False)
    assert _checksums(a) == _checksums(b)
    # simulate a build killed half-way: one shard half-written, one report missing, one shard missing
    train = tmp_path / "b" / "train"
    shards = sorted(train.glob("shard-*.tar"))
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])
    shards[1].with_suffix(".json").unlink()
    shards[2].unlink()
    c = build_shards(src, tmp_path / "b", workers=2, shard_size=2, progress=False)
    assert _checksums(c) == _checksums(a)
    n_shards = len(_checksums(a))
    assert c["build"]["shards_resumed"] == n_shards - 3
    # a complete build resumes everything
    d = build_shards(src, tmp_path / "b", workers=2, shard_size=2, progress=False)
    assert d["build"]["shards_resumed"] == n_shards and d["build"]["rows_built_now"] == 0


def test_generic_csv_and_folder(tmp_path, nacl, gan, triclinic):
    csv = tmp_path / "table.csv"
    csv.write_text(
        csv_rows(
            {"a": nacl, "b": gan, "c": triclinic, "broken": "not a cif at all"},
            {"a": {"gap": 5.0}, "b": {"gap": 3.4}, "c": {"gap": float("nan")}, "broken": {"gap": 1.0}},
        )
    )
    src = get_source("generic")(csv)
    assert src.property_columns == ["gap"]
    m = build_shards(src, tmp_path / "out", progress=False, options=BuildOptions(describe=False))
    assert m["total_samples"] == 3
    assert [f["material_id"] for f in m["failures"]] == ["broken"]
    # a folder of CIFs with a properties file
    from pymatgen.io.cif import CifWriter

    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / "nacl.cif").write_text(str(CifWriter(nacl)))
    (folder / "gan.cif").write_text(str(CifWriter(gan)))
    (folder / "junk.cif").write_text("garbage")
    (folder / "properties.csv").write_text("material_id,energy\nnacl,-1.5\ngan,-0.8\n")
    src = get_source("generic")(folder)
    rows = {r.material_id: r for rs in src.splits.values() for r in rs}
    assert set(rows) == {"nacl", "gan", "junk"} and rows["nacl"].properties == {"energy": -1.5}
    m = build_shards(src, tmp_path / "out2", progress=False)
    assert m["total_samples"] == 2 and m["failures"][0]["material_id"] == "junk"


def test_generic_csv_without_cif_column_errors(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("material_id,x\na,1\n")
    with pytest.raises(ValueError, match="t.csv.*cif"):
        get_source("generic")(p)


def test_builtin_source_is_offline_and_complete():
    src = get_source("builtin")(None)
    n = sum(len(v) for v in src.splits.values())
    assert n == 288
    assert set(src.splits) == {"train", "val", "test"}
    assert 0.7 < len(src.splits["train"]) / n < 0.9


def test_unknown_source():
    with pytest.raises(KeyError, match="unknown data source"):
        get_source("nope")


def test_hash_split_rule():
    # sha1("mp-1")[:8] as an integer modulo 10, computed independently
    import hashlib

    assert hash_split("mp-1") == int(hashlib.sha1(b"mp-1").hexdigest()[:8], 16) % 10


def test_cli_build_builtin(tmp_path):
    from typer.testing import CliRunner

    from mmmat.cli import app

    r = CliRunner().invoke(app, ["data", "build", "builtin", "--out", str(tmp_path / "o"), "--limit", "4",
                                 "--workers", "2"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["splits"]["train"]["rows"] == 4 and m["build"]["command"].startswith("mmmat data build builtin")
    r = CliRunner().invoke(app, ["data", "build", "mp20", "--out", str(tmp_path / "x"), "--root", str(tmp_path)])
    assert r.exit_code == 2 and "expected" in r.output


def test_duplicate_ids_are_reported_once(tmp_path, nacl, gan):
    rows = [RawRow("dup", structure=nacl.as_dict()), RawRow("dup", structure=gan.as_dict()),
            RawRow("other", structure=gan.as_dict())]
    src = SourceData("t", {"train": rows[:2], "test": rows[2:]}, Joins(), [])
    m = build_shards(src, tmp_path / "d", progress=False, options=BuildOptions(describe=False, image=False))
    assert m["total_samples"] == 2
    assert m["failures"][0]["material_id"] == "dup" and "duplicate material_id" in m["failures"][0]["reason"]


def test_builtin_ids_are_unique():
    src = get_source("builtin")(None)
    ids = [r.material_id for rows in src.splits.values() for r in rows]
    assert len(ids) == len(set(ids)) == 288


def test_joined_texts_never_pair_across_splits(tmp_path, nacl, gan, triclinic):
    from data_pipelines.literature import LiteratureIndex

    lit = LiteratureIndex()
    lit.add_text("Rock-salt NaCl grown from the melt.", ["NaCl"], "matscholar_ner", "r1")  # train + test
    lit.add_text("Wurtzite GaN films for LEDs.", ["GaN"], "matscholar_ner", "r2")  # train only
    f_tri = triclinic.composition.reduced_formula
    lit.add_text(f"GaN and {f_tri} compared.", ["GaN", f_tri], "matscholar_ner", "r3")  # train + test
    lit.add_text(f"Only {f_tri} here.", [f_tri], "matscholar_ner", "r4")  # test only
    rows = {
        "train": [RawRow("a", structure=nacl.as_dict()), RawRow("b", structure=gan.as_dict())],
        "test": [RawRow("c", structure=nacl.as_dict()), RawRow("d", structure=triclinic.as_dict())],
    }
    opts = BuildOptions(xrd=False, image=False, describe=False)
    m = build_shards(SourceData("t", rows, Joins(literature=lit), []), tmp_path / "s", options=opts, progress=False)
    tp = m["text_pairs"]
    assert tp["leak_free"] and tp["texts_joined"] == 4 and tp["texts_dropped_cross_split"] == 2
    assert tp["texts_kept_by_split"] == {"test": 1, "train": 1}
    assert m["splits"]["train"]["text_pairs_dropped_cross_split"] == 2  # NaCl text on a, GaN+triclinic on b
    assert m["splits"]["test"]["text_pairs_dropped_cross_split"] == 2
    texts_by_split = {}
    for split in ("train", "test"):
        recs = load_records(sorted(str(p) for p in (tmp_path / "s" / split).glob("*.tar")))
        texts_by_split[split] = {t.text for r in recs for t in r.literature_texts}
    assert texts_by_split["train"] == {"Wurtzite GaN films for LEDs."}
    assert texts_by_split["test"] == {f"Only {f_tri} here."}
    assert not texts_by_split["train"] & texts_by_split["test"]
    # the check can be turned off (every join kept, as before)
    opts.leak_free_texts = False
    m2 = build_shards(SourceData("t", rows, Joins(literature=lit), []), tmp_path / "s2", options=opts, progress=False)
    assert m2["text_pairs"] == {"leak_free": False}
    assert m2["splits"]["train"]["text_pairs_dropped_cross_split"] == 0
