"""Tiny fixtures for the web app tests: builtin shards, a random tiny model and its index, a generator, a run."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import torch
import yaml

TINY = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml"


def build_env(root: Path) -> dict:
    """20 builtin crystals per split, a random tiny model (seed 0), its index, a generator, a design run."""
    from data_pipelines.base import BuildOptions, get_source
    from data_pipelines.build import build_shards
    from mmmat.data.loader import load_records, split_shards
    from mmmat.latent.model import MultimodalModel
    from mmmat.retrieval import build_index

    shards = root / "shards"
    build_shards(get_source("builtin")(None, limit=20), shards, progress=False, options=BuildOptions(describe=True))
    torch.manual_seed(0)
    enc = yaml.safe_load(TINY.read_text())["model"]["init_args"]["encoders"]
    model_dir = MultimodalModel(enc, embed_dim=32).save_pretrained(root / "model")
    build_index(model_dir, shards, root / "index")
    records = {r.material_id: r for s in ("train", "val", "test") for r in load_records(split_shards(shards, s))}
    return {"root": root, "shards": shards, "model": model_dir, "index": root / "index", "records": records,
            "generator": tiny_generator(root / "generator"), "runs": design_runs(root / "runs", records)}


def tiny_generator(path: Path) -> Path:
    """An untrained small flow (random weights) saved as a generator folder: enough to drive the pages."""
    from pymatgen.core import Lattice, Structure

    from mmmat.generative.flow import CrystalFlow

    torch.manual_seed(0)
    flow = CrystalFlow(hidden=16, layers=1, fourier=2, max_atoms=8)
    s = [Structure(Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]) for a in (3.9, 4.1)]
    lat = torch.tensor(np.stack([x.lattice.matrix for x in s]), dtype=torch.float32)
    flow.fit_statistics(lat, torch.tensor([2, 2]), torch.tensor([11, 17, 11, 17]))
    flow.save_pretrained(path, extra={"condition_modalities": [], "condition_model": None})
    return path


def design_runs(root: Path, records: dict) -> Path:
    """One design run folder as ``mmmat.design`` writes it (ledger.sqlite, report.json, hits/*.cif)."""
    from pymatgen.io.cif import CifWriter

    run = root / "run_a"
    (run / "hits").mkdir(parents=True)
    recs = list(records.values())[:12]
    rows, hits = [], []
    rng = np.random.default_rng(0)
    for i, r in enumerate(recs):
        s = r.to_structure()
        eh = float(rng.uniform(0, 0.3))
        gap = float(rng.uniform(0, 4))
        is_hit = eh < 0.1
        rows.append((f"c{i}", i // 4, "templates", s.composition.reduced_formula, str(CifWriter(s)), gap, 0.1,
                     eh, "", int(is_hit)))
        if is_hit:
            name = f"hits/c{i}.cif"
            (run / name).write_text(str(CifWriter(s)))
            hits.append({"id": f"c{i}", "formula": s.composition.reduced_formula, "cif": name, "round": i // 4,
                         "e_hull": {"chgnet": eh}, "properties": {"band_gap": gap}})
    con = sqlite3.connect(run / "ledger.sqlite")
    con.execute("CREATE TABLE candidates (id TEXT, round INTEGER, source TEXT, formula TEXT, cif TEXT, "
                "surrogate_band_gap REAL, surrogate_std REAL, e_hull_chgnet REAL, guard_flags TEXT, is_hit INTEGER)")
    con.executemany("INSERT INTO candidates VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
    con.commit()
    con.close()
    rounds, cum_calls, cum_hits = [], 0, 0
    for k in range(3):
        h = sum(1 for x in hits if x["round"] == k)
        cum_calls += 4
        cum_hits += h
        rounds.append({"round": k, "oracle_calls": 4, "cumulative_oracle_calls": cum_calls, "hits": h,
                       "cumulative_hits": cum_hits, "guards": {"single_element": k, "duplicate": 1},
                       "surrogate_mae": 0.3 / (k + 1), "disagreement": None, "ood_share": 0.1,
                       "unique_compositions": 4, "seconds": {"propose": 1.0, "oracle": 2.0}})
    report = {"config": {"target": "band_gap"}, "rounds": rounds, "hits": hits, "strategy": "greedy"}
    (run / "report.json").write_text(json.dumps(report))
    (run / "report.md").write_text("# run_a\n")
    return root
