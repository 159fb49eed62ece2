"""What the shipped MLIPs already know about mp20p formation energies: their energy plus fitted chemical potentials.

    mmmat evaluate prepare --reference shards/mp20p --out cache/mp20p   # MLIP energies of every mp20p crystal
    python benchmarks/mlip_baseline.py --shards shards/mp20p --cache cache/mp20p

For each MLIP whose single-point energies ``prepare`` cached (``CACHE/hull/<mlip version>.json``: eV/atom of
every mp20p crystal at its DFT-relaxed structure), the formation energy is predicted as

    E_form(x) = E_MLIP(x) + sum_el f_el(x) mu_el

with ``f_el`` the atomic fractions and ``mu_el`` per-element chemical potentials fitted by ridge regression
(penalty 1e-3) of ``label - E_MLIP`` on the fractions of the labelled train materials: the first 1,000 of the
fine-tuning benchmark's permutation (:func:`mmmat.heads.property.select_labelled`, seeds 0-2) and all of them.
Scored on the validation and test splits. No network is trained: the only fitted numbers are one chemical
potential per element.

This is not a baseline a model trained on mp20p alone can be held to. CHGNet and SevenNet-0 were trained on
MPtrj, the relaxation trajectories of the Materials Project, which hold the DFT energies of most mp20p
materials, test split included: the figure measures what those potentials learned from them (and their
train/test overlap with mp20p), and it bounds from below what distilling them into a pretraining objective
would give. Numbers on mp20p are not MP-20 numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_result  # noqa: E402

TARGET = "formation_energy_per_atom"


def fractions(numbers_list: list) -> np.ndarray:
    """(N, 119) atomic fractions of each material."""
    x = np.zeros((len(numbers_list), 119))
    for i, z in enumerate(numbers_list):
        el, c = np.unique(np.asarray(z, dtype=int), return_counts=True)
        x[i, el] = c / c.sum()
    return x


def fit_potentials(x: np.ndarray, residual: np.ndarray, penalty: float = 1e-3) -> np.ndarray:
    """Chemical potentials (119,) minimising ||x mu - residual||² + penalty ||mu||²."""
    return np.linalg.solve(x.T @ x + penalty * np.eye(x.shape[1]), x.T @ residual)


def load_energies(path: Path) -> dict[str, float]:
    """Material id -> MLIP energy per atom from a ``prepare`` hull cache file (None entries dropped)."""
    doc = json.loads(path.read_text())
    out = {}
    for key, v in doc["entries"].items():
        if v.get("e") is not None:
            out[key.split(":")[0]] = float(v["e"])
    return out


def main() -> None:
    """Fit and score the baseline for every cached MLIP; write mlip_baseline.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="shards/mp20p")
    ap.add_argument("--cache", required=True, help="folder written by `mmmat evaluate prepare` (holds hull/)")
    ap.add_argument("--labels", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--result", default=None)
    args = ap.parse_args()
    from mmmat.data.loader import load_records, split_shards
    from mmmat.heads.property import select_labelled

    files = sorted((Path(args.cache) / "hull").glob("*.json"))
    if not files:
        raise SystemExit(f"no MLIP energies under {args.cache}/hull: run `mmmat evaluate prepare` first")
    rows = {s: load_records(split_shards(args.shards, s)) for s in ("train", "val", "test")}
    y = {s: np.array([r.properties.get(TARGET, np.nan) for r in rs], dtype=float) for s, rs in rows.items()}
    x = {s: fractions([r.numbers for r in rs]) for s, rs in rows.items()}
    metrics: dict = {}
    for f in files:
        e_of = load_energies(f)
        e = {s: np.array([e_of.get(r.material_id, np.nan) for r in rs]) for s, rs in rows.items()}
        res: dict = {"energies": f.name, "missing": {s: int(np.isnan(v).sum()) for s, v in e.items()}}
        settings = [(f"{args.labels}_seed{s}", select_labelled(y["train"], max_labels=args.labels, seed=s))
                    for s in args.seeds] + [("all", select_labelled(y["train"]))]
        for name, idx in settings:
            idx = idx[np.isfinite(e["train"][idx])]
            mu = fit_potentials(x["train"][idx], y["train"][idx] - e["train"][idx])
            out = {"train_labels": len(idx)}
            for s in ("val", "test"):
                ok = np.isfinite(e[s]) & np.isfinite(y[s])
                out[f"{s}_mae"] = float(np.abs(e[s][ok] + x[s][ok] @ mu - y[s][ok]).mean())
                out[f"{s}_materials"] = int(ok.sum())
            res[name] = out
        k = [res[f"{args.labels}_seed{s}"]["test_mae"] for s in args.seeds]
        res[f"test_mae_{args.labels}_mean"], res[f"test_mae_{args.labels}_std"] = float(np.mean(k)), float(np.std(k))
        metrics[f.stem] = res
        print(f.stem, {kk: v for kk, v in res.items() if "mae" in kk}, flush=True)
    write_result("mlip_baseline", metrics, {
        "target": TARGET, "shards": args.shards,
        "note": "MLIPs trained on MPtrj, which holds the DFT energies of most mp20p materials (test split "
                "included): not a baseline for models trained on mp20p alone. mp20p, not MP-20.",
    }, out=args.result)


if __name__ == "__main__":
    main()
