"""The web app driven by a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, via selenium).

Screenshots of every page go to ``runs/browser-artefacts/`` (or ``$MMMAT_BROWSER_ARTEFACTS``).
"""

import os
import shutil
import tarfile
import threading
import time
from pathlib import Path

import pytest
from conftest import SHARED_DATA

pytest.importorskip("dash")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")

ARTEFACTS = Path(os.environ.get("MMMAT_BROWSER_ARTEFACTS",
                                Path(__file__).resolve().parents[1] / "runs" / "browser-artefacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("no chromium / chromedriver on PATH (Debian: apt-get install chromium chromium-driver): "
                "browser tests skipped", allow_module_level=True)


@pytest.fixture(scope="module")
def env(web_env):
    return web_env


@pytest.fixture(scope="module")
def server(env):
    """The app on a free local port, served by werkzeug in a thread."""
    from werkzeug.serving import make_server

    from mmmat.web import create_app

    app = create_app(env["index"], design_runs=env["runs"], generator=env["generator"], max_upload_mb=5)
    srv = make_server("127.0.0.1", 0, app.server, threaded=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}/", app
    srv.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1400,1800",
              f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    drv.set_page_load_timeout(60)
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    yield drv
    drv.quit()


def _wait(drv, cond, timeout=60.0, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            v = cond()
            if v:
                return v
        except Exception:  # the element is not there yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _text(drv, css):
    return drv.find_element("css selector", css).text


def _open(drv, url, tab):
    drv.get(url)
    _wait(drv, lambda: drv.find_element("id", f"tab-{tab}"), what="the tabs")
    drv.find_element("id", f"tab-{tab}").click()
    _wait(drv, lambda: drv.find_element("id", f"page-{tab}").is_displayed(), what=f"page {tab}")


def _upload(drv, box, path):
    drv.find_element("css selector", f"#{box} input[type=file]").send_keys(str(path))


def _set(drv, id_, value):
    """Replace the text of an input (React ignores a plain clear())."""
    from selenium.webdriver.common.keys import Keys

    el = drv.find_element("id", id_)
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(Keys.DELETE)
    el.send_keys(value)


def _first_cell(drv, table, column):
    return drv.find_element("css selector", f"#{table} td[data-dash-column='{column}']").text


def test_search_cif_shows_the_true_crystal_first_and_survives_bad_uploads(server, browser, env, tmp_path):
    from pymatgen.io.cif import CifWriter

    url, _ = server
    drv = browser
    mid, rec = list(env["records"].items())[7]
    cif = tmp_path / "query.cif"
    cif.write_text(str(CifWriter(rec.to_structure())))
    _open(drv, url, "search")
    bad = tmp_path / "broken.cif"
    bad.write_text("data_broken\n_cell_length_a 'x'\nloop_\n_atom_site_label\nnonsense\n")
    _upload(drv, "search-upload", bad)
    msg = _wait(drv, lambda: "error" in _text(drv, "#search-status") and _text(drv, "#search-status"),
                what="the error of a malformed CIF")
    assert "broken.cif" in msg
    drv.save_screenshot(str(ARTEFACTS / "search_malformed.png"))
    t0 = time.perf_counter()
    _upload(drv, "search-upload", cif)
    _wait(drv, lambda: _first_cell(drv, "search-hits", "material_id") == mid, what="the true crystal first")
    dt = time.perf_counter() - t0
    _wait(drv, lambda: drv.find_elements("css selector", "#search-structure .scatter3d, #search-structure canvas"),
          what="the 3D structure view")
    status = _text(drv, "#search-status")
    assert "hits for crystal query query.cif" in status
    assert float(_first_cell(drv, "search-hits", "similarity")) == pytest.approx(1.0, abs=1e-3)
    (ARTEFACTS / "search_timing.txt").write_text(f"upload to first hit shown: {dt:.2f} s ({status})\n")
    drv.save_screenshot(str(ARTEFACTS / "search.png"))
    # a text query, then a file of the wrong kind: errors on the page, and the app keeps answering
    drv.find_element("id", "search-text").send_keys("a cubic rock-salt halide")
    drv.find_element("id", "search-text-go").click()
    _wait(drv, lambda: "hits for text query" in _text(drv, "#search-status"), what="text hits")
    junk = tmp_path / "payload.sh"
    junk.write_text("#!/bin/sh\ntouch /tmp/mmmat-should-not-exist\n")
    _upload(drv, "search-upload", junk)
    _wait(drv, lambda: "unknown kind of file" in _text(drv, "#search-status"), what="refusal of a .sh file")
    assert not Path("/tmp/mmmat-should-not-exist").exists()
    _upload(drv, "search-upload", cif)
    _wait(drv, lambda: "hits for crystal query" in _text(drv, "#search-status"), what="service after errors")


def test_search_pattern_overlay(server, browser, env, tmp_path):
    import numpy as np

    from mmmat.data.xrd import TWO_THETA

    url, _ = server
    drv = browser
    rec = list(env["records"].values())[4]
    p = tmp_path / "scan.xy"
    np.savetxt(p, np.c_[TWO_THETA, rec.xrd.astype(float) * 1000 + 20])
    _open(drv, url, "search")
    _upload(drv, "search-upload", p)
    _wait(drv, lambda: "hits for xrd query scan.xy" in _text(drv, "#search-status"), what="pattern hits")
    _wait(drv, lambda: "measured (scan.xy)" in _text(drv, "#search-pattern"), what="the pattern overlay")
    drv.save_screenshot(str(ARTEFACTS / "search_pattern.png"))


def test_identify_page(server, browser, tmp_path):
    url, _ = server
    drv = browser
    _open(drv, url, "identify")
    drv.save_screenshot(str(ARTEFACTS / "identify.png"))
    pytest.importorskip("mmmat.xrd.identify", reason="mmmat.xrd.identify not installed: the page says so")
    tarball = SHARED_DATA / "xrd_measured" / "alab_binary_reactions" / "binary_reactions_xrdml.tar.xz"
    if not tarball.is_file():
        pytest.skip(f"{tarball} not present: .xrdml identify test skipped")
    with tarfile.open(tarball) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".xrdml"))
        tf.extract(member, tmp_path, filter="data")
    scan = tmp_path / member.name
    t0 = time.perf_counter()
    _upload(drv, "identify-upload", scan)
    _wait(drv, lambda: "Rwp" in _text(drv, "#identify-status") or "error" in _text(drv, "#identify-status"),
          timeout=300, what="the identify result")
    dt = time.perf_counter() - t0
    assert "Rwp" in _text(drv, "#identify-status"), _text(drv, "#identify-status")
    _wait(drv, lambda: "residual" in _text(drv, "#identify-fit"), what="the fit plot")
    (ARTEFACTS / "identify_timing.txt").write_text(f"upload to fit shown: {dt:.2f} s ({scan.name})\n")
    drv.save_screenshot(str(ARTEFACTS / "identify_fit.png"))


def test_generate_page_progress_and_candidates(server, browser):
    url, _ = server
    drv = browser
    _open(drv, url, "generate")
    _set(drv, "generate-composition", "Na2Cl2")
    drv.find_element("id", "generate-go").click()
    _wait(drv, lambda: "valid and unique" in _text(drv, "#generate-status"), timeout=120, what="candidates")
    assert drv.find_elements("css selector", "#generate-candidates td[data-dash-column='formula']")
    drv.save_screenshot(str(ARTEFACTS / "generate.png"))
    _set(drv, "generate-composition", "Xx2")
    drv.find_element("id", "generate-go").click()
    _wait(drv, lambda: "error" in _text(drv, "#generate-status"), what="a bad composition refused")
    # long work shows progress and can be cancelled
    _set(drv, "generate-composition", "")
    _set(drv, "generate-n", "512")
    _set(drv, "generate-steps", "1000")
    drv.find_element("id", "generate-go").click()
    _wait(drv, lambda: "samples" in _text(drv, "#generate-status") and "/512" in _text(drv, "#generate-status"),
          what="progress of a long run")
    drv.find_element("id", "generate-cancel").click()
    _wait(drv, lambda: "generation cancelled" in _text(drv, "#generate-status"), timeout=120, what="the cancel")
    drv.save_screenshot(str(ARTEFACTS / "generate_cancelled.png"))


def test_design_runs_page(server, browser):
    url, _ = server
    drv = browser
    _open(drv, url, "design")
    _wait(drv, lambda: "run_a: 3 rounds" in _text(drv, "#design-status"), what="the run summary")
    _wait(drv, lambda: "Pareto front" in _text(drv, "#design-pareto"), what="the Pareto plot")
    _wait(drv, lambda: "hits vs oracle calls" in _text(drv, "#design-hits-plot"), what="the hits plot")
    drv.find_element("css selector", "#design-hits input[type=radio]").click()
    _wait(drv, lambda: drv.find_elements("css selector", "#design-structure .scatter3d, #design-structure canvas"),
          what="a hit's structure")
    drv.save_screenshot(str(ARTEFACTS / "design.png"))


def test_model_page(server, browser):
    url, _ = server
    drv = browser
    _open(drv, url, "model")
    _wait(drv, lambda: "sha256:" in _text(drv, "#model-info"), what="the model summary")
    _wait(drv, lambda: "60 indexed crystals" in _text(drv, "#model-map"), what="the latent map")
    drv.save_screenshot(str(ARTEFACTS / "model.png"))
