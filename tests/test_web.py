import json
from pathlib import Path

import numpy as np
import pytest

from mmmat.web.uploads import UploadError, UploadStore, check_upload_name, decode_data_url

pytest.importorskip("dash")


@pytest.fixture(scope="module")
def env(web_env):
    return web_env


@pytest.fixture(scope="module")
def app(env):
    from mmmat.web import create_app

    return create_app(env["index"], design_runs=env["runs"], generator=env["generator"], max_upload_mb=0.05)


def _data_url(raw: bytes) -> str:
    import base64

    return "data:application/octet-stream;base64," + base64.b64encode(raw).decode()


@pytest.mark.parametrize("name", ["../evil.cif", "..", "a/b.cif", "/etc/passwd", "..\\x.cif", "C:x.cif",
                                  ".hidden.cif", "", "a\x00.cif", "x" * 300 + ".cif", "évil.cif"])
def test_unsafe_upload_names_are_refused(name):
    with pytest.raises(UploadError, match="file name|no file name"):
        check_upload_name(name)


def test_upload_store_limits_size_and_stays_in_its_folder(tmp_path):
    store = UploadStore(max_bytes=1000, root=tmp_path)
    p = store.save("NaCl (1).cif", _data_url(b"data_x\n"))
    assert p.read_bytes() == b"data_x\n" and store.root in p.parents and oct(p.stat().st_mode)[-3:] == "600"
    with pytest.raises(UploadError, match="over the upload limit"):
        store.save("big.cif", _data_url(b"x" * 5000))
    with pytest.raises(UploadError, match="over the upload limit"):
        store.save("big.cif", b"x" * 1001)
    with pytest.raises(UploadError, match="file name"):
        store.save("../../escape.cif", _data_url(b"data_x\n"))
    with pytest.raises(UploadError, match="expected one of"):
        store.save("x.exe", _data_url(b"MZ"), (".cif",))
    with pytest.raises(UploadError, match="not valid base64"):
        decode_data_url("data:x;base64,@@@@", "x.cif", 100)
    assert sorted(q.name for q in tmp_path.rglob("*") if q.is_file()) == ["NaCl (1).cif"]
    store.cleanup()
    assert not store.root.exists()


def _callback_body(app, filename, contents):
    """The request Dash's front end sends when a file lands on the Search page's upload box."""
    outputs = [("search-status", "children"), ("search-hits", "data"), ("search-hits", "columns"),
               ("search-hits", "selected_rows"), ("search-query", "data")]
    return {
        "output": ".." + "...".join(f"{i}.{p}" for i, p in outputs) + "..",
        "outputs": [{"id": i, "property": p} for i, p in outputs],
        "inputs": [{"id": "search-upload", "property": "contents", "value": contents},
                   {"id": "search-text-go", "property": "n_clicks", "value": None},
                   {"id": "search-text", "property": "n_submit", "value": None}],
        "changedPropIds": ["search-upload.contents"],
        "state": [{"id": "search-upload", "property": "filename", "value": filename},
                  {"id": "search-text", "property": "value", "value": None},
                  {"id": "search-k", "property": "value", "value": 5},
                  {"id": "search-wavelength", "property": "value", "value": None}],
    }


def test_server_refuses_traversal_names_and_oversized_uploads_over_http(app, env, tmp_path):
    from pymatgen.io.cif import CifWriter

    client = app.server.test_client()
    assert client.get("/").status_code == 200
    rec = next(iter(env["records"].values()))
    cif = str(CifWriter(rec.to_structure())).encode()
    before = {p for p in Path(app.mmmat.uploads.root).parent.glob("*")}
    r = client.post("/_dash-update-component", json=_callback_body(app, "../../../tmp/owned.cif", _data_url(cif)))
    assert r.status_code == 200
    out = json.dumps(r.get_json())
    assert "refused file name" in out and "owned.cif" not in {p.name for p in Path("/tmp").iterdir()}
    assert {p for p in Path(app.mmmat.uploads.root).parent.glob("*")} == before
    # over the 0.05 MB limit: refused by the callback, and a request body far over it by the server (413)
    r = client.post("/_dash-update-component", json=_callback_body(app, "big.cif", _data_url(b"#" * 60_000)))
    assert "over the upload limit" in json.dumps(r.get_json())
    r = client.post("/_dash-update-component", json=_callback_body(app, "huge.cif", _data_url(b"#" * 2_000_000)))
    assert r.status_code == 413
    # a good upload through the same route: the true crystal first, similarity 1
    r = client.post("/_dash-update-component", json=_callback_body(app, "query.cif", _data_url(cif)))
    hits = r.get_json()["response"]["search-hits"]["data"]
    assert hits[0]["material_id"] == rec.material_id and hits[0]["similarity"] == pytest.approx(1.0, abs=1e-4)


def test_assets_are_served_locally(app):
    client = app.server.test_client()
    html = client.get("/").get_data(as_text=True)
    assert "cdn" not in html.lower() and "unpkg" not in html.lower()
    scripts = [s.split('"')[0] for s in html.split('src="')[1:]]
    assert scripts and all(s.startswith("/_dash-component-suites/") for s in scripts)
    assert all(client.get(s).status_code == 200 for s in scripts)


def test_search_by_pattern_text_and_image(app, env, tmp_path):
    from mmmat.data.xrd import TWO_THETA
    from mmmat.io import read_pattern

    ctx = app.mmmat
    rec = list(env["records"].values())[3]
    p = tmp_path / "scan.xy"
    np.savetxt(p, np.c_[TWO_THETA, rec.xrd.astype(float) * 1000 + 5])
    hits = ctx.search("xrd", read_pattern(p), 5)  # an untrained model: ranks mean nothing, the path works
    assert len(hits) == 5 and hits["similarity"].is_monotonic_decreasing
    assert len(ctx.search("text", "a cubic oxide", 4)) == 4
    assert len(ctx.search("image", rec.image, 4)) == 4


def test_structure_and_overlay_figures(env):
    from mmmat.io import Pattern
    from mmmat.web import figures as F

    s = next(iter(env["records"].values())).to_structure()
    fig = F.structure_figure(s, "x")
    names = {t.name for t in fig.data}
    assert {sp.symbol for sp in s.composition} <= names
    tt = np.linspace(10, 60, 2000)
    cu = F.computed_profile(s, tt, 1.54184)
    tt_mo = np.linspace(4, 28, 8000)
    mo = F.computed_profile(s, tt_mo, 0.7093)
    d_cu = 1.54184 / (2 * np.sin(np.radians(tt[np.argmax(cu)] / 2)))
    d_mo = 0.7093 / (2 * np.sin(np.radians(tt_mo[np.argmax(mo)] / 2)))
    assert cu.max() == pytest.approx(1.0) and d_cu == pytest.approx(d_mo, abs=0.01)  # the same d at Mo Kα
    fig = F.pattern_overlay_figure(Pattern(tt, cu * 100, 1.54184, source="m"), s, "x")
    assert len(fig.data) == 2


def test_pareto_front():
    from mmmat.web.figures import pareto_mask

    x = [0.0, 0.1, 0.2, 0.05, np.nan]
    y = [1.0, 2.0, 1.5, 0.5, 9.0]
    assert pareto_mask(x, y).tolist() == [True, True, False, False, False]


def test_design_run_tables(app):
    run = app.mmmat.design_run("run_a")
    assert len(run["rounds"]) == 3 and run["guards"]["duplicate"] == 3 and run["guards"]["single_element"] == 3
    assert len(run["ledger"]) == 12 and "e_hull_chgnet" in run["ledger"]
    assert set(run["hits"]["cif"]).issubset({f"hits/c{i}.cif" for i in range(12)})
    from mmmat.io import InputError
    from mmmat.web.context import run_file

    with pytest.raises(InputError, match="inside the run folder"):
        run_file(run["run"], "../../etc/passwd")
    with pytest.raises(InputError, match="no design run"):
        app.mmmat.design_run("../run_a")


def test_generation_job_runs_and_cancels(app):
    import time

    ctx = app.mmmat
    jid = ctx.start_generation(4, 4, seed=0, composition="Na2Cl2")
    while ctx.jobs[jid].finished is None:
        time.sleep(0.05)
    job = ctx.jobs[jid]
    assert job.state == "done" and list(job.result[2]["sample"]) == [0, 1, 2, 3]
    jid = ctx.start_generation(64, 200, seed=0)
    ctx.jobs[jid].cancel.set()
    while ctx.jobs[jid].finished is None:
        time.sleep(0.05)
    assert ctx.jobs[jid].state == "cancelled" and ctx.jobs[jid].done < 64


def test_model_summary_and_vectors(app):
    from mmmat.web.context import index_vectors, model_summary

    info = model_summary(app.mmmat)
    assert "crystal" in info["modalities"] and info["fingerprint"].startswith("sha256:")
    vec, meta = index_vectors(app.mmmat)
    assert vec.shape == (60, 32) and len(meta) == 60


def _identify_body(filename, contents, elements):
    outputs = [("identify-status", "children"), ("identify-phases", "data"), ("identify-phases", "columns"),
               ("identify-fit", "figure"), ("identify-file", "data")]
    return {
        "output": ".." + "...".join(f"{i}.{p}" for i, p in outputs) + "..",
        "outputs": [{"id": i, "property": p} for i, p in outputs],
        "inputs": [{"id": "identify-upload", "property": "contents", "value": contents},
                   {"id": "identify-go", "property": "n_clicks", "value": None}],
        "changedPropIds": ["identify-upload.contents"],
        "state": [{"id": "identify-upload", "property": "filename", "value": filename},
                  {"id": "identify-elements", "property": "value", "value": elements},
                  {"id": "identify-max", "property": "value", "value": 3},
                  {"id": "identify-wavelength", "property": "value", "value": None},
                  {"id": "identify-file", "property": "data", "value": None}],
    }


def test_identify_page_follows_the_agreed_interface(app, monkeypatch):
    """The Identify callback against a stand-in that has exactly the agreed identify() signature and result."""
    import sys
    import types

    import pandas as pd

    calls = {}

    class Result:
        rwp = 7.5

        def to_dict(self):
            tt = np.linspace(10, 80, 50)
            return {"two_theta": tt.tolist(), "measured": np.ones(50).tolist(), "fitted": np.ones(50).tolist(),
                    "residual": np.zeros(50).tolist(), "contributions": {"mp-1": np.ones(50).tolist()},
                    "rwp": 7.5, "phases": []}

        def to_frame(self):
            return pd.DataFrame([{"material_id": "mp-1", "formula": "Fe2O3", "spacegroup": "R-3c (167)",
                                  "weight_fraction": 1.0, "lattice_scale": 1.0, "score": 0.9}])

    def identify(pattern, index, elements=None, max_phases=4, model=None):
        calls.update(pattern=pattern, index=index, elements=elements, max_phases=max_phases, model=model)
        return Result()

    fake = types.ModuleType("mmmat.xrd.identify")
    fake.identify = identify
    monkeypatch.setitem(sys.modules, "mmmat.xrd", types.ModuleType("mmmat.xrd"))
    monkeypatch.setitem(sys.modules, "mmmat.xrd.identify", fake)
    client = app.server.test_client()
    scan = "\n".join(f"{10 + 0.1 * i} {100 + i % 7}" for i in range(500)).encode()
    r = client.post("/_dash-update-component", json=_identify_body("scan.xy", _data_url(scan), "Fe, O"))
    resp = r.get_json()["response"]
    assert "1 phases, Rwp 7.50 %" in json.dumps(resp["identify-status"])
    assert resp["identify-phases"]["data"][0]["formula"] == "Fe2O3"
    assert calls["elements"] == ["Fe", "O"] and calls["max_phases"] == 3 and Path(calls["index"]) == app.mmmat.index_dir
    assert Path(calls["pattern"]).name == "scan.xy" and app.mmmat.uploads.root in Path(calls["pattern"]).parents
    r = client.post("/_dash-update-component", json=_identify_body("scan.xy", _data_url(scan), "Fe, Qq"))
    assert "unknown element symbols: Qq" in json.dumps(r.get_json())
    monkeypatch.delitem(sys.modules, "mmmat.xrd.identify")
    r = client.post("/_dash-update-component", json=_identify_body("scan.xy", _data_url(scan), ""))
    assert "needs mmmat.xrd.identify" in json.dumps(r.get_json())


def test_mmmat_serve_binds_localhost_and_serves(env, tmp_path):
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "mmmat.cli", "serve", "--index", str(env["index"]), "--port",
                             str(port)], cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin",
                                                        "HOME": str(tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    page = r.read().decode()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() - t0 < 240, "mmmat serve did not answer"
                time.sleep(0.5)
        assert "_dash-config" in page and "https://" not in page and "http://" not in page
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/" in out
    r = subprocess.run([sys.executable, "-m", "mmmat.cli", "serve", "--index", str(tmp_path)], cwd=root,
                       env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert r.returncode == 2 and "not an index folder" in r.stderr
