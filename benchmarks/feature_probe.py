"""What a pretrained crystal encoder's features hold before any fine-tuning: a linear probe and their rank.

    python benchmarks/feature_probe.py --shards shards/mp20p --models random=runs/abl/contrastive/model \
        contrastive=runs/abl/contrastive/model denoise=runs/abl/denoise/model

For each saved MultimodalModel folder (``NAME=PATH``; ``random=PATH`` re-initialises that architecture), the
crystal encoder's output features (the input of the property heads) of the first ``--labels`` labelled
train materials (the fine-tuning benchmark's permutation, ``select_labelled`` with ``--seed``) and of the
validation split, then:

- ``val_mae``: ridge regression of the target on the standardised features, its penalty chosen by 5-fold
  cross-validation on the training rows only, scored on the validation split (the test split is not read);
- ``effective_rank``: exp of the entropy of the normalised singular-value spectrum of the centred training
  features (Roy & Vetterli 2007), against the feature width; a collapsed representation has a low one;
- ``feature_std`` / ``feature_abs``: mean per-feature standard deviation and mean absolute value.

For the graph + computed-pattern encoder the same figures are given for its two branches before their fusion
(``graph``, ``xrd``), to tell where a pretraining lost what the target needs.

A fine-tuning run starts from these features; when a pretrained encoder probes worse than a random one, the
pretraining has taken out what the target needs, and fine-tuning must first undo it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_result  # noqa: E402

PENALTIES = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def effective_rank(x: np.ndarray) -> float:
    """exp(entropy) of the normalised squared singular values of the centred rows of ``x``."""
    s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def ridge_probe(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, folds: int = 5) -> dict:
    """Ridge on standardised features, the penalty picked by k-fold CV on (x, y); MAE on (xv, yv)."""
    mu, sd = x.mean(0), x.std(0) + 1e-8

    def fit(a, b, lam):
        a = (a - mu) / sd
        w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (b - b.mean()))
        return lambda q: ((q - mu) / sd) @ w + b.mean()

    parts = np.array_split(np.random.default_rng(0).permutation(len(y)), folds)
    cv = {}
    for lam in PENALTIES:
        errs = []
        for k in range(folds):
            tr = np.concatenate([p for j, p in enumerate(parts) if j != k])
            errs.append(np.abs(fit(x[tr], y[tr], lam)(x[parts[k]]) - y[parts[k]]).mean())
        cv[lam] = float(np.mean(errs))
    lam = min(cv, key=cv.get)
    return {"val_mae": float(np.abs(fit(x, y, lam)(xv) - yv).mean()), "penalty": lam, "cv_mae": cv[lam]}


def features(path: str, records: list, reinit: bool, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Crystal-encoder features of ``records`` from the model saved at ``path``, per view.

    ``output``: what the property heads read. For a graph + computed-pattern encoder (``crystal/schnet_xrd``)
    also its two branches before their fusion: ``graph`` (the pooled graph network) and ``xrd`` (the CNN over
    the pattern computed from the structure).
    """
    import torch

    from mmmat.data.batch import Collator
    from mmmat.heads.property import PropertyModel

    model = PropertyModel.from_multimodal(path, ["probe"])
    if reinit:
        torch.manual_seed(0)
        for m in model.encoder.modules():
            if m is not model.encoder and hasattr(m, "reset_parameters"):
                m.reset_parameters()
    model.eval()
    collate = Collator(cutoff=model.config["cutoff"], build_graph=True)
    enc = model.encoder
    branches = hasattr(enc, "gnn") and hasattr(enc, "xrd") and hasattr(enc, "pattern")
    out: dict[str, list] = {}
    with torch.no_grad():
        for lo in range(0, len(records), batch_size):
            batch = collate(records[lo : lo + batch_size])
            out.setdefault("output", []).append(model.embed(batch).numpy())
            if branches:
                out.setdefault("graph", []).append(enc.gnn.encode(batch.crystal)[0].float().numpy())
                out.setdefault("xrd", []).append(enc.xrd(profile=enc.pattern(batch.crystal)).float().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    """Probe every model; write feature_probe.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="shards/mp20p")
    ap.add_argument("--models", nargs="+", required=True, help="NAME=PATH; NAME 'random' re-initialises PATH")
    ap.add_argument("--target", default="formation_energy_per_atom")
    ap.add_argument("--labels", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--result", default=None)
    args = ap.parse_args()
    import torch

    from mmmat.data.loader import load_records, split_shards
    from mmmat.heads.property import select_labelled

    torch.set_num_threads(args.threads)
    train = load_records(split_shards(args.shards, "train"))
    val = load_records(split_shards(args.shards, "val"))
    y_all = np.array([r.properties.get(args.target, np.nan) for r in train], dtype=float)
    tr = [train[i] for i in select_labelled(y_all, max_labels=args.labels, seed=args.seed)]
    va = [r for r in val if np.isfinite(r.properties.get(args.target, np.nan))]
    y, yv = np.array([r.properties[args.target] for r in tr]), np.array([r.properties[args.target] for r in va])
    metrics: dict = {}
    for spec in args.models:
        name, path = spec.split("=", 1)
        t0 = time.perf_counter()
        feats, feats_v = features(path, tr, name == "random"), features(path, va, name == "random")
        metrics[name] = {"model": path}
        for view, x in feats.items():
            xv = feats_v[view]
            res = {
                **ridge_probe(x, y, xv, yv),
                "effective_rank": effective_rank(x), "width": int(x.shape[1]),
                "feature_std": float(x.std(0).mean()), "feature_abs": float(np.abs(x).mean()),
            }
            if view == "output":  # the heads' input keeps the flat keys; the branches go under their names
                metrics[name].update(res)
            else:
                metrics[name][view] = res
        metrics[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(name, {k: v for k, v in metrics[name].items() if k != "model"}, flush=True)
    write_result("feature_probe", metrics, {"target": args.target, "train_labels": len(tr), "val_materials": len(va),
                                            "shards": args.shards}, out=args.result)


if __name__ == "__main__":
    main()
