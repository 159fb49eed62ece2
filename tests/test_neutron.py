"""Neutron powder diffraction as a modality: the torch renderer against pymatgen's NDCalculator, pretraining
through train.py with it, and a search with a neutron pattern."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmmat.modalities import get_modality
from mmmat.modalities.neutron import NEUTRON_WAVELENGTH, neutron_profile, neutron_reflections

TINY = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml"


def _rutile():
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.594, 2.959), ["Ti", "O"],
                                     [[0, 0, 0], [0.3053, 0.3053, 0]])


def _merged(structure):
    """(2θ, relative intensity 0..100) of the torch reflections merged as pymatgen merges them."""
    r = neutron_reflections(structure)
    tt, inten = r.two_theta.numpy(), r.intensity.numpy()
    keys = np.round(tt / 1e-5).astype(int)
    peaks: dict[int, list] = {}
    for k, x, v in zip(keys, tt, inten, strict=True):
        peaks.setdefault(k, [x, 0.0])[1] += v
    arr = np.array(sorted(peaks.values()))
    arr[:, 1] *= 100.0 / arr[:, 1].max()
    return arr[arr[:, 1] > 1e-3]


@pytest.mark.parametrize("name", ["nacl", "gan", "triclinic", "rutile"])
def test_neutron_peaks_match_ndcalculator(name, request):
    from pymatgen.analysis.diffraction.neutron import NDCalculator

    s = _rutile() if name == "rutile" else request.getfixturevalue(name)
    ref = NDCalculator(wavelength=NEUTRON_WAVELENGTH).get_pattern(s, two_theta_range=(5, 90))
    ours = _merged(s)
    strong = ref.y > 0.5
    ref_x, ref_y = np.asarray(ref.x)[strong], np.asarray(ref.y)[strong]
    mine = ours[ours[:, 1] > 0.5]
    assert len(mine) == len(ref_x), name
    np.testing.assert_allclose(mine[:, 0], ref_x, atol=1e-4)
    np.testing.assert_allclose(mine[:, 1], ref_y, atol=0.05)


def test_neutron_profile_differs_from_xray_and_follows_scattering_lengths(nacl):
    from mmmat.data.xrd import TWO_THETA, xrd_profile

    nd = neutron_profile(nacl)
    xr = xrd_profile(nacl)[0]
    assert nd.shape == (1701,) and nd.dtype == np.float32 and nd.max() == pytest.approx(1.0)
    # same peak positions, other intensities: (111) of rock salt is weak for X-rays (f_Na - f_Cl small at
    # low angle relative to (200)), while for neutrons b_Na = 3.63 fm and b_Cl = 9.58 fm make it strong
    i111 = int(np.argmin(np.abs(TWO_THETA - 27.39)))
    assert nd[i111 - 2 : i111 + 3].max() > 2 * xr[i111 - 2 : i111 + 3].max()
    # the batched path (a batch of two crystals on one call) gives the same rows
    from mmmat.data.batch import Collator
    from mmmat.data.schema import MaterialRecord

    batch = Collator()([MaterialRecord.from_structure(nacl, "a"), MaterialRecord.from_structure(_rutile(), "b")])
    rows = get_modality("neutron").batch_input(batch)
    np.testing.assert_allclose(rows[0].numpy(), nd, atol=1e-4)
    np.testing.assert_allclose(rows[1].numpy(), neutron_profile(_rutile()), atol=1e-4)


@pytest.fixture(scope="module")
def neutron_run(tmp_path_factory):
    """A tiny pretraining with the neutron modality through train.py, on 32 builtin materials."""
    import train
    from data_pipelines.base import BuildOptions, get_source
    from data_pipelines.build import build_shards

    tmp = tmp_path_factory.mktemp("neutron_run")
    shards = tmp / "shards"
    build_shards(get_source("builtin")(None, limit=32), shards, progress=False,
                 options=BuildOptions(image=False, describe=False))
    cfg = yaml.safe_load(TINY.read_text())
    enc = cfg["model"]["init_args"]["encoders"]
    enc.pop("image")
    enc["neutron"] = {"class_path": "mmmat.encoders.spectrum.XRDCNNEncoderConfig",
                      "init_args": {"out_dim": 32, "num_bins": 256, "widths": [8, 16], "depths": [1, 1],
                                    "hidden_dim": 32}}
    cfg["trainer"].update(max_epochs=1, limit_train_batches=2)
    config = tmp / "tiny_neutron.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cli = train.main(["fit", "--config", str(config), f"--data.shards={shards}", f"--data.tokenizer={tmp}/tok",
                      f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp}",
                      f"--model.init_args.save_dir={tmp}/model"])
    return {"cli": cli, "tmp": tmp, "shards": shards, "model": tmp / "model"}


def test_tiny_pretraining_with_neutron(neutron_run):
    import json

    metrics = {k: float(v) for k, v in neutron_run["cli"].trainer.callback_metrics.items()}
    assert "val/neutron_to_crystal_R@1" in metrics and 0.0 <= metrics["val/neutron_to_crystal_R@1"] <= 1.0
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    cfg = json.loads((neutron_run["model"] / "config.json").read_text())
    assert cfg["encoders"]["neutron"]["name"] == "xrd/cnn"


def test_search_with_a_neutron_pattern(neutron_run, tmp_path, nacl):
    from typer.testing import CliRunner

    from mmmat.cli import app
    from mmmat.data.xrd import TWO_THETA
    from mmmat.retrieval import api

    model = api.load_model(neutron_run["model"])
    scan = tmp_path / "scan.xy"
    prof = neutron_profile(nacl)
    scan.write_text("\n".join(f"{t:.3f} {100 * v + 1:.4f}" for t, v in zip(TWO_THETA, prof, strict=True)))
    modality, q = api.embed_query(model, query=("neutron", scan))
    assert modality == "neutron" and q.shape == (32,) and np.linalg.norm(q) == pytest.approx(1.0, abs=1e-5)
    # the same pattern at another wavelength, said in the file's call, gives nearly the same query
    lam = 1.8
    tt2 = np.degrees(2 * np.arcsin(np.clip(lam / NEUTRON_WAVELENGTH * np.sin(np.radians(TWO_THETA / 2)), 0, 1)))
    scan2 = tmp_path / "scan18.xy"
    scan2.write_text("\n".join(f"{t:.4f} {100 * v + 1:.4f}" for t, v in zip(tt2, prof, strict=True)))
    _, q2 = api.embed_query(model, query=("nd", scan2), wavelength=lam)
    assert float(q @ q2) > 0.9
    r = CliRunner().invoke(app, ["index", "build", "--model", str(neutron_run["model"]), "--shards",
                                 str(neutron_run["shards"]), "--out", str(tmp_path / "index")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["search", "--index", str(tmp_path / "index"), "--query", f"neutron={scan}",
                                 "-k", "3"])
    assert r.exit_code == 0, r.output
    assert "neutron=" in r.output and "rank" in r.output
    r = CliRunner().invoke(app, ["search", "--index", str(tmp_path / "index"), "--query", "neutron"])
    assert r.exit_code == 2 and "MODALITY=FILE" in r.output
