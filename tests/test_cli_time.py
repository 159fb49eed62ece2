"""The command line checks arguments and inputs before loading anything, and skips bad inputs with a report."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmmat.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_version():
    from mmmat import __version__

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"mmmat {__version__}"


def test_help_and_input_errors_come_fast_and_load_no_model(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "index.json").write_text("{}")
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\nnot a cif\n")
    code = (
        "import sys, time; t = time.perf_counter(); from mmmat.cli import app\n"
        "try:\n    app(sys.argv[1:], standalone_mode=False)\nexcept BaseException:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', round(time.perf_counter() - t, 2))\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    for args, say in ((["--help"], "Usage"), (["search", "--index", str(tmp_path / "idx"), "--cif", str(bad)],
                                                "bad.cif"),
                      (["search", "--index", str(tmp_path / "nothing"), "--cif", str(bad)], "index directory"),
                      (["data", "build", "builtin", "--out", str(tmp_path / "o"), "--limit", "-3"], "--limit")):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t0
        assert say in r.stdout + r.stderr, (args, r.stdout, r.stderr)
        assert "NOTORCH" in r.stdout, f"{args}: torch was imported before the input was checked"
        assert wall < 20, wall  # < 2 s on an idle core; loose here for a shared machine


@pytest.mark.parametrize("limit", ["-3", "0"])
def test_limit_must_be_positive(tmp_path, limit):
    r = CliRunner().invoke(app, ["data", "build", "builtin", "--out", str(tmp_path / "o"), "--limit", limit])
    assert r.exit_code == 2 and "--limit must be at least 1" in r.output and not (tmp_path / "o").exists()


def test_empty_input_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(app, ["data", "build", "generic", "--root", str(tmp_path / "empty"), "--out",
                                 str(tmp_path / "o")])
    assert r.exit_code == 2 and "no rows to build" in r.output
    r = CliRunner().invoke(app, ["data", "build", "generic", "--root", str(tmp_path / "missing"), "--out",
                                 str(tmp_path / "o")])
    assert r.exit_code == 2 and "not found" in r.output


def test_search_queries_folder_and_list_skip_bad_ones(tmp_path, web_env):
    from pymatgen.io.cif import CifWriter

    env = web_env
    recs = list(env["records"].values())[:3]
    q = tmp_path / "q"
    q.mkdir()
    for r in recs:
        (q / f"{r.material_id}.cif").write_text(str(CifWriter(r.to_structure())))
    (q / "broken.cif").write_text("data_x\nnonsense\n")
    (q / "notes.md").write_text("not a query")
    out = tmp_path / "hits.csv"
    res = CliRunner().invoke(app, ["search", "--index", str(env["index"]), "--queries", str(q), "-k", "2",
                                   "--csv", str(out)])
    assert res.exit_code == 0, res.output
    import pandas as pd

    hits = pd.read_csv(out)
    top = hits[hits["rank"] == 1]
    assert len(hits) == 6 and sorted(top["material_id"]) == sorted(r.material_id for r in recs)
    assert "2 queries skipped" in res.output and "broken.cif" in res.output and "notes.md" in res.output
    lst = tmp_path / "list.txt"
    lst.write_text(f"# queries\nq/{recs[0].material_id}.cif\ntext: a layered oxide\nq/missing.cif\n")
    res = CliRunner().invoke(app, ["search", "--index", str(env["index"]), "--queries", str(lst), "-k", "1"])
    assert res.exit_code == 0, res.output
    assert recs[0].material_id in res.output and "a layered oxide" in res.output and "missing.cif" in res.output


def test_predict_skips_bad_and_disordered_cifs_and_plots_parity(tmp_path, nacl, gan):
    import pandas as pd
    import torch
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.cif import CifWriter

    from mmmat.heads.property import PropertyModel

    enc = {"name": "crystal/schnet", "hidden": 16, "num_interactions": 1, "cutoff": 5.0, "num_rbf": 8}
    torch.manual_seed(0)
    model = PropertyModel(enc, ["band_gap"])
    model.fit_normalization(np.array([1.0, 2.0, 4.0]))
    model.save_pretrained(tmp_path / "m")
    cifs = tmp_path / "cifs"
    cifs.mkdir()
    (cifs / "nacl.cif").write_text(str(CifWriter(nacl)))
    (cifs / "gan.cif").write_text(str(CifWriter(gan)))
    (cifs / "broken.cif").write_text("data_x\n_cell_length_a 3\nnot a loop\n")
    dis = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.8), [{"Na": 0.5, "K": 0.5}, "Cl"],
                                    [[0, 0, 0], [0.5, 0.5, 0.5]])
    (cifs / "nakcl.cif").write_text(str(CifWriter(dis)))
    pd.DataFrame({"material_id": ["nacl", "gan", "nakcl"], "band_gap": [5.0, 3.4, 5.5]}).to_csv(
        cifs / "properties.csv", index=False)
    r = CliRunner().invoke(app, ["predict", "--model", str(tmp_path / "m"), "--input", str(cifs), "--csv",
                                 str(tmp_path / "out" / "p.csv")])
    assert r.exit_code == 0, r.output
    assert "2 of 4 files skipped" in r.output and "broken.cif" in r.output
    assert "partial occupancies" in r.output and "--order" in r.output
    assert len(pd.read_csv(tmp_path / "out" / "p.csv")) == 2
    assert (tmp_path / "out" / "parity_band_gap.png").stat().st_size > 5000
    assert "band_gap: MAE" in r.output and "eV" in r.output
    r = CliRunner().invoke(app, ["predict", "--model", str(tmp_path / "m"), "--input", str(cifs), "--order",
                                 "--plot-dir", str(tmp_path / "plots")])
    assert r.exit_code == 0 and "1 of 4 files skipped" in r.output and "over 3 labelled files" in r.output


def test_plot_commands(tmp_path, web_env):
    from pymatgen.io.cif import CifWriter

    from mmmat.data.xrd import TWO_THETA

    env = web_env
    r = CliRunner().invoke(app, ["plot", "latent", "--index", str(env["index"]), "--out", str(tmp_path / "l.png"),
                                 "--color", "density"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "l.png").stat().st_size > 5000
    rec = next(iter(env["records"].values()))
    (tmp_path / "x.cif").write_text(str(CifWriter(rec.to_structure())))
    np.savetxt(tmp_path / "scan.xy", np.c_[TWO_THETA, rec.xrd.astype(float)])
    r = CliRunner().invoke(app, ["plot", "overlay", "--pattern", str(tmp_path / "scan.xy"), "--cif",
                                 str(tmp_path / "x.cif"), "--out", str(tmp_path / "o.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o.png").stat().st_size > 5000
    r = CliRunner().invoke(app, ["plot", "latent", "--index", str(env["index"]), "--out", str(tmp_path / "l.png"),
                                 "--color", "nope"])
    assert r.exit_code == 2 and "not a numeric column" in r.output


def test_stability_honours_relax_steps_everywhere_and_reports_progress(monkeypatch, tmp_path):
    from pymatgen.core import Lattice, Structure

    from mmmat.evaluation import generation_stability as gs
    from mmmat.evaluation.generation import hull_relevant
    from mmmat.progress import listening

    seen = []

    def fake_energies(structures, relax=False, steps=500, **kw):
        seen.append(steps)
        gs.report("fake", len(structures), len(structures))
        return np.full(len(structures), -1.0), list(structures)

    def fake_prototypes(potential, elements, steps=300, **kw):
        seen.extend(steps for _ in elements)  # one batched relaxation of each element's prototypes
        return {e: (-1.0, "proto:fcc") for e in elements}

    monkeypatch.setattr(gs, "chgnet_energies", fake_energies)
    monkeypatch.setattr("mmmat.evaluation.elemental.relax_prototypes", fake_prototypes)
    monkeypatch.setattr("mmmat.evaluation.elemental.lookup", lambda key, element: None)  # no shipped table
    monkeypatch.setattr("mmmat.evaluation.relax.load_potential", lambda name, device=None: None)
    s = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    events = []
    with listening(lambda t, d, n: events.append((t, d, n))):
        gs.stability([s], gs.HullReference([], np.zeros(0), []), relax=True, steps=7)
    assert seen and set(seen) == {7}  # the samples and every elemental end point
    assert any(t.startswith("elemental end points") and d == n == 2 for t, d, n in events)
    ref = [s, Structure(Lattice.cubic(3.0), ["Na"], [[0, 0, 0]]), Structure(Lattice.cubic(3.0), ["K"], [[0, 0, 0]])]
    assert hull_relevant(ref, [s]) == [0, 1]
    # relaxed end points are kept in a cache file and not computed again
    cache = tmp_path / "endpoints.json"
    n_before = len(seen)
    gs.elemental_endpoints(["Na"], steps=7, cache=cache)
    n_first = len(seen) - n_before
    gs.elemental_endpoints(["Na"], steps=7, cache=cache)
    assert n_first == 1 and len(seen) - n_before == 1 and "Na|steps=7" in cache.read_text()
