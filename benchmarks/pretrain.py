"""Pretrain on mp20p train within a time budget, then measure cross-modal retrieval over the whole test split.

    python benchmarks/pretrain.py --config configs/pretrain/mp20p.yaml --shards shards/mp20p \
        --seconds 420 --measured ../shared/data/xrd_measured/iucr_rietveld_cifs_cdvae_xrd/cif_files.tar.xz \
        --result benchmarks/results/pretrain_1gpu.json
    python benchmarks/pretrain.py --config configs/pretrain/mp20p_ddp.yaml --samples 5000000 ...   # 2 GPUs

XRD -> crystal queries are built from each test material's own peaks (FWHM 0.1°, Cu Kα):
  clean; shift (zero shift +0.1° 2θ); strain1_pure / strain2_pure (cell isotropically strained by +1 % / +2 %,
  i.e. every d x 1.01 / 1.02); strain1 (= the issue's case d: +1 % strain, +0.1° shift, Gaussian noise
  σ = 2 % of the maximum, linear background rising to 5 % of the maximum at 90°).
The gallery is every test crystal embedded by the crystal encoder. Beside each case, the classical baseline:
cosine similarity between the query profile and the profiles computed from every candidate crystal, both
broadened to FWHM 1°. A third route, ``via_pattern``, embeds every candidate through its own computed
(clean) pattern with the learned XRD encoder (pattern-to-pattern matching in the learned space).
Every other modality the model has (image, texts, neutron, ...: the mmmat.modalities registry) is searched
from its present test rows against the same gallery (``<modality>_to_crystal_R@1`` / ``R@10``).
Measured patterns: each of the measured IUCr profiles is searched among the test crystals plus the crystals
parsed from those CIFs; the rank of the true structure is reported for the learned encoder and the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_result  # noqa: E402

CASES = {
    "clean": {},
    "shift": {"shift": 0.1},
    "strain1_pure": {"strain": 0.01},
    "strain2_pure": {"strain": 0.02},
    "strain1": {"strain": 0.01, "shift": 0.1, "noise": 0.02, "background_slope": 0.05},
}


def _overlay(args: argparse.Namespace, tmp: Path) -> list[str]:
    """Command-line overrides for train.py."""
    out = [
        "fit", "--config", args.config, f"--data.shards={args.shards}",
        f"--trainer.default_root_dir={args.workdir}", f"--trainer.logger.init_args.save_dir={args.workdir}",
        f"--model.init_args.save_dir={args.workdir}/model", f"--data.tokenizer={args.workdir}/tokenizer",
    ]
    import yaml

    cfg = yaml.safe_load(open(args.config))
    # the config's own callbacks stay, except the budget and throughput ones this script sets itself
    cb = [c for c in (cfg.get("trainer") or {}).get("callbacks") or []
          if c.get("class_path", "").rsplit(".", 1)[-1] not in ("TimeBudget", "Throughput")]
    cb.append({"class_path": "mmmat.tasks.callbacks.Throughput"})
    if args.samples:
        per_step = cfg["data"]["batch_size"] * (args.devices or cfg["trainer"].get("devices", 1))
        steps = max(1, args.samples // per_step)
        out += [f"--trainer.max_steps={steps}", f"--model.init_args.max_steps={steps}"]
    else:
        cb.append({"class_path": "mmmat.tasks.callbacks.TimeBudget",
                   "init_args": {"seconds": args.seconds, "calibrate_steps": 200}})
    if args.profile:
        cb.append({"class_path": "mmmat.tasks.callbacks.StepProfiler", "init_args": {"out_dir": args.profile}})
    extra = tmp / "overlay.yaml"
    extra.write_text(json.dumps({"trainer": {"callbacks": cb}}))
    out += ["--config", str(extra)]
    if args.devices:
        out += [f"--trainer.devices={args.devices}"]
        if args.devices == 1:
            out += ["--trainer.strategy=auto"]
    if args.no_val:
        out += ["--trainer.limit_val_batches=0"]
    return out + list(args.override)


@torch.no_grad()
def _embed_xrd(model, profiles: torch.Tensor, dev: torch.device, bs: int = 1024) -> torch.Tensor:
    outs = []
    enc, proj = model.encoders["xrd"], model.projections["xrd"]
    for i in range(0, len(profiles), bs):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            h = proj(enc(None, profile=profiles[i : i + bs].to(dev)))
        outs.append(F.normalize(h.float(), dim=-1))
    return torch.cat(outs)


def _profiles(peaks: torch.Tensor, mask: torch.Tensor, fwhm: float, case: dict, seed: int = 0) -> torch.Tensor:
    from mmmat.data.augment import corrupt_profile

    outs = []
    for i in range(0, len(peaks), 512):
        p, m = peaks[i : i + 512].cpu(), mask[i : i + 512].cpu()
        seeds = list(range(seed + i, seed + i + len(p)))
        outs.append(corrupt_profile(p[..., 0], p[..., 1], m, fwhm=fwhm, seed=seeds, **case))
    return torch.cat(outs)


def _cosine_ranks(q: torch.Tensor, g: torch.Tensor, true: torch.Tensor, dev: torch.device) -> dict:
    from mmmat.evaluation.retrieval import retrieval_metrics

    return retrieval_metrics(q.to(dev), g.to(dev), true.to(dev), ks=(1, 5, 10))


def build_queries(shards: str, out: str, threads: int = 8) -> None:
    """Compute every corrupted query profile of the test split (learned and baseline widths) into ``out``.

    The profiles depend only on the data, so they are built once per machine, in a separate process that runs
    while the model trains (``--queries``).
    """
    from mmmat.data.loader import load_records, split_shards

    torch.set_num_threads(threads)
    records = load_records(split_shards(shards, "test"))
    width = max(len(r.xrd_peaks) for r in records)
    peaks = torch.zeros(len(records), width, 2, dtype=torch.float32)
    mask = torch.zeros(len(records), width, dtype=torch.bool)
    for i, r in enumerate(records):
        p = torch.as_tensor(np.asarray(r.xrd_peaks, dtype=np.float32))
        peaks[i, : len(p)] = p
        mask[i, : len(p)] = True
    doc = {"ids": [r.material_id for r in records]}
    for name, case in CASES.items():
        doc[f"q/{name}"] = _profiles(peaks, mask, 0.1, case).float()
        doc[f"b/{name}"] = _profiles(peaks, mask, 1.0, case).float()
    tmp = out + ".part"
    torch.save(doc, tmp)
    os.replace(tmp, out)


def _load_queries(path: str, proc, ids: list[str]) -> dict:
    if proc is not None:
        proc.wait()
    doc = torch.load(path, weights_only=True)
    if doc["ids"] != ids:
        raise RuntimeError(f"{path} was built for other test materials")
    return doc


def _measured(path: str) -> list[dict]:
    """Profiles and structures of the measured CIFs (a .tar.xz or a folder)."""
    from mmmat.data.schema import MaterialRecord
    from mmmat.data.xrd import read_cif_powder, resample

    tmp = None
    p = Path(path)
    if p.is_file():
        tmp = tempfile.mkdtemp()
        with tarfile.open(p) as t:
            t.extractall(tmp, filter="data")
        p = Path(tmp)
    out = []
    for f in sorted(p.rglob("*.cif")):
        item = {"file": f.name}
        try:
            pat = read_cif_powder(str(f))
            item["profile"] = torch.from_numpy(resample(pat)).float()
            item["wavelength"] = pat.wavelength
        except Exception as exc:
            item["error"] = f"profile: {exc}"
            out.append(item)
            continue
        try:
            from pymatgen.io.cif import CifParser

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = CifParser(str(f)).parse_structures(primitive=False)[0]
            item["record"] = MaterialRecord.from_structure(s, f.stem)
            item["formula"] = s.composition.reduced_formula
            item["num_atoms"] = len(s)
        except Exception as exc:
            item["error"] = f"structure: {type(exc).__name__}: {str(exc)[:120]}"
        out.append(item)
    return out


def evaluate(model_dir: str, shards: str, measured: str | None, dev: torch.device, queries: str | None = None,
             queries_proc=None) -> tuple[dict, dict]:
    """Retrieval figures on the test split (and the measured patterns)."""
    from mmmat.data.batch import Collator
    from mmmat.data.loader import load_records, split_shards
    from mmmat.data.resident import ResidentData, ResidentLoader
    from mmmat.data.xrd import compute_peaks, render_profile_torch
    from mmmat.evaluation.retrieval import rank_of_true, retrieval_metrics
    from mmmat.latent.model import MultimodalModel
    from mmmat.modalities import modality_names

    model = MultimodalModel.from_pretrained(model_dir, map_location=dev).eval()
    records = load_records(split_shards(shards, "test"))
    data = ResidentData(records, [], tokenizer=model.tokenizer, cutoff=model.config["cutoff"], device=dev,
                        max_text_tokens=model.config["max_text_tokens"])
    emb: dict[str, list] = {m: [] for m in model.modalities}
    pres: dict[str, list] = {m: [] for m in model.modalities}
    peaks, pmask = [], []
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        for b in ResidentLoader(data, 512, shuffle=False, drop_last=False, rank=0, world_size=1):
            for m in model.modalities:
                emb[m].append(model.encode(m, b))
                pres[m].append(b.present[m])
            peaks.append(b.inputs["xrd"]["peaks"].cpu())
            pmask.append(b.inputs["xrd"]["peak_mask"].cpu())
    emb = {m: torch.cat(v).float() for m, v in emb.items()}
    pres = {m: torch.cat(v) for m, v in pres.items()}
    width = max(p.shape[1] for p in peaks)
    peaks = torch.cat([F.pad(p, (0, 0, 0, width - p.shape[1])) for p in peaks])
    pmask = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in pmask])
    n = len(records)
    true = torch.arange(n)
    gallery = emb["crystal"]
    metrics: dict[str, float] = {"test_materials": n}
    extra: dict = {}

    t0 = time.perf_counter()
    cached = _load_queries(queries, queries_proc, [r.material_id for r in records]) if queries else None
    base_gallery = render_profile_torch(peaks[..., 0], peaks[..., 1], pmask, fwhm=1.0)
    base_gallery = F.normalize(base_gallery.float(), dim=-1)
    clean_learned = None
    for name, case in CASES.items():
        q = cached[f"q/{name}"] if cached else _profiles(peaks, pmask, 0.1, case)
        qe = _embed_xrd(model, q, dev)
        if name == "clean":
            clean_learned = qe
        r = retrieval_metrics(qe, gallery, true.to(dev))
        metrics[f"xrd_to_crystal_R@1_{name}"] = r["R@1"]
        metrics[f"xrd_to_crystal_R@10_{name}"] = r["R@10"]
        metrics[f"xrd_to_crystal_median_rank_{name}"] = r["median_rank"]
        r = retrieval_metrics(qe, clean_learned, true.to(dev))
        metrics[f"xrd_to_crystal_via_pattern_R@1_{name}"] = r["R@1"]
        metrics[f"xrd_to_crystal_via_pattern_R@10_{name}"] = r["R@10"]
        qb = F.normalize(cached[f"b/{name}"] if cached else _profiles(peaks, pmask, 1.0, case), dim=-1)
        r = _cosine_ranks(qb, base_gallery, true, dev)
        metrics[f"baseline_cosine_R@1_{name}"] = r["R@1"]
        metrics[f"baseline_cosine_R@10_{name}"] = r["R@10"]
    metrics["xrd_eval_seconds"] = round(time.perf_counter() - t0, 1)

    # every other modality of the model (mmmat.modalities registry order): its present test rows -> crystals
    for m in [m for m in modality_names() if m not in ("crystal", "xrd")]:
        if m not in emb or not bool(pres[m].any()):
            continue
        rows = pres[m].nonzero().squeeze(1)
        r = retrieval_metrics(emb[m][rows], gallery, rows.to(gallery.device))
        metrics[f"{m}_to_crystal_R@1"] = r["R@1"]
        metrics[f"{m}_to_crystal_R@10"] = r["R@10"]
        metrics[f"{m}_queries"] = int(rows.numel())

    if measured:
        items = _measured(measured)
        usable = [it for it in items if "record" in it and "profile" in it]
        coll = Collator(cutoff=model.config["cutoff"])
        with torch.no_grad():
            extra_g = model.encode("crystal", coll([it["record"] for it in usable]).to(dev)).float()
            q = _embed_xrd(model, torch.stack([it["profile"] for it in usable]), dev)
        g = torch.cat([gallery, extra_g])
        ranks = rank_of_true(q, g, torch.arange(n, n + len(usable), device=dev)).tolist()
        bpk = [compute_peaks(it["record"].to_structure()) for it in usable]
        bg_extra = torch.stack([
            render_profile_torch(torch.as_tensor(p[:, 0])[None], torch.as_tensor(p[:, 1])[None],
                                 torch.ones(1, len(p), dtype=torch.bool), fwhm=1.0)[0] for p in bpk
        ])
        bgal = torch.cat([base_gallery, F.normalize(bg_extra.float(), dim=-1)])
        bq = F.normalize(torch.stack([it["profile"] for it in usable]), dim=-1)
        branks = rank_of_true(bq.to(dev), bgal.to(dev), torch.arange(n, n + len(usable), device=dev)).tolist()
        table = []
        k = 0
        for it in items:
            row = {"file": it["file"], "formula": it.get("formula"), "num_atoms": it.get("num_atoms"),
                   "wavelength": it.get("wavelength")}
            if "record" in it and "profile" in it:
                row.update(rank_learned=ranks[k], rank_baseline=branks[k])
                k += 1
            else:
                row["error"] = it.get("error")
            table.append(row)
        extra["measured"] = {"gallery_size": n + len(usable), "patterns": table}
        metrics["measured_patterns"] = len(usable)
        metrics["measured_median_rank_learned"] = float(np.median(ranks)) if ranks else float("nan")
        metrics["measured_median_rank_baseline"] = float(np.median(branks)) if branks else float("nan")
        metrics["measured_top10_learned"] = sum(r <= 10 for r in ranks)
        metrics["measured_top10_baseline"] = sum(r <= 10 for r in branks)
    return metrics, extra


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/pretrain/mp20p.yaml")
    ap.add_argument("--shards", default="shards/mp20p")
    ap.add_argument("--workdir", default="runs/bench_pretrain")
    ap.add_argument("--seconds", type=float, default=420.0, help="training time budget")
    ap.add_argument("--samples", type=int, default=0, help="train on this many samples instead of a time budget")
    ap.add_argument("--devices", type=int, default=0)
    ap.add_argument("--measured", default=None)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--eval-only", action="store_true",
                    help="evaluate WORKDIR/model of an earlier run; its training figures in --result are kept")
    ap.add_argument("--wait-queries", type=float, default=0.0,
                    help="seconds to wait for --queries written by a builder started earlier")
    ap.add_argument("--no-val", action="store_true")
    ap.add_argument("--result", default=None)
    ap.add_argument("--profile", default=None, help="folder: profile steps 100-120 and count host syncs, then stop")
    ap.add_argument("--queries", default=None, help="cache file of the test query profiles (built while training)")
    ap.add_argument("--build-queries", default=None, help=argparse.SUPPRESS)
    ap.add_argument("override", nargs="*", help="extra train.py arguments, e.g. --trainer.accelerator=cpu")
    args = ap.parse_args()
    if args.build_queries:
        build_queries(args.shards, args.build_queries)
        return
    if args.eval_only:
        eval_only(args)
        return
    proc = None
    rank0 = os.environ.get("LOCAL_RANK", "0") == "0"
    if args.queries and not args.no_eval and not Path(args.queries).exists() and rank0:
        import subprocess

        proc = subprocess.Popen([sys.executable, __file__, "--shards", args.shards, "--build-queries", args.queries])
    import train

    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    cli = train.main(_overlay(args, tmp))
    wall = time.perf_counter() - t0
    trainer = cli.trainer
    if not trainer.is_global_zero:
        return
    thr = next((c.result for c in trainer.callbacks if type(c).__name__ == "Throughput"), {})
    metrics: dict = {
        "train_wall_seconds": round(wall, 1),
        "steps": trainer.global_step,
        "samples_seen": trainer.global_step * cli.datamodule.hparams.batch_size * trainer.world_size,
        "world_size": trainer.world_size,
        "crystals_per_s": round(thr.get("samples_per_s", 0.0), 1),
        "data_wait_share": round(thr.get("data_wait_share", 0.0), 4),
        "peak_gpu_mem_gb": round(thr.get("peak_gpu_mem_gb", 0.0), 2),
    }
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    extra = {"val_metrics_last": val, "config": args.config, "workdir": args.workdir}
    if not args.no_eval:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        m, e = evaluate(f"{args.workdir}/model", args.shards, args.measured, dev, args.queries, proc)
        metrics.update(m)
        extra.update(e)
    name = Path(args.result).stem if args.result else "pretrain"
    write_result(name, metrics, extra, args.result)
    os._exit(0)  # leave no DDP or loader processes behind


def eval_only(args: argparse.Namespace) -> None:
    """Retrieval figures of ``WORKDIR/model``, merged into the training run's result file."""
    if args.queries and not Path(args.queries).exists():
        deadline = time.time() + args.wait_queries
        while time.time() < deadline and not Path(args.queries).exists():
            time.sleep(2)
    queries = args.queries if args.queries and Path(args.queries).exists() else None
    prev = json.loads(Path(args.result).read_text()) if args.result and Path(args.result).exists() else {}
    metrics = dict(prev.get("metrics", {}))
    extra = {k: v for k, v in prev.items() if k not in ("card", "date", "command", "metrics")}
    if prev:
        extra["train_command"] = prev.get("command")
        extra["train_card"] = prev.get("card")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m, e = evaluate(f"{args.workdir}/model", args.shards, args.measured, dev, queries)
    metrics.update(m)
    extra.update(e)
    name = Path(args.result).stem if args.result else "pretrain"
    write_result(name, metrics, extra, args.result)


if __name__ == "__main__":
    main()
