"""Embedding lookup: FAISS index build time, memory, latency, throughput and recall; writes results/retrieval.json.

(a) Synthetic, 1,000,000 × 256-d unit vectors clustered like real embeddings: 10,000 random centres on the
    sphere, each point = its centre + Gaussian noise (σ per coordinate, default 0.05: cosine ≈ 0.78 to its
    centre), renormalised.  Queries are perturbed copies of indexed vectors (σ 0.02: cosine ≈ 0.95 to the
    original).  Exact (IndexFlatIP) and IVF (4096 lists, 16 probes) indexes through
    :class:`mmmat.retrieval.EmbeddingIndex`: build time, bytes on disk, RSS, single-query latency (k = 10, one
    query at a time after a warm-up; exact on a sample of queries), batch throughput, recall@10 against exact
    search.
(b) The real mp20p set: the crystals of every split embedded with a model (default: randomly initialised
    from the encoders of configs/pretrain/mp20p.yaml, CPU; ``--model DIR`` for a trained one), an exact
    index built from them, and the latency of index search alone and of a whole query (CIF text → graph →
    forward → search).

    python benchmarks/retrieval.py --shards /work/shards/mp20p
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from mmmat.retrieval import EmbeddingIndex, set_threads  # noqa: E402
from mmmat.retrieval.index import DEFAULT_TRAIN_PER_LIST  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    """Resident set size of this process now, MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (in place)."""
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered(n: int, d: int, centres: int, noise: float, seed: int) -> np.ndarray:
    """``n`` unit vectors around ``centres`` random unit centres (Gaussian noise σ per coordinate)."""
    rng = np.random.default_rng(seed)
    c = unit(rng.standard_normal((centres, d), dtype=np.float32))
    x = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):  # in blocks: no second full-size temporary
        stop = min(n, start + 100_000)
        x[start:stop] = c[rng.integers(0, centres, stop - start)]
        x[start:stop] += noise * rng.standard_normal((stop - start, d), dtype=np.float32)
    return unit(x)


def latency_ms(fn: Callable[[np.ndarray], object], queries: np.ndarray, warmup: int = 50) -> np.ndarray:
    """Wall time of ``fn(one query)`` for each query, ms (after ``warmup`` untimed calls)."""
    for i in range(min(warmup, len(queries))):
        fn(queries[i : i + 1])
    out = np.empty(len(queries))
    for i in range(len(queries)):
        t0 = time.perf_counter()
        fn(queries[i : i + 1])
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


def pct(a: np.ndarray) -> dict[str, float]:
    """p50 / p99 / mean of latencies in ms."""
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4),
            "mean_ms": round(float(a.mean()), 4)}


def recall_at(truth: np.ndarray, got: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` found in the same row of ``got``."""
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(truth, got, strict=True)]))


def saved_bytes(index: EmbeddingIndex, tmp: Path, name: str) -> tuple[int, float, float]:
    """(bytes of index.faiss, save seconds, load seconds)."""
    t0 = time.perf_counter()
    index.save(tmp / name)
    save_s = time.perf_counter() - t0
    size = (tmp / name / "index.faiss").stat().st_size
    t0 = time.perf_counter()
    EmbeddingIndex.load(tmp / name)
    load_s = time.perf_counter() - t0
    return size, save_s, load_s


def synthetic(args: argparse.Namespace, tmp: Path) -> dict:
    """Part (a): the 1M clustered set, exact and IVF."""
    out: dict = {"n": args.n, "dim": args.dim, "centres": args.centres, "noise": args.noise,
                 "query_noise": args.query_noise, "queries": args.queries, "k": args.k}
    rss0 = rss_mb()
    t0 = time.perf_counter()
    x = clustered(args.n, args.dim, args.centres, args.noise, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    src = rng.choice(args.n, args.queries, replace=False)
    q = unit(x[src] + args.query_noise * rng.standard_normal((args.queries, args.dim), dtype=np.float32))
    ids = np.char.add("m-", np.arange(args.n).astype(str)).tolist()
    out["generate_s"] = round(time.perf_counter() - t0, 2)
    out["data_rss_mb"] = round(rss_mb() - rss0, 1)
    print(f"[a] data {x.shape} in {out['generate_s']} s", flush=True)

    # ---- exact
    rss = rss_mb()
    t0 = time.perf_counter()
    exact = EmbeddingIndex.build(x, ids, kind="exact")
    ex = {"build_s": round(time.perf_counter() - t0, 2), "rss_delta_mb": round(rss_mb() - rss, 1)}
    t0 = time.perf_counter()
    _, truth = exact.search_batch(q, args.k)
    dt = time.perf_counter() - t0
    ex["batch_queries_per_s"] = round(len(q) / dt, 1)
    ex["batch_s"] = round(dt, 2)
    lat = latency_ms(lambda v: exact.search_batch(v, args.k), q[: args.exact_latency_queries], warmup=3)
    ex.update(pct(lat), latency_queries=len(lat))
    ex["self_at_1"] = float(np.mean(truth[:, 0] == src))
    ex["index_bytes"], ex["save_s"], ex["load_s"] = saved_bytes(exact, tmp, "exact")
    out["exact"] = ex
    print(f"[a] exact {ex}", flush=True)
    exact = None  # free the flat index before the IVF build

    # ---- IVF
    rss = rss_mb()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    ivf = EmbeddingIndex.build(x, ids, kind="ivf", nlist=args.nlist, nprobe=args.nprobe, seed=args.seed,
                               train_per_list=args.train_per_list)
    iv = {"build_s": round(time.perf_counter() - t0, 2), "build_cpu_s": round(time.process_time() - cpu0, 1),
          "rss_delta_mb": round(rss_mb() - rss, 1),
          "nlist": ivf.nlist, "nprobe": ivf.nprobe, **{f"build_{k}": v for k, v in ivf.info["build"].items()}}
    print(f"[a] ivf built in {iv['build_s']} s", flush=True)
    t0 = time.perf_counter()
    _, got = ivf.search_batch(q, args.k)
    iv["batch_queries_per_s"] = round(len(q) / (time.perf_counter() - t0), 1)
    iv["recall_at_10"] = round(recall_at(truth, got), 4)
    iv["self_at_1"] = float(np.mean(got[:, 0] == src))
    lat = latency_ms(lambda v: ivf.search_batch(v, args.k), q)
    iv.update(pct(lat), latency_queries=len(lat))
    lat_hits = latency_ms(lambda v: ivf.search(v, args.k), q[:200])
    iv["with_hit_rows_p50_ms"] = round(float(np.percentile(lat_hits, 50)), 4)
    sweep = {}
    for p in args.sweep:
        ivf.nprobe = p
        _, g = ivf.search_batch(q, args.k)
        lp = latency_ms(lambda v: ivf.search_batch(v, args.k), q[:300])
        sweep[str(p)] = {"recall_at_10": round(recall_at(truth, g), 4), **pct(lp)}
    ivf.nprobe = args.nprobe
    iv["nprobe_sweep"] = sweep
    iv["index_bytes"], iv["save_s"], iv["load_s"] = saved_bytes(ivf, tmp, "ivf")
    out["ivf"] = iv
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(f"[a] ivf {iv}", flush=True)
    return out


def mp20p(args: argparse.Namespace, tmp: Path) -> dict:
    """Part (b): embed mp20p with a model, build an exact index, time searches."""
    import torch
    import yaml

    from mmmat.latent.model import MultimodalModel
    from mmmat.retrieval import embed_query, embed_records, load_model, search, shard_records

    out: dict = {}
    if args.model:
        model_dir = Path(args.model)
        out["model"] = f"trained: {model_dir}"
    else:
        cfg = yaml.safe_load((ROOT / args.config).read_text())
        torch.manual_seed(args.seed)
        enc = cfg["model"]["init_args"]["encoders"]
        m = MultimodalModel(enc, embed_dim=cfg["model"]["init_args"].get("embed_dim", 256),
                            cutoff=float(cfg["data"].get("cutoff", 5.0)))
        model_dir = m.save_pretrained(tmp / "model")
        out["model"] = f"randomly initialised from {args.config} encoders (seed {args.seed}), CPU"
    model = load_model(model_dir)
    out["torch_threads"] = torch.get_num_threads()
    t0 = time.perf_counter()
    records = shard_records(args.shards)
    out["load_records_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    table = embed_records(model, records, "crystal", batch_size=args.batch_size)
    out["embed_s"] = round(time.perf_counter() - t0, 2)
    out["crystals"] = len(table)
    out["crystals_per_s"] = round(len(table) / out["embed_s"], 1)
    print(f"[b] {len(table)} crystals embedded in {out['embed_s']} s", flush=True)
    vecs = np.stack(table["embedding"].to_numpy())
    from mmmat.retrieval import model_fingerprint

    info = {"model_fingerprint": model_fingerprint(model_dir), "model_path": str(Path(model_dir).resolve()),
            "modality": "crystal"}
    t0 = time.perf_counter()
    index = EmbeddingIndex.build(vecs, table.drop(columns="embedding"), info=info)
    out["build_s"] = round(time.perf_counter() - t0, 3)
    out["kind"] = index.kind
    index.save(tmp / "mp20p_index")
    out["index_bytes"] = (tmp / "mp20p_index" / "index.faiss").stat().st_size
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(vecs), min(1000, len(vecs)), replace=False)
    lat = latency_ms(lambda v: index.search_batch(v, args.k), vecs[pick])
    out["search"] = {**pct(lat), "queries": len(lat)}
    _, rows = index.search_batch(vecs[pick], 1)
    out["search"]["self_at_1"] = float(np.mean(rows[:, 0] == pick))
    # whole queries from CIF text: parse, graph, forward, search
    cifs = [records[i].to_cif() for i in pick[: args.cif_queries]]
    e2e, found = [], 0
    for i, cif in zip(pick[: args.cif_queries], cifs, strict=True):
        t0 = time.perf_counter()
        _, qv = embed_query(model, cif=cif)
        hits = index.search(qv, args.k)
        e2e.append((time.perf_counter() - t0) * 1e3)
        found += hits[0].material_id == records[i].material_id
    out["cif_query"] = {**pct(np.array(e2e[1:] or e2e)), "queries": len(e2e), "self_at_1": found / len(e2e)}
    # what one `mmmat search` call costs inside Python: load index and model, fingerprint, embed, search
    tmp_cif = tmp / "query.cif"
    tmp_cif.write_text(cifs[0])
    t0 = time.perf_counter()
    search(tmp / "mp20p_index", model_dir, cif=tmp_cif, k=args.k)
    out["api_search_call_s"] = round(time.perf_counter() - t0, 3)
    print(f"[b] {out}", flush=True)
    return out


def main() -> None:
    """Run (a) and (b) and write benchmarks/results/retrieval.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--centres", type=int, default=10_000)
    ap.add_argument("--noise", type=float, default=0.05, help="σ per coordinate around a centre")
    ap.add_argument("--query-noise", type=float, default=0.02, help="σ per coordinate of the query perturbation")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--exact-latency-queries", type=int, default=50)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nlist", type=int, default=4096)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--train-per-list", type=int, default=DEFAULT_TRAIN_PER_LIST, help="k-means sample per list")
    ap.add_argument("--sweep", type=int, nargs="*", default=[8, 32], help="other nprobe values to report")
    ap.add_argument("--threads", type=int, default=None, help="FAISS threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", default="shards/mp20p", help="mp20p shard folder for part (b)")
    ap.add_argument("--model", default=None, help="trained model folder for (b) (default: random mp20p model)")
    ap.add_argument("--config", default="configs/pretrain/mp20p.yaml", help="encoders of the random model")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--cif-queries", type=int, default=50)
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--skip-mp20p", action="store_true")
    ap.add_argument("--result", default=None, help="results file (default benchmarks/results/retrieval.json)")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    load_start = [round(v, 2) for v in os.getloadavg()]
    metrics: dict = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmmat-retrieval-") as d:
        tmp = Path(d)
        if not args.skip_synthetic:
            metrics["synthetic_1m"] = synthetic(args, tmp)
        if not args.skip_mp20p:
            if Path(args.shards).is_dir():
                metrics["mp20p"] = mp20p(args, tmp)
            else:
                print(f"[b] skipped: {args.shards} not found (build it with mmmat data build mp20)", flush=True)
    import faiss

    extra = {
        "faiss_version": faiss.__version__,
        "load_average_at_start": load_start,
        "faiss_threads": threads,
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "total_s": round(time.perf_counter() - t_all, 1),
        "notes": "latency = one query at a time through EmbeddingIndex.search_batch (normalisation included), "
        "k=10, after a warm-up; recall@10 against exact IndexFlatIP search of the same vectors",
    }
    write_result("retrieval", metrics, extra, args.result)


if __name__ == "__main__":
    main()
