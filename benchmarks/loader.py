"""Loader throughput: samples/s from shards into MultimodalBatch (periodic graphs included).

    python benchmarks/loader.py --shards shards/mp20p --workers 2

Paths measured (batch 256, cutoff 5 Å, every modality collated and tokenised):
- ``stream``: webdataset shards -> decode -> collate + periodic graph in the DataLoader workers;
- ``memory``: records decoded once into RAM -> collate + periodic graph in the workers;
- ``resident``: the split packed once as tensors on the device (GPU when present); each batch is a few
  gathers plus the periodic graph on that device (no workers, no copies);
- ``memory_gpu_graph`` (GPU only): collate without graph in the workers, periodic graph built on the GPU
  in the training process;
- ``schnet_step_*`` (GPU only, ``--schnet``): what one GPU consumes: PyG's SchNet (6 interactions, 128
  channels) forward + backward + Adam step, on one fixed batch (``only``: the model's own rate) and fed by the
  resident and the worker paths.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from data_pipelines.build import load_manifest  # noqa: E402
from mmmat.data.batch import Collator  # noqa: E402
from mmmat.data.graph import radius_graph_pbc  # noqa: E402
from mmmat.data.loader import load_records, memory_loader, shard_loader, split_shards  # noqa: E402
from mmmat.data.resident import ResidentData, ResidentLoader  # noqa: E402


def timed(it, n_batches: int, warmup: int, step=None) -> tuple[float, int]:
    """Samples/s over ``n_batches`` after ``warmup`` batches (``step`` consumes each batch)."""
    seen, t0 = 0, None
    for k, batch in enumerate(it):
        if step is not None:
            step(batch)
        if k == warmup - 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        elif k >= warmup:
            seen += len(batch)
        if k + 1 >= warmup + n_batches:
            break
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return seen / dt, seen


def endless(make):
    """Iterate a fresh loader again whenever one is exhausted."""
    while True:
        yield from make()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default="shards/mp20p")
    ap.add_argument("--split", default="train")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cutoff", type=float, default=5.0)
    ap.add_argument("--schnet", action="store_true")
    ap.add_argument("--result", default=None)
    args = ap.parse_args()

    manifest = load_manifest(args.shards)
    props = manifest["property_columns"]
    urls = split_shards(args.shards, args.split)
    n = manifest["splits"][args.split]["samples"]
    bs, nw = args.batch_size, args.workers
    metrics: dict[str, float] = {"workers": nw, "batch_size": bs, "cutoff": args.cutoff}

    coll = Collator(property_names=props, cutoff=args.cutoff, random_text=True)

    def stream():
        return shard_loader(urls, coll, bs, n, num_workers=nw, shuffle_buffer=1000)

    rate, seen = timed(endless(stream), args.batches, args.warmup)
    metrics["samples_per_s"] = round(rate, 1)
    metrics["stream_samples_timed"] = seen

    t0 = time.perf_counter()
    records = load_records(urls)
    metrics["memory_load_seconds"] = round(time.perf_counter() - t0, 2)

    def mem(collator=coll):
        return memory_loader(records, collator, bs, num_workers=nw, shuffle=True)

    rate, _ = timed(endless(mem), args.batches, args.warmup)
    metrics["memory_samples_per_s"] = round(rate, 1)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    resident = ResidentData(records, props, cutoff=args.cutoff, device=dev)
    metrics["resident_pack_seconds"] = round(time.perf_counter() - t0, 2)
    metrics["resident_mbytes"] = round(resident.nbytes() / 2**20, 1)
    rate, _ = timed(endless(lambda: ResidentLoader(resident, bs, seed=0)), args.batches, args.warmup)
    metrics["resident_samples_per_s"] = round(rate, 1)

    if torch.cuda.is_available():
        nograph = Collator(property_names=props, cutoff=args.cutoff, build_graph=False, random_text=True)

        def gpu_graph(batch):
            b = batch.to(dev, non_blocking=True)
            c = b.crystal
            c.edge_index, c.cell_offset, c.edge_dist = radius_graph_pbc(c.pos, c.lattice, c.batch, args.cutoff)
            return b

        rate, _ = timed(endless(lambda: mem(nograph)), args.batches, args.warmup, step=gpu_graph)
        metrics["memory_gpu_graph_samples_per_s"] = round(rate, 1)

        if args.schnet:
            from torch_geometric.nn.models import SchNet

            class PeriodicGraph:
                """Hands SchNet the periodic graph of the current batch."""

                edge_index = edge_dist = None

                def __call__(self, pos, batch):
                    return self.edge_index, self.edge_dist

            graph = PeriodicGraph()
            model = SchNet(
                hidden_channels=128, num_filters=128, num_interactions=6, cutoff=args.cutoff,
                interaction_graph=graph,
            ).to(dev)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            target = props.index("formation_energy_per_atom") if "formation_energy_per_atom" in props else 0

            def step(b):
                c = b.crystal
                graph.edge_index, graph.edge_dist = c.edge_index, c.edge_dist
                out = model(c.z, c.pos, c.batch).squeeze(-1)
                y = torch.nan_to_num(b.properties[:, target])
                loss = torch.nn.functional.mse_loss(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            fixed = next(iter(ResidentLoader(resident, bs, seed=0)))
            rate, _ = timed(endless(lambda: [fixed] * 50), args.batches, args.warmup, step=step)
            metrics["schnet_step_only_samples_per_s"] = round(rate, 1)
            rate, _ = timed(endless(lambda: ResidentLoader(resident, bs, seed=0)), args.batches, args.warmup, step=step)
            metrics["schnet_step_resident_samples_per_s"] = round(rate, 1)
            rate, _ = timed(endless(lambda: mem(nograph)), args.batches, args.warmup, step=lambda b: step(gpu_graph(b)))
            metrics["schnet_step_memory_workers_samples_per_s"] = round(rate, 1)
            metrics["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    write_result("loader", metrics, {"shards": str(args.shards), "split": args.split}, args.result)


if __name__ == "__main__":
    main()
