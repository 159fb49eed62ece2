import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "design" / "tiny.yaml"


def tiny_config(out, **over):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["out"] = str(out)
    cfg["oracle"]["cache"] = str(Path(out).parent / "hull_cache")
    for k, v in over.items():
        cfg[k] = v
    return cfg


def test_config_rejects_unknown_keys_and_test_split(tmp_path):
    from mmmat.design import ConfigError, load_config

    cfg = tiny_config(tmp_path / "run")
    cfg["select"]["stratgy"] = "ucb"
    with pytest.raises(ConfigError, match="stratgy"):
        load_config(cfg)
    cfg = tiny_config(tmp_path / "run")
    cfg["data"]["train_splits"] = ["train", "test"]
    with pytest.raises(ConfigError, match="test"):
        load_config(cfg)
    cfg = tiny_config(tmp_path / "run", budget="many")
    with pytest.raises(ConfigError, match="budget"):
        load_config(cfg)
    cfg = tiny_config(tmp_path / "run")
    cfg["oracle"]["batch"] = -1
    with pytest.raises(ConfigError, match="oracle.batch"):
        load_config(cfg)


def test_family_substitution_stays_in_li_tm_o():
    from mmmat.design.config import ChemistryConfig
    from mmmat.design.propose import in_family, similarity, substitution_map

    tms = ["Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn"]
    chem = ChemistryConfig(allowed=["Li", "O", *tms], required=["Li", "O"], required_any=[tms], max_elements=3)
    rng = np.random.default_rng(0)
    for _ in range(30):
        m = substitution_map(["Na", "Al", "S"], chem.allowed, chem, rng)
        assert m is not None
        new = set(m.values())
        assert {"Li", "O"} <= new and len(new & set(tms)) == 1 and len(new) == 3
    assert similarity("Na", "K") > similarity("Na", "O")

    from pymatgen.core import Lattice, Structure

    s = Structure(Lattice.cubic(4.0), ["Li", "Co", "O", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0], [0, 0.5, 0]])
    assert in_family(s, chem) is None
    s2 = Structure(Lattice.cubic(4.0), ["Na", "Co", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0]])
    assert in_family(s2, chem) == "outside_family"


def test_selection_strategies_and_qei():
    from mmmat.design.config import Objective
    from mmmat.design.select import gp_inputs, select

    rng = np.random.default_rng(0)
    objs = [Objective("gap", surrogate="gap", min=1.5, max=2.5)]
    n = 200
    emb = rng.normal(size=(n, 4))
    mean = (2.0 + emb[:, :1]).astype(float)
    std = np.full((n, 1), 0.2)
    picks, _, used = select("greedy", 5, mean, std, emb, objs, rng)
    assert used == "greedy" and all(1.5 <= mean[i, 0] <= 2.5 for i in picks)
    picks, _, used = select("ucb", 5, mean, std, emb, objs, rng, kappa=1.0)
    assert used == "ucb" and len(set(picks)) == 5
    # qei with too few labels falls back to UCB and says so
    picks, _, used = select("qei", 5, mean, std, emb, objs, rng)
    assert used.startswith("ucb")
    # with labels: y is high where the first embedding coordinate is near 0
    lab = rng.choice(n, 30, replace=False)
    y = -np.abs(emb[lab, 0])
    labelled = (gp_inputs(emb[lab], mean[lab], std[lab]), y)
    picks, vals, used = select("qei", 6, mean, std, emb, objs, rng, labelled=labelled)
    assert used == "qei" and len(set(picks)) == 6 and np.all(np.isfinite(vals))
    assert np.mean(np.abs(emb[picks, 0])) < np.mean(np.abs(emb[:, 0]))


def test_qei_inputs_reduced_to_principal_components():
    from mmmat.design.select import reduce_inputs

    rng = np.random.default_rng(1)
    # 40 columns, one of them constant, the others mixtures of three latent factors plus a little noise
    x = rng.normal(size=(60, 3)) @ rng.normal(size=(3, 39)) + 0.01 * rng.normal(size=(60, 39))
    x = np.concatenate([x, np.ones((60, 1))], 1)
    zt, zc = reduce_inputs(x[:20], x[20:], dims=3)
    assert zt.shape == (20, 3) and zc.shape == (40, 3)
    # three components keep almost all the (scaled) variance
    scaled = (x[:, :39] - x[:, :39].min(0)) / np.ptp(x[:, :39], 0)
    kept = np.concatenate([zt, zc]).var(0).sum() / scaled.var(0).sum()
    assert kept > 0.99
    zt, zc = reduce_inputs(x[:20], x[20:], dims=0)  # 0: every non-constant column, scaled to [0, 1]
    assert zt.shape == (20, 39) and np.isclose(np.concatenate([zt, zc]).min(), 0.0)
    assert np.isclose(np.concatenate([zt, zc]).max(), 1.0)


def test_ensemble_update_moves_the_reference_of_the_distance_guard(nacl, gan, triclinic):
    from mmmat.design.surrogate import EnsembleSurrogate, nearest_distance, ood_threshold

    structs = [nacl, gan, triclinic] * 4
    y = np.random.default_rng(0).normal(size=(12, 2))
    sur = EnsembleSurrogate(["a", "b"], members=2, hidden=16, epochs=5, finetune_epochs=40, seed=0).fit(structs, y)
    before = sur.train_embeddings().copy()
    sur.update([nacl, gan], np.array([[5.0, 5.0], [-5.0, -5.0]]))
    after = sur.train_embeddings()
    # the training crystals, embedded by the updated model, lie in the guard's reference set (distance 0), and
    # the reference moved with the update (it was computed by the model before it)
    own = sur.predict(structs)["embedding"]
    assert nearest_distance(own, after).max() < 1e-4
    assert nearest_distance(own, before).max() > 1e-3
    assert np.isfinite(ood_threshold(after, 0.99))


def test_e_hull_labels_are_bounded_for_learning():
    from mmmat.design.config import Objective, load_config
    from mmmat.design.loop import E_HULL_LABEL_MAX, _oracle_label

    cfg = load_config(tiny_config("unused"))
    cfg.objectives = [Objective("e_hull", surrogate="e_above_hull", oracle="e_hull", max=0.05, scale=0.05)]
    blown = {"e_hull": {"chgnet": 0.1, "sevennet": 1226.6}}  # one MLIP's relaxation blew up
    assert _oracle_label(cfg, blown, "e_above_hull") == E_HULL_LABEL_MAX
    assert _oracle_label(cfg, {"e_hull": {"chgnet": -5.0, "sevennet": -3.0}}, "e_above_hull") == cfg.guards.min_e_hull
    assert np.isclose(_oracle_label(cfg, {"e_hull": {"chgnet": 0.1, "sevennet": 0.2}}, "e_above_hull"), 0.15)
    assert np.isnan(_oracle_label(cfg, {"e_hull": {}}, "e_above_hull"))


def test_tiny_loop_killed_mid_round_resumes_without_repeating_oracle_calls(tmp_path):
    from mmmat.design import run

    out = tmp_path / "run"
    log = tmp_path / "calls.log"
    cfg = tiny_config(out)
    cfg["oracle"]["options"] = {"delay": 0.25, "call_log": str(log)}
    path = tmp_path / "design.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "mmmat.cli", "design", "--config", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    try:
        while time.time() - t0 < 240:
            n = len(log.read_text().splitlines()) if log.exists() else 0
            if n >= 11:  # in the middle of round 1 (8 calls per round)
                break
            if proc.poll() is not None:
                pytest.fail("the design run ended before it could be killed")
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = log.read_text().splitlines()
    assert 11 <= len(before) < 24
    db = sqlite3.connect(out / "ledger.sqlite")
    assert db.execute("SELECT phase FROM rounds WHERE round = 1").fetchone()[0] == "selected"
    db.close()
    doc = run(path, resume=True)
    calls = log.read_text().splitlines()
    assert len(calls) == 24 == len(set(calls))  # every pick verified once, none twice
    assert doc["rounds"][-1]["cumulative_oracle_calls"] == 24
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2]
    # the resumed run's report and ledger are complete
    rep = json.loads((out / "report.json").read_text())
    assert rep["strategy"] == "ucb" and rep["config"]["name"] == "tiny"
    assert [r["round"] for r in rep["rounds"]] == [0, 1, 2]
    for r in rep["rounds"]:
        for key in ("oracle_calls", "cumulative_oracle_calls", "hits", "cumulative_hits", "guards", "surrogate_mae",
                    "disagreement", "ood_share", "unique_compositions", "seconds"):
            assert key in r
        assert r["oracle_calls"] == 8 and r["surrogate_mae"] is not None
        assert {"invalid_charge", "duplicate_seen", "methods_disagree", "single_element", "ood"} <= set(r["guards"])
        assert "oracle" in r["seconds"]
        if r["round"] != 1:  # round 1 was resumed after its selection: its proposal ran in the killed process
            assert {"proposal", "screening"} <= set(r["seconds"])
    assert rep["rounds"][-1]["cumulative_oracle_calls"] == 24
    assert sum(r["guards"]["invalid_charge"] for r in rep["rounds"]) > 0  # the screen removes something
    assert len(doc["hits"]) == rep["rounds"][-1]["cumulative_hits"]
    for h in rep["hits"]:
        assert (out / h["cif"]).is_file() and set(h["e_hull"]) == {"stand_in_a", "stand_in_b"}
        assert all(v <= 0.05 for v in h["e_hull"].values())
    for png in ("hits_vs_calls.png", "pareto.png", "diversity.png", "surrogate_error.png"):
        assert (out / png).stat().st_size > 1000
    db = sqlite3.connect(out / "ledger.sqlite")
    statuses = dict(db.execute("SELECT status, COUNT(*) FROM candidates GROUP BY status").fetchall())
    assert statuses["verified"] == 24 and statuses["rejected"] > 0
    assert db.execute("SELECT COUNT(*) FROM candidates WHERE is_hit = 1").fetchone()[0] == len(rep["hits"])
    assert "not physics" in (out / "report.md").read_text()
    # a second run into the same folder without --resume is refused
    from mmmat.design import DesignError

    with pytest.raises(DesignError, match="resume"):
        run(path)
    # how the work is done may change on resume (worker processes, oracle batch); what is computed may not
    path.write_text(yaml.safe_dump({**cfg, "oracle": {**cfg["oracle"], "workers": 3, "batch": 0}}))
    assert run(path, resume=True)["rounds"][-1]["cumulative_oracle_calls"] == 24
    assert len(log.read_text().splitlines()) == 24
    path.write_text(yaml.safe_dump({**cfg, "oracle": {**cfg["oracle"], "steps": 7}}))
    with pytest.raises(DesignError, match=r"another config \(differs in \['oracle'\]\)"):
        run(path, resume=True)
    # the benchmark's summary of run folders from their ledgers: hits per 1,000 calls, marked partial when short
    import argparse
    import shutil

    sys.path.insert(0, str(ROOT))
    from benchmarks.design import NOTES, _from_ledgers

    bench = tmp_path / "bench"
    shutil.copytree(out, bench / "loop_seed0")
    n_hits = len(rep["hits"])
    for budget, partial in ((24, False), (30, True)):
        result = tmp_path / f"summary_{budget}.json"
        _from_ledgers(argparse.Namespace(out=str(bench), budget=budget, steps=5, methods=None, card=None, setup=None,
                                         task="tiny", result=str(result)))
        doc = json.loads(result.read_text())
        m = doc["metrics"]
        assert m["hits_per_1000_calls_by_arm"] == {"loop": pytest.approx(1000.0 * n_hits / 24)}
        assert m["oracle_calls_by_arm"] == {"loop": 24} and m["partial"] is partial
        assert m["hits_ratio_vs_best_baseline"] is None  # no baseline arm in the folder
        assert doc["runs"]["loop"][0]["rounds_done"] == 3 and doc["notes"] == NOTES


def test_mlip_oracle_chgnet_and_sevennet(tmp_path):
    from pymatgen.core import Lattice, Structure

    from mmmat.design import KnownPhases, MLIPOracle

    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    cscl_type = Structure(Lattice.cubic(3.4), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    na = Structure(Lattice.cubic(4.23), ["Na", "Na"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    cl2 = Structure(Lattice.cubic(8.0), ["Cl", "Cl"], [[0.5, 0.5, 0.5], [0.5, 0.5, 0.75]])
    known = KnownPhases([nacl, na, cl2], ["mp-22862", "na-bcc", "cl2-box"])
    oracle = MLIPOracle(known, methods=["chgnet", "sevennet"], steps=3, device="cpu", cache=tmp_path / "cache")
    res = oracle.evaluate([cscl_type])[0]
    assert res["error"] is None and res["n_known_phases"] == 3
    for m in ("chgnet", "sevennet"):
        assert np.isfinite(res["energy_per_atom"][m]) and res["e_hull"][m] > -0.5
    # the known phase's energy is cached under a key of the method and the structure
    cached = {p.name for p in (tmp_path / "cache").iterdir()}
    assert any(n.startswith("chgnet-") for n in cached) and any(n.startswith("sevennet-") for n in cached)
    entry = json.loads(next((tmp_path / "cache").glob("chgnet-*.json")).read_text())["entries"]
    assert any(k.startswith("mp-22862:") for k in entry) and len(entry) == 3


def test_property_model_surrogate_heads_variance_and_finetune(tmp_path, nacl, gan, triclinic):
    from mmmat.design.surrogate import PropertyModelSurrogate, nearest_distance
    from mmmat.heads.property import PropertyModel

    enc = {"name": "crystal/schnet", "hidden": 16, "num_interactions": 1, "cutoff": 4.0, "num_rbf": 8}
    for k in range(2):
        import torch

        torch.manual_seed(k)
        PropertyModel(enc, ["density"], head_hidden=8).save_pretrained(tmp_path / f"m{k}")
    one = PropertyModelSurrogate([str(tmp_path / "m0")], ["density"], finetune_epochs=30, reference=[nacl, gan])
    p = one.predict([nacl, gan, triclinic])
    assert p["mean"].shape == (3, 1) and np.all(p["std"] > 0) and p["embedding"].shape == (3, 16)
    assert np.allclose(p["disagreement"], p["std"])  # one model: the heads' own variance
    labels = np.array([[s.density] for s in (nacl, gan, triclinic)])
    err0 = np.abs(p["mean"] - labels).mean()
    one.update([nacl, gan, triclinic], labels)
    err1 = np.abs(one.predict([nacl, gan, triclinic])["mean"] - labels).mean()
    assert err1 < err0
    two = PropertyModelSurrogate([str(tmp_path / "m0"), str(tmp_path / "m1")], ["density"], reference=[nacl, gan])
    q = two.predict([nacl, triclinic])
    assert np.all(q["disagreement"] > 0) and np.all(q["std"] >= q["disagreement"])
    d = nearest_distance(q["embedding"], two.train_embeddings())
    assert d.shape == (2,) and d[0] < 1e-4  # NaCl is in the reference


def test_stand_in_oracle_single_point_method_uses_the_relaxed_structure(tmp_path, nacl):
    from pymatgen.core import Lattice, Structure

    from mmmat.design import KnownPhases
    from mmmat.design.oracle import HullOracle, StandInMethod

    known = KnownPhases([nacl], ["nacl"])
    a, b = StandInMethod("a", 0.0), StandInMethod("b", 0.0)
    oracle = HullOracle([a, b], known, steps=5, cache=tmp_path, relax_methods=["a"])
    s = Structure(Lattice.cubic(3.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    res = oracle.evaluate([s])[0]
    assert res["relaxed_by"] == ["a"]
    assert res["energy_per_atom"]["a"] == pytest.approx(res["energy_per_atom"]["b"])
    assert res["e_hull"]["a"] == pytest.approx(res["e_hull"]["b"])
    assert {p.name for p in tmp_path.glob("*.json")} == {"a-0.0.json", "b-0.0@a-0.0.json"}


def test_gpu_methods_relax_the_round_in_one_batch_and_runs_can_share_a_cache(tmp_path, nacl):
    """On a GPU the worker pool (one structure per process) is never used; two hulls write one cache folder."""
    from pymatgen.core import Lattice, Structure

    from mmmat.design import KnownPhases
    from mmmat.design.oracle import HullOracle, MethodHull, StandInMethod

    class OnGPU(StandInMethod):
        device = "cuda"
        calls: list = []

        def relax(self, structures, steps, fmax):
            self.calls.append(len(structures))
            return super().relax(structures, steps, fmax)

    known = KnownPhases([nacl], ["nacl"])
    m = OnGPU("g", 0.0)
    oracle = HullOracle([m], known, steps=5, cache=tmp_path, workers=4, method_specs=[("stand_in", {})])
    ss = [Structure(Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]) for a in (2.8, 3.0, 3.2)]
    res = oracle.evaluate(ss)
    assert oracle._pool is None and OnGPU.calls[0] == 3  # then elemental end points, one by one
    assert oracle.batch_size == 0  # the loop hands it a whole round per call
    assert HullOracle([StandInMethod("c", 0.0)], known, steps=5).batch_size == 1
    assert all(r["e_hull"]["g"] is not None for r in res)
    # a second run's hull of the same method saves beside the first without a shared temporary file
    other = MethodHull(StandInMethod("g", 0.0), known, tmp_path)
    other.ensure(["Na", "Cl"])
    other._save()
    oracle.hulls["g"]._save()
    assert [p.name for p in tmp_path.iterdir()] == ["g-0.0.json"]


def test_reference_structure_cache_round_trips(tmp_path):
    from mmmat.design.config import DataConfig
    from mmmat.design.loop import load_reference

    data = DataConfig(source="builtin", limit=12, cache=str(tmp_path))
    first = load_reference(data)
    assert len(list(tmp_path.glob("structures_builtin_*.npz"))) == 1
    second = load_reference(data)
    assert second["known"].ids == first["known"].ids
    for a, b in zip(first["known"].structures, second["known"].structures):
        assert a.composition == b.composition and np.allclose(a.lattice.matrix, b.lattice.matrix)
    assert [p for _, _, p in second["train"]] == [p for _, _, p in first["train"]]
