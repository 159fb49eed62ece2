"""Time from upload to result in `mmmat serve`, measured in a real headless Chromium.

    python benchmarks/serve_latency.py --index IDX --shards SHARDS --split test -n 20 \
        [--xrdml-tar ../shared/data/xrd_measured/alab_binary_reactions/binary_reactions_xrdml.tar.xz]

CIF search: ``n`` crystals of ``--split`` of ``--shards`` are written as CIFs and dropped one by one on the Search
page; the time runs from handing the file to the page until the hits table shows the crystal's own id first
(the index must hold that split). ``.xrdml`` identify: the scans of the tarball on the Identify page, when
``mmmat.xrd.identify`` is installed (recorded as unavailable otherwise). Screenshots go to
``runs/browser-artefacts/benchmark_*.png``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_result  # noqa: E402

ART = Path(__file__).resolve().parents[1] / "runs" / "browser-artefacts"


def _driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1400,1800", f"--user-data-dir={profile}"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def _wait(cond, timeout: float):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            v = cond()
            if v:
                return v
        except Exception:  # not rendered yet
            pass
        time.sleep(0.02)
    raise TimeoutError


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--shards", required=True, help="Shard folder holding the query crystals.")
    ap.add_argument("--split", default="test")
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--xrdml-tar", default=None)
    ap.add_argument("--note", default="", help="What model and index these are (goes into the result).")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from pymatgen.io.cif import CifWriter
    from werkzeug.serving import make_server

    from mmmat.data.loader import load_records, split_shards
    from mmmat.web import create_app
    from mmmat.web.context import module_available

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    recs = load_records(split_shards(args.shards, args.split))
    step = max(1, len(recs) // args.n)
    picked = recs[::step][: args.n]
    t0 = time.perf_counter()
    app = create_app(args.index)
    _ = app.mmmat.model  # loaded once when the server starts, as `mmmat serve` does on its first query
    startup = time.perf_counter() - t0
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    srv = make_server("127.0.0.1", 0, app.server, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}/"
    drv = _driver(tmp / "profile")
    ART.mkdir(parents=True, exist_ok=True)
    try:
        drv.get(url)
        _wait(lambda: drv.find_element("id", "search-upload"), 60)
        box = drv.find_element("css selector", "#search-upload input[type=file]")
        times, view_times, server_times, first = [], [], [], 0
        for i, r in enumerate(picked):
            f = tmp / f"q{i:03d}.cif"
            f.write_text(str(CifWriter(r.to_structure())))
            t = time.perf_counter()
            box.send_keys(str(f))
            status = _wait(lambda f=f: (s := drv.find_element("id", "search-status").text)
                           and f"query {f.name} in" in s and s, 120)
            _wait(lambda: drv.find_element("css selector", "#search-hits td[data-dash-column='material_id']"), 60)
            times.append(time.perf_counter() - t)
            top = drv.find_element("css selector", "#search-hits td[data-dash-column='material_id']").text
            _wait(lambda top=top: f"({top})" in drv.find_element("id", "search-structure").text, 60)
            view_times.append(time.perf_counter() - t)
            server_times.append(float(status.rsplit(" in ", 1)[1].split(" s")[0]))
            top = drv.find_element("css selector", "#search-hits td[data-dash-column='material_id']").text
            first += top == r.material_id
        drv.save_screenshot(str(ART / "benchmark_search.png"))
        metrics = {
            "index_size": len(app.mmmat.index),
            "queries": len(times),
            "cif_search_upload_to_result_s_median": round(statistics.median(times), 3),
            "cif_search_upload_to_result_s_p90": round(_pct(times, 0.9), 3),
            "cif_search_upload_to_3d_view_s_median": round(statistics.median(view_times), 3),
            "cif_search_server_s_median": round(statistics.median(server_times), 3),
            "true_crystal_first": first / len(times),
            "startup_s_index_and_model_load": round(startup, 2),
        }
        if args.xrdml_tar and module_available("mmmat.xrd.identify") and Path(args.xrdml_tar).is_file():
            with tarfile.open(args.xrdml_tar) as tf:
                members = [m for m in tf.getmembers() if m.name.endswith(".xrdml")][:5]
                for m in members:
                    tf.extract(m, tmp, filter="data")
            drv.find_element("id", "tab-identify").click()
            box = drv.find_element("css selector", "#identify-upload input[type=file]")
            itimes = []
            for m in members:
                t = time.perf_counter()
                box.send_keys(str(tmp / m.name))
                name = Path(m.name).name
                _wait(lambda name=name: name in drv.find_element("id", "identify-status").text, 600)
                itimes.append(time.perf_counter() - t)
            drv.save_screenshot(str(ART / "benchmark_identify.png"))
            metrics["xrdml_identify_upload_to_result_s_median"] = round(statistics.median(itimes), 2)
            metrics["xrdml_scans"] = len(itimes)
        else:
            metrics["xrdml_identify"] = "not measured: mmmat.xrd.identify not installed or no tarball"
    finally:
        drv.quit()
        srv.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    write_result("serve_latency", metrics, {"note": args.note}, args.out)


if __name__ == "__main__":
    main()
