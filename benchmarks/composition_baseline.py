"""The classical composition model on mp20p: Magpie-style features + gradient boosting; the mean predictor.

    python benchmarks/composition_baseline.py --shards shards/mp20p

Features (computed here from pymatgen's element data; matminer is not used because installing it would
downgrade pandas 3 to 2.x): for 22 elemental properties, the fraction-weighted minimum, maximum, range,
mean, mean absolute deviation and mode (the value of the most abundant element, ties -> smallest), as in
matminer's ``ElementProperty.from_preset("magpie")``; plus Magpie's stoichiometry features (number of
elements, Lp norms of the fractions, p = 2, 3, 5, 7, 10) and valence-orbital fractions (s, p, d, f shares of
the mean valence electron count); 142 features. The properties are Magpie's where pymatgen has them: Z,
Mendeleev number, atomic mass (amu), melting point (K), group, row, atomic radius (Å), Pauling
electronegativity, s/p/d/f/total valence electrons, s/p/d/f/total unfilled valence states, volume per atom
of the element (molar volume / N_A, Å³); Magpie's DFT ground-state band gap, magnetic moment and space group
of the element are not in pymatgen and are replaced by the first ionisation energy (eV), electron affinity
(eV) and the mean ionic radius (Å). Valence electrons are those outside the preceding noble-gas core (Magpie's
convention: Ga has 10 d valence electrons, Pb 14 f).

Model: scikit-learn ``HistGradientBoostingRegressor`` (learning rate 0.05, up to 3,000 trees of 63 leaves),
with the number of trees and the loss (squared or absolute error) chosen by MAE on the mp20p validation split
(990). Trained on all mp20p train labels (8,927) and on the first 1,000 of a permutation of them by seed 0
(:func:`mmmat.heads.property.select_labelled`: the materials the fine-tuning's ``max_train_labels: 1000``
uses); scored on the 7,342 test materials. The mean predictor predicts the train mean (the median, the
MAE-optimal constant, is listed beside it).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_result  # noqa: E402

TARGETS = ("formation_energy_per_atom", "band_gap")
STATS = ("minimum", "maximum", "range", "mean", "avg_dev", "mode")
PROPERTIES = (
    "Number", "MendeleevNumber", "AtomicWeight", "MeltingT", "Column", "Row", "AtomicRadius",
    "Electronegativity",
    "NsValence", "NpValence", "NdValence", "NfValence", "NValence",
    "NsUnfilled", "NpUnfilled", "NdUnfilled", "NfUnfilled", "NUnfilled",
    "VolumePerAtom", "IonizationEnergy", "ElectronAffinity", "IonicRadius",
)
AVOGADRO = 6.02214076e23
_CAPACITY = {"s": 2, "p": 6, "d": 10, "f": 14}


def _num(x: object) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _valence(electronic_structure: str) -> dict[str, int]:
    """Valence electrons per orbital type (those outside the noble-gas core in ``[Ar].3d6.4s2``)."""
    out = {"s": 0, "p": 0, "d": 0, "f": 0}
    for tok in electronic_structure.split("."):
        if tok.startswith("["):
            continue
        i = 0
        while i < len(tok) and tok[i].isdigit():
            i += 1
        if i < len(tok) and tok[i] in out:
            out[tok[i]] += int(tok[i + 1 :] or 0)
    return out


def element_table(max_z: int = 103) -> np.ndarray:
    """(max_z + 1, len(PROPERTIES)) elemental properties (NaN where pymatgen has none); row 0 unused."""
    from pymatgen.core import Element

    table = np.full((max_z + 1, len(PROPERTIES)), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for z in range(1, max_z + 1):
            e = Element.from_Z(z)
            try:
                val = _valence(e.electronic_structure)
            except Exception:  # noqa: BLE001 - heavy elements with odd configurations: leave NaN
                val = None
            row = {
                "Number": z, "MendeleevNumber": _num(e.mendeleev_no), "AtomicWeight": _num(e.atomic_mass),
                "MeltingT": _num(e.melting_point), "Column": _num(e.group), "Row": _num(e.row),
                "AtomicRadius": _num(e.atomic_radius), "Electronegativity": _num(e.X),
                "VolumePerAtom": _num(e.molar_volume) * 1e24 / AVOGADRO,
                "IonizationEnergy": _num(e.ionization_energy), "ElectronAffinity": _num(e.electron_affinity),
                "IonicRadius": _num(e.average_ionic_radius),
            }
            if val is not None:
                for o in "spdf":
                    row[f"N{o}Valence"] = val[o]
                    row[f"N{o}Unfilled"] = _CAPACITY[o] - val[o] if val[o] > 0 else 0
                row["NValence"] = sum(val.values())
                row["NUnfilled"] = sum(row[f"N{o}Unfilled"] for o in "spdf")
            table[z] = [row.get(p, np.nan) for p in PROPERTIES]
    return table


def feature_names() -> list[str]:
    """Names of the feature columns, in order."""
    names = [f"{s} {p}" for p in PROPERTIES for s in STATS]
    names += ["NComp", *[f"{p}-norm" for p in (2, 3, 5, 7, 10)]]
    names += [f"frac {o}Valence" for o in "spdf"]
    return names


def featurize(numbers: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Magpie-style features of one composition given as atomic numbers of the cell's atoms."""
    zs, counts = np.unique(np.asarray(numbers, dtype=np.int64), return_counts=True)
    w = counts / counts.sum()
    props = table[zs]  # (E, P)
    feats = []
    for j in range(props.shape[1]):
        x = props[:, j]
        ok = np.isfinite(x)
        if not ok.any():
            feats += [np.nan] * len(STATS)
            continue
        xo, wo = x[ok], w[ok] / w[ok].sum()
        mean = float((wo * xo).sum())
        top = wo.max()
        mode = float(xo[np.isclose(wo, top)].min())
        feats += [xo.min(), xo.max(), xo.max() - xo.min(), mean, float((wo * np.abs(xo - mean)).sum()), mode]
    feats.append(float(len(zs)))
    feats += [float((w**p).sum() ** (1.0 / p)) for p in (2, 3, 5, 7, 10)]
    idx = {p: PROPERTIES.index(p) for p in ("NsValence", "NpValence", "NdValence", "NfValence", "NValence")}
    tot = float((w * np.nan_to_num(props[:, idx["NValence"]])).sum())
    for o in "spdf":
        v = float((w * np.nan_to_num(props[:, idx[f"N{o}Valence"]])).sum())
        feats.append(v / tot if tot > 0 else np.nan)
    return np.asarray(feats, dtype=np.float64)


def load_split(shards: str, split: str, table: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Features (N, F) and labels per target of one split of a shard folder (records in file order)."""
    from mmmat.data.loader import load_records, split_shards

    records = load_records(split_shards(shards, split))
    x = np.stack([featurize(r.numbers, table) for r in records])
    y = {t: np.array([r.properties.get(t, math.nan) for r in records], dtype=np.float64) for t in TARGETS}
    return x, y


def fit_gbm(
    x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, max_iter: int, seed: int
) -> tuple[object, int, str, float]:
    """Fit both losses; return (model, best number of trees, loss, val MAE) of the best on the val split."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    best = None
    for loss in ("squared_error", "absolute_error"):
        m = HistGradientBoostingRegressor(
            loss=loss, learning_rate=0.05, max_iter=max_iter, max_leaf_nodes=63, min_samples_leaf=10,
            l2_regularization=1e-3, early_stopping=False, random_state=seed,
        )
        m.fit(x, y)
        maes = [float(np.abs(p - yv).mean()) for p in m.staged_predict(xv)]
        k = int(np.argmin(maes))
        if best is None or maes[k] < best[3]:
            best = (m, k + 1, loss, maes[k])
    return best


def predict_at(model: object, x: np.ndarray, n_trees: int) -> np.ndarray:
    """Predictions of the first ``n_trees`` boosting stages."""
    for i, p in enumerate(model.staged_predict(x), start=1):
        if i == n_trees:
            return p
    raise ValueError(f"the model has fewer than {n_trees} stages")


def main() -> None:
    from mmmat.heads.property import select_labelled

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="shards/mp20p")
    ap.add_argument("--labels", type=int, nargs="+", default=[0, 1000], help="train label counts (0 = all)")
    ap.add_argument("--max-iter", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0, help="seed of the label subset and of the boosting")
    ap.add_argument("--result", default=None, help="output JSON (default: results/finetune_baselines.json)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    table = element_table()
    xs, ys = {}, {}
    for split in ("train", "val", "test"):
        xs[split], ys[split] = load_split(args.shards, split, table)
    t_feat = time.perf_counter() - t0
    print(f"features: {xs['train'].shape[1]} per material, {t_feat:.1f} s for "
          f"{sum(len(x) for x in xs.values())} materials", flush=True)

    metrics: dict[str, dict] = {}
    for target in TARGETS:
        y_all, yv, yt = ys["train"][target], ys["val"][target], ys["test"][target]
        okv, okt = np.isfinite(yv), np.isfinite(yt)
        res: dict[str, dict] = {}
        for n in args.labels:
            idx = select_labelled(y_all, None if n == 0 else n, 1.0, args.seed)
            key = "all" if n == 0 else str(n)
            x, y = xs["train"][idx], y_all[idx]
            t1 = time.perf_counter()
            model, n_trees, loss, val_mae = fit_gbm(x, y, xs["val"][okv], yv[okv], args.max_iter, args.seed)
            pred = predict_at(model, xs["test"][okt], n_trees)
            err = pred - yt[okt]
            res[key] = {
                "train_labels": int(len(idx)),
                "magpie_gbm_mae": float(np.abs(err).mean()),
                "magpie_gbm_rmse": float(np.sqrt((err**2).mean())),
                "magpie_gbm_r2": float(1 - (err**2).sum() / ((yt[okt] - yt[okt].mean()) ** 2).sum()),
                "magpie_gbm_val_mae": val_mae,
                "magpie_gbm_trees": n_trees,
                "magpie_gbm_loss": loss,
                "mean_predictor_mae": float(np.abs(yt[okt] - y.mean()).mean()),
                "median_predictor_mae": float(np.abs(yt[okt] - np.median(y)).mean()),
                "fit_seconds": round(time.perf_counter() - t1, 1),
            }
            print(target, key, res[key], flush=True)
        metrics[target] = {"test_materials": int(okt.sum()), **res}
    extra = {
        "features": f"Magpie-style, {len(feature_names())} features from pymatgen element data (docstring)",
        "model": "sklearn HistGradientBoostingRegressor, lr 0.05, 63 leaves; trees and loss by val MAE",
        "subset": f"first N of numpy default_rng({args.seed}).permutation of the labelled train materials",
        "units": {"formation_energy_per_atom": "eV/atom", "band_gap": "eV"},
        "feature_seconds": round(t_feat, 1),
    }
    write_result("finetune_baselines", metrics, extra, out=args.result)


if __name__ == "__main__":
    main()
