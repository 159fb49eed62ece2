"""Speed of the pretraining step, measured the way the issue asks, in one call on one host.

    python benchmarks/pretrain_speed.py --shards shards/mp20p --result benchmarks/results/pretrain_speed.json
    python benchmarks/pretrain_speed.py ... --ddp --ddp-result benchmarks/results/pretrain_2gpu_speed.json

1. The shipped config's step (``configs/pretrain/mp20p.yaml`` through ``train.py fit``) at batch 256 and 1024,
   and at batch 256 with every engine optimisation off (``--plain``): crystals/s from the wall time of
   ``--steps`` steps after ``--warmup`` (synchronised at the ends of the window only), the GPU busy share
   (kernel and copy time per step under :mod:`torch.profiler`, divided by the wall time per step without
   it), host synchronisations per step (``torch.cuda.set_sync_debug_mode``), peak GPU memory. Validation
   is off; everything else is the config's.
2. The crystal encoder alone at stock-SchNet size (6 interactions, 128 channels, no diffraction branch) and
   torch-geometric's ``SchNet`` (6 interactions, 128 channels and filters, 50 Gaussians), both on the same
   periodic graphs (PyG's SchNet takes them through ``interaction_graph``), forward + backward + AdamW
   under bf16 autocast, batch 256, batches assembled beforehand (model time only).
3. With ``--ddp`` (two GPUs): the DDP config's step at batch 256 per GPU, and ``ddp_speedup`` = its
   crystals/s over the one-GPU figure of part 1 on the same host.
4. With ``--cuda-graphs``: the same config with ``engine.cuda_graphs`` on (the whole step padded to static
   shapes, compiled as one graph and replayed as CUDA graphs), at every batch size of part 1, as runs
   ``b<N>_graphs`` and metrics ``*_cuda_graphs``; ``--graphs-only`` skips the runs of part 1 (their figures
   then come from ``--merge``). ``--parallel`` starts the one-GPU runs of one part together, one per GPU of
   the host (each process sees one GPU; the host's CPU cores are shared), to fit one call's time.
5. With ``--ddp-graphs`` (with ``--ddp``): the DDP step again with every rank running the captured step
   (``engine.cuda_graphs`` and ``compile_pattern_cnn: fp32``, as the one-GPU config), run ``ddp_b256_graphs``,
   metrics ``*_cuda_graphs`` beside the plain DDP step's.
6. With ``--link`` (with ``--ddp``): how fast the two GPUs exchange the model's gradients: one NCCL all-reduce
   of a buffer the size of the DDP config's encoder parameters, in float32 and in bfloat16 (milliseconds, and bus
   bandwidth as nccl-tests counts it), plus ``nvidia-smi topo -m``; the floor under the DDP step when the
   all-reduce is not hidden behind the backward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from common import write_result  # noqa: E402


def step_speed(args: argparse.Namespace, config: str, batch: int, tag: str, extra: list[str]) -> dict:
    """Run ``train.py fit`` with a step profiler and return its numbers (rank 0)."""
    return _finish(args, tag, *_start(args, config, batch, tag, extra))


def step_speeds(args: argparse.Namespace, jobs: list[tuple[str, int, str, list[str]]],
                soft: bool = False) -> dict[str, dict]:
    """Several one-GPU runs ``(config, batch, tag, extra)``: together, one per GPU, with ``--parallel``.

    With ``soft``, a failed run gives ``{"failed": <end of its log>}`` instead of ending the benchmark.
    """
    gpus = torch.cuda.device_count() if args.parallel else 0
    width = gpus if gpus >= 2 else 1
    out: dict[str, dict] = {}
    for start in range(0, len(jobs), width):
        running = []
        for gpu, (config, batch, tag, extra) in enumerate(jobs[start : start + width]):
            env = {"CUDA_VISIBLE_DEVICES": str(gpu)} if width > 1 else None
            running.append((tag, _start(args, config, batch, tag, extra, env)))
        for tag, started in running:
            try:
                out[tag] = _finish(args, tag, *started)
            except SystemExit as err:
                if not soft:
                    raise
                out[tag] = {"failed": str(err), "log_tail": (started[1] / "train.log").read_text()[-3000:]}
    return out


def _start(args: argparse.Namespace, config: str, batch: int, tag: str, extra: list[str],
           env: dict | None = None) -> tuple:
    """Start ``train.py fit`` with a step profiler; returns (process, work dir, start time)."""
    work = Path(args.workdir) / tag
    work.mkdir(parents=True, exist_ok=True)
    start = args.warmup + args.steps
    import yaml

    # the config's callbacks stay (SigtermCheck under DDP), except the time budget and the throughput meter,
    # which synchronise on their own; the step profiler measures
    cfg = yaml.safe_load(Path(config).read_text())
    callbacks = [c for c in (cfg.get("trainer") or {}).get("callbacks") or []
                 if not str(c.get("class_path", "")).endswith((".TimeBudget", ".Throughput"))]
    callbacks.append({"class_path": "mmmat.tasks.callbacks.StepProfiler",
                      "init_args": {"out_dir": f"{work}/prof", "start": start, "steps": args.steps,
                                   "sync_steps": args.sync_steps}})
    overlay = work / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {
        "max_steps": 100000, "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_checkpointing": False,
        "callbacks": callbacks}}))
    tok = work if env else args.workdir
    cmd = [
        sys.executable, str(ROOT / "train.py"), "fit", "--config", config, "--config", str(overlay),
        # runs side by side build their own (identical) tokenizers rather than race on one folder
        f"--data.shards={args.shards}", f"--data.batch_size={batch}", f"--data.tokenizer={tok}/tokenizer",
        f"--trainer.default_root_dir={work}", f"--trainer.logger.init_args.save_dir={work}",
        f"--model.init_args.save_dir={work}/model", *extra,
    ]
    t0 = time.perf_counter()
    log = open(work / "train.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return proc, work, t0


def _finish(args: argparse.Namespace, tag: str, proc: subprocess.Popen, work: Path, t0: float) -> dict:
    """Wait for a run started by :func:`_start` and return its numbers."""
    rc = proc.wait()
    if rc != 0:
        print((work / "train.log").read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"{tag}: train.py failed ({rc})")
    out = json.loads((work / "prof" / "profile_rank0.json").read_text())
    out["run_seconds"] = round(time.perf_counter() - t0, 1)
    (Path(args.workdir) / f"{tag}_profile.txt").write_text((work / "prof" / "profile_rank0.txt").read_text())
    print(tag, json.dumps(out), flush=True)
    return out


#: ``engine`` of the cuda_graphs runs: the shipped config's optimisations plus the static, captured step.
GRAPHS_ENGINE = "precompute_patterns: true, sync_free: true, fused_adamw: true, compile: true, cuda_graphs: true"
#: the same with the pattern CNN compiled into the graphs too (``--graphs-cnn``)
GRAPHS_CNN_ENGINE = GRAPHS_ENGINE + ", compile_pattern_cnn: true"
#: the DDP step with each rank's step captured, the pattern CNN inside in float32 (what mp20p.yaml runs on one GPU)
DDP_GRAPHS_ENGINE = ("precompute_patterns: true, sync_free: true, fused_adamw: true, compile: false, "
                     "cuda_graphs: true, compile_pattern_cnn: fp32")


def _link_worker(rank: int, numel: int, rounds: int, out: str) -> None:
    """One rank of :func:`link_speed`: all-reduce ``numel`` elements ``rounds`` times, fp32 then bf16."""
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{out}.init", rank=rank, world_size=2)
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        buf = torch.ones(numel, dtype=dtype, device="cuda")
        for _ in range(3):
            dist.all_reduce(buf)
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(rounds):
            dist.all_reduce(buf)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / rounds * 1e3
        size = numel * buf.element_size()
        # bus bandwidth of a ring all-reduce over n ranks: 2 (n - 1) / n x size / time
        res[str(dtype).split(".")[-1]] = {"ms": round(ms, 3), "bus_gb_per_s": round(size / ms / 1e6, 2)}
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def link_speed(args: argparse.Namespace) -> dict:
    """All-reduce time of the DDP config's gradient between two GPUs of this host (fp32 and bf16)."""
    import torch.multiprocessing as mp
    import yaml

    cfg = yaml.safe_load(Path(args.ddp_config).read_text())
    numel = _config_numel(cfg)
    out = str(Path(args.workdir) / "link.json")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    mp.spawn(_link_worker, args=(numel, 20, out), nprocs=2, join=True)
    res = json.loads(Path(out).read_text())
    topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout
    return {"gradient_mb_fp32": round(numel * 4 / 1e6, 1), "allreduce_gradient_ms_fp32": res["float32"]["ms"],
            "allreduce_gradient_ms_bf16": res["bfloat16"]["ms"],
            "allreduce_bus_gb_per_s_fp32": res["float32"]["bus_gb_per_s"], "nvidia_smi_topo": topo}


def _config_numel(cfg: dict) -> int:
    """Parameters of the encoders a pretraining config names (what DDP all-reduces, projections aside)."""
    import importlib

    total = 0
    for spec in cfg["model"]["init_args"]["encoders"].values():
        module, name = spec["class_path"].rsplit(".", 1)
        encoder = getattr(importlib.import_module(module), name)(**(spec.get("init_args") or {})).build()
        total += sum(p.numel() for p in encoder.parameters())
    return total


def _batches(args: argparse.Namespace, n: int, batch: int, cutoff: float) -> list:
    from mmmat.tasks.datamodule import MultimodalDataModule

    dm = MultimodalDataModule(args.shards, batch_size=batch, mode="resident", cutoff=cutoff, num_workers=0,
                              precompute_graph=True)
    data = dm.resident("train", device=DEVICE)
    g = torch.Generator().manual_seed(0)
    return [data.batch(torch.randperm(len(data), generator=g)[:batch]) for _ in range(n)]


def encoder_speed(args: argparse.Namespace) -> dict:
    """The crystal encoder alone against PyG's SchNet, same graphs, same batch, same optimiser."""
    from torch_geometric.nn.models import SchNet

    from mmmat.encoders import create_encoder

    batches = _batches(args, 16, args.encoder_batch, 6.0)

    def sync() -> None:
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    current: dict = {}

    def graph(pos: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = current["crystal"]
        return c.edge_index, c.edge_dist_live

    def run(model: torch.nn.Module, forward) -> float:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE == "cuda" or None)

        def step(b) -> None:
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
                loss = forward(b).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for b in batches[:8]:
            step(b)
        sync()
        t0 = time.perf_counter()
        n = 0
        for _ in range(args.encoder_rounds):
            for b in batches:
                step(b)
                n += len(b)
        sync()
        return n / (time.perf_counter() - t0)

    torch.manual_seed(0)
    ours = create_encoder("crystal/schnet", hidden=128, num_interactions=6, cutoff=6.0, num_rbf=50,
                          global_features=False).to(DEVICE)
    ours_cps = run(ours, lambda b: ours(b.crystal))

    schnet = SchNet(hidden_channels=128, num_filters=128, num_interactions=6, num_gaussians=50, cutoff=6.0,
                    interaction_graph=graph).to(DEVICE)

    def fwd_schnet(b):
        c = b.crystal
        current["crystal"] = c
        # distances from positions, lattice and offsets (differentiable), as the encoder computes them
        lat = c.lattice[c.batch[c.edge_index[0]]]
        vec = c.pos[c.edge_index[0]] - c.pos[c.edge_index[1]] + torch.bmm(
            c.cell_offset.to(lat.dtype).unsqueeze(1), lat).squeeze(1)
        c.edge_dist_live = vec.norm(dim=-1)
        return schnet(c.z, c.pos, c.batch)

    schnet_cps = run(schnet, fwd_schnet)
    edges = sum(b.crystal.edge_index.shape[1] for b in batches) / len(batches)
    return {"crystal_encoder_crystals_per_s_b256": round(ours_cps, 1),
            "schnet_crystals_per_s_b256": round(schnet_cps, 1), "encoder_vs_schnet": round(ours_cps / schnet_cps, 3),
            "mean_edges_per_batch_b256": round(edges)}


def main() -> None:
    """Measure and write the results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--config", default=str(ROOT / "configs/pretrain/mp20p.yaml"))
    ap.add_argument("--ddp-config", default=str(ROOT / "configs/pretrain/mp20p_ddp.yaml"))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--sync-steps", type=int, default=60,
                    help="steps under the synchronisation check (long enough to hold an epoch's end)")
    ap.add_argument("--encoder-rounds", type=int, default=5)
    ap.add_argument("--encoder-batch", type=int, default=256)
    ap.add_argument("--plain", action="store_true", help="also the step with every engine optimisation off")
    ap.add_argument("--no-encoder", action="store_true", help="skip the encoder-alone comparison")
    ap.add_argument("--merge", help="start from the metrics and runs of this earlier result file")
    ap.add_argument("--ddp-only", action="store_true",
                    help="only the DDP step, against the one-GPU batch-256 run of --merge")
    ap.add_argument("--ddp", action="store_true", help="also the two-GPU DDP step and ddp_speedup")
    ap.add_argument("--ddp-graphs", action="store_true",
                    help="with --ddp: also the DDP step with each rank's step captured (engine.cuda_graphs)")
    ap.add_argument("--link", action="store_true",
                    help="with --ddp: also the all-reduce time of the gradient between the two GPUs")
    ap.add_argument("--cuda-graphs", action="store_true", help="also the step with engine.cuda_graphs on")
    ap.add_argument("--graphs-only", action="store_true", help="only the cuda_graphs runs (part 1 from --merge)")
    ap.add_argument("--graphs-cnn", action="store_true",
                    help="also the cuda_graphs step with the pattern CNN compiled (runs b<N>_graphs_cnn)")
    ap.add_argument("--parallel", action="store_true", help="one-GPU runs of one part together, one per GPU")
    ap.add_argument("--extra", action="append", default=[], help="a train.py override for every run (repeat)")
    ap.add_argument("--workdir", default="/tmp/pretrain_speed")
    ap.add_argument("--result", default=str(ROOT / "benchmarks/results/pretrain_speed.json"))
    ap.add_argument("--ddp-result", default=str(ROOT / "benchmarks/results/pretrain_2gpu_speed.json"))
    args = ap.parse_args()

    metrics: dict = {}
    runs: dict = {}
    if args.merge and Path(args.merge).exists():
        old = json.loads(Path(args.merge).read_text())
        metrics, runs = old["metrics"], old.get("runs", {})
    parts = [] if args.ddp_only or args.graphs_only else [("", [])]
    if args.cuda_graphs and not args.ddp_only:
        parts.append(("_graphs", [f"--model.init_args.engine={{{GRAPHS_ENGINE}}}"]))
    if args.graphs_cnn and not args.ddp_only:
        parts.append(("_graphs_cnn", [f"--model.init_args.engine={{{GRAPHS_CNN_ENGINE}}}"]))
    for suffix, extra in parts:
        jobs = [(args.config, b, f"b{b}{suffix}", [*args.extra, *extra]) for b in args.batch_sizes]
        done = step_speeds(args, jobs, soft=bool(suffix))  # a failed cuda_graphs run is recorded, not fatal
        for b in args.batch_sizes:
            r = runs[f"b{b}{suffix}"] = done[f"b{b}{suffix}"]
            if "failed" in r:
                continue
            key = suffix.replace("_graphs", "_cuda_graphs", 1)  # "", "_cuda_graphs", "_cuda_graphs_cnn"
            metrics[f"crystals_per_s_b{b}{key}"] = round(b / r["wall_ms"] * 1e3, 1)
            metrics[f"gpu_busy_share_b{b}{key}"] = round(r["busy_share"], 3)
            metrics[f"host_syncs_per_step_b{b}{key}"] = r.get("syncs_per_step")
            metrics[f"host_syncs_per_steady_step_b{b}{key}"] = r.get("syncs_per_steady_step")
            metrics[f"peak_memory_gb_b{b}{key}"] = round(r.get("peak_memory_gb", float("nan")), 2)
            if "peak_memory_reserved_gb" in r:
                metrics[f"peak_memory_reserved_gb_b{b}{key}"] = round(r["peak_memory_reserved_gb"], 2)
            metrics[f"loss_finite_b{b}{key}"] = r.get("loss_finite")
        write_result("pretrain_speed", metrics, {"runs": runs}, out=args.result)
    if f"b{args.batch_sizes[0]}" in runs:
        metrics["host_syncs_per_step"] = runs[f"b{args.batch_sizes[0]}"].get("syncs_per_step")
    if args.plain and not args.ddp_only:
        off = "--model.init_args.engine={precompute_patterns: false, sync_free: false, fused_adamw: false}"
        b0 = args.batch_sizes[0]
        r = runs["b256_plain"] = step_speed(args, args.config, b0, "b256_plain",
                                             [*args.extra, off, "--data.precompute_graph=false"])
        metrics["crystals_per_s_b256_engine_off"] = round(b0 / r["wall_ms"] * 1e3, 1)
        metrics["gpu_busy_share_b256_engine_off"] = round(r["busy_share"], 3)
        metrics["host_syncs_per_step_engine_off"] = r.get("syncs_per_step")
    if not args.no_encoder and not args.ddp_only:
        metrics.update(encoder_speed(args))
    if not args.ddp_only:
        write_result("pretrain_speed", metrics, {"runs": runs}, out=args.result)

    if args.ddp and torch.cuda.device_count() >= 2:
        r = step_speed(args, args.ddp_config, 256, "ddp_b256", args.extra)
        one = runs["b256"]
        d = {
            "world_size": 2,
            "crystals_per_s": round(2 * 256 / r["wall_ms"] * 1e3, 1),
            "crystals_per_s_1gpu_same_host": round(256 / one["wall_ms"] * 1e3, 1),
            "ddp_speedup": round(one["wall_ms"] / r["wall_ms"] * 2, 3),
            "one_gpu_run_same_call": not (args.ddp_only or args.graphs_only),
            "gpu_busy_share_rank0": round(r["busy_share"], 3),
            "host_syncs_per_step_rank0": r.get("syncs_per_step"),
        }
        ddp_runs = {"ddp_b256": r, "b256": one}
        if args.link:
            try:
                link = link_speed(args)
                ddp_runs["link_topology"] = link.pop("nvidia_smi_topo")
                d.update(link)
            except Exception as err:  # the step figures stand without it
                ddp_runs["link_failed"] = repr(err)
        if args.ddp_graphs:
            engine = f"--model.init_args.engine={{{DDP_GRAPHS_ENGINE}}}"
            g = ddp_runs["ddp_b256_graphs"] = step_speed(args, args.ddp_config, 256, "ddp_b256_graphs",
                                                         [*args.extra, engine])
            d.update({
                "crystals_per_s_cuda_graphs": round(2 * 256 / g["wall_ms"] * 1e3, 1),
                "ddp_speedup_cuda_graphs": round(one["wall_ms"] / g["wall_ms"] * 2, 3),
                "gpu_busy_share_rank0_cuda_graphs": round(g["busy_share"], 3),
                "host_syncs_per_step_rank0_cuda_graphs": g.get("syncs_per_step"),
                "host_syncs_per_steady_step_rank0_cuda_graphs": g.get("syncs_per_steady_step"),
                "loss_finite_cuda_graphs": g.get("loss_finite"),
            })
        write_result("pretrain_2gpu_speed", d, {"runs": ddp_runs}, out=args.ddp_result)


if __name__ == "__main__":
    main()
