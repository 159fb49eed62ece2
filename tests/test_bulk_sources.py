"""The large-file sources of ``mmmat data build``: extxyz, ASE database, ComputedStructureEntry JSON."""

import bz2
import gzip
import json
import math

import pytest

from data_pipelines.base import get_source
from data_pipelines.bulk import entry_dicts, extxyz_frames


def _rows(data):
    return {r.material_id: r for rows in data.splits.values() for r in rows}


def _atoms(structure, **info):
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor.get_atoms(structure)
    atoms.info.update(info)
    return atoms


def test_extxyz_frames_fields_and_a_bad_frame(tmp_path, nacl, gan):
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    a = _atoms(nacl, material_id="m-nacl", band_gap=5.1)
    a.calc = SinglePointCalculator(a, energy=-27.0)
    b = _atoms(gan, material_id="m-gan", band_gap=2.0)
    good = tmp_path / "good.extxyz"
    ase.io.write(good, [a, b], format="extxyz")
    text = good.read_text().splitlines(keepends=True)
    first = int(text[0]) + 2
    # a frame whose count is not a number, and one whose atom line is garbage, between the good frames
    bad = ["oops\n", "junk line\n", "2\n", 'Lattice="4 0 0 0 4 0 0 0 4" Properties=species:S:1:pos:R:3\n',
           "Na 0 0 0\n", "Cl not a number here\n"]
    path = tmp_path / "mixed.extxyz"
    path.write_text("".join(text[:first] + bad + text[first:]))
    frames = list(extxyz_frames(path))
    assert [p is None for _, _, p, _ in frames] == [True, False, True, True]

    data = get_source("extxyz")(path, properties={"band_gap": "band_gap", "energy_per_atom": "energy_per_atom"})
    rows = _rows(data)
    assert rows["m-nacl"].error is None and rows["m-gan"].error is None
    assert rows["m-nacl"].properties["band_gap"] == pytest.approx(5.1)
    assert rows["m-nacl"].properties["energy_per_atom"] == pytest.approx(-27.0 / len(nacl))
    assert rows["m-gan"].properties["energy_per_atom"] is None  # no energy: NaN in the record, which is kept
    from data_pipelines.base import BuildOptions, Joins, make_record

    rec, _ = make_record(rows["m-gan"], "train", Joins(), BuildOptions(xrd=False, image=False, describe=False))
    assert math.isnan(rec.properties["energy_per_atom"]) and rec.properties["band_gap"] == pytest.approx(2.0)
    bad_rows = [r for r in rows.values() if r.error]
    assert len(bad_rows) == 2 and data.info["records_unusable"] == 2
    assert any("expected an atom count" in r.error for r in bad_rows)
    assert data.property_columns == ["band_gap", "energy_per_atom"]


def test_asedb_rows_keys_and_data(tmp_path, nacl, gan):
    import ase.db
    from ase import Atoms

    path = tmp_path / "set.db"
    with ase.db.connect(str(path)) as db:
        db.write(_atoms(nacl), key_value_pairs={"mid": "a-1", "gap": 5.0}, data={"e_form": -2.1})
        db.write(_atoms(gan), key_value_pairs={"mid": "a-2", "gap": 3.2}, data={"e_form": -0.6})
        db.write(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]), key_value_pairs={"mid": "molecule"})
    data = get_source("asedb")(path, properties={"band_gap": "gap", "e_form": "data.e_form"}, id_field="mid")
    rows = _rows(data)
    assert set(rows) == {"a-1", "a-2", "molecule"}
    assert rows["a-2"].properties == {"band_gap": pytest.approx(3.2), "e_form": pytest.approx(-0.6)}
    assert "not a periodic crystal" in rows["molecule"].error


def _entry(structure, mid, energy, gap, correction=0.0):
    return {
        "@module": "pymatgen.entries.computed_entries", "@class": "ComputedStructureEntry",
        "energy": energy, "correction": correction, "entry_id": mid,
        "structure": structure.as_dict(), "data": {"band_gap": gap, "e_form": -1.0},
    }


@pytest.mark.parametrize("suffix", [".json", ".json.gz", ".json.bz2"])
def test_entries_streamed_from_plain_and_compressed_json(tmp_path, nacl, gan, suffix):
    entries = [_entry(nacl, "mp-1", -30.0, 5.0, correction=-2.0), _entry(gan, "mp-2", -24.0, 2.1),
               {"entry_id": "mp-3", "energy": 1.0}]  # no structure: counted, not built
    doc = {"@module": "x", "entries": entries} if suffix == ".json.bz2" else entries  # Alexandria's layout too
    raw = json.dumps(doc).encode()
    path = tmp_path / f"entries{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else bz2.compress(raw)
                     if suffix.endswith(".bz2") else raw)
    data = get_source("entries")(path, properties={"energy_per_atom": "energy_per_atom", "band_gap": "data.band_gap"})
    rows = _rows(data)
    assert rows["mp-1"].properties["energy_per_atom"] == pytest.approx(-32.0 / len(nacl))  # corrected energy
    assert rows["mp-2"].properties["band_gap"] == pytest.approx(2.1)
    assert rows["mp-3"].error and "no structure" in rows["mp-3"].error
    assert rows["mp-1"].structure["sites"]


def test_truncated_entries_keep_what_was_read(tmp_path, nacl, gan):
    raw = json.dumps([_entry(nacl, "mp-1", -30.0, 5.0), _entry(gan, "mp-2", -24.0, 2.1)])
    path = tmp_path / "cut.json"
    path.write_text(raw[: int(len(raw) * 0.8)])
    got = list(entry_dicts(path))
    assert got[0][1]["entry_id"] == "mp-1" and got[-1][1] is None and "truncated" in got[-1][2]
    rows = _rows(get_source("entries")(path))
    assert rows["mp-1"].error is None and sum(r.error is not None for r in rows.values()) == 1


def test_cli_builds_shards_from_entries_with_named_properties(tmp_path, nacl, gan, triclinic):
    from typer.testing import CliRunner

    from data_pipelines.build import load_manifest
    from mmmat.cli import app

    entries = [_entry(s, f"mp-{i}", -10.0 * (i + 1), 0.5 * i) for i, s in enumerate([nacl, gan, triclinic] * 2)]
    entries.append({"entry_id": "broken", "structure": {"sites": "nonsense"}})
    src = tmp_path / "entries.json.gz"
    src.write_bytes(gzip.compress(json.dumps(entries).encode()))
    out = tmp_path / "shards"
    r = CliRunner().invoke(app, ["data", "build", "entries", "--root", str(src), "--out", str(out), "--no-xrd",
                                 "--no-image", "--no-describe", "--property", "band_gap=data.band_gap",
                                 "--property", "energy_per_atom=energy_per_atom"])
    assert r.exit_code == 0, r.output
    manifest = load_manifest(out)
    total = sum(s["samples"] for s in manifest["splits"].values())
    failures = sum(s["failures"] for s in manifest["splits"].values())
    assert (total, failures) == (6, 1)
    assert "--property band_gap=data.band_gap" in manifest["build"]["command"]
    bad = CliRunner().invoke(app, ["data", "build", "builtin", "--out", str(tmp_path / "b"), "--property", "x=y"])
    assert bad.exit_code == 2 and "not 'builtin'" in bad.output
