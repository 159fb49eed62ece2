"""Property units: recorded in a property model's config and printed by ``mmmat predict``."""

import json

import numpy as np
import pytest

from mmmat.heads.property import PropertyModel, parse_targets

ENC = {"name": "crystal/schnet", "hidden": 16, "num_interactions": 2, "cutoff": 4.0, "num_rbf": 8}


def test_units_default_from_the_name_or_given():
    band_gap, other, classes = parse_targets(
        ["band_gap", {"name": "t_c", "unit": "K"}, {"name": "stable", "kind": "classification", "num_classes": 2}]
    )
    assert (band_gap.unit, other.unit, classes.unit) == ("eV", "K", "")
    assert parse_targets(["made_up"])[0].unit == ""
    with pytest.raises(ValueError, match="unknown keys"):
        parse_targets([{"name": "x", "units": "K"}])


def test_units_saved_in_config_and_printed_by_predict(tmp_path, nacl, gan):
    from pymatgen.io.cif import CifWriter
    from typer.testing import CliRunner

    from mmmat.cli import app
    from mmmat.heads.predict import predict_files

    model = PropertyModel(ENC, ["band_gap", {"name": "t_c", "unit": "K"}])
    model.fit_normalization(np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 40.0]]))
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert {t["name"]: t["unit"] for t in saved["targets"]} == {"band_gap": "eV", "t_c": "K"}
    back = PropertyModel.from_pretrained(tmp_path / "m")
    assert [t.unit for t in back.targets] == ["eV", "K"]

    files = []
    for i, s in enumerate([nacl, gan]):
        files.append(tmp_path / f"s{i}.cif")
        files[-1].write_text(str(CifWriter(s)))
    df = predict_files(tmp_path / "m", files)
    assert df.attrs["units"] == {"band_gap": "eV", "band_gap_std": "eV", "t_c": "K", "t_c_std": "K"}
    r = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["predict", "--model", str(tmp_path / "m"),
                                                       "--input", str(files[0]), "--input", str(files[1])])
    assert r.exit_code == 0, r.output
    assert "band_gap (eV)" in r.output and "t_c_std (K)" in r.output
