"""Which part of the compiled powder-pattern CNN goes non-finite under bf16 autocast (CUDA).

    python benchmarks/cnn_compile_probe.py eager net net_maxpool stem head [--out probe.json]

XRDCNNEncoder(out_dim=256) on 256 synthetic profiles (30 Gaussian lines each, every 10th row zero), 12 steps of
forward, backward and fused AdamW under bf16 autocast, with torch.compile on one part per variant: ``all``
(preprocessing and network), ``pre``, ``net``, ``net_maxpool`` (the network with the stem's pooling as
nn.MaxPool1d), ``stem``, ``stages``, ``head``; ``eager`` compiles nothing. One JSON line per variant
(losses, finiteness of the output and the gradients, the first non-finite step). Results:
benchmarks/results/pretrain_cnn_nan_probe.json.
"""
import json
import sys
import time

import torch

from mmmat.encoders.spectrum import XRDCNNEncoder

dev = "cuda"
torch.manual_seed(0)
B, L = 256, 1701
x = torch.linspace(0, 1, L, device=dev)
centres = torch.rand(B, 30, 1, device=dev)
heights = torch.rand(B, 30, 1, device=dev) ** 2
prof = (heights * torch.exp(-((x - centres) / 0.002) ** 2)).sum(1) + 0.02 * torch.rand(B, L, device=dev)
prof[::10] = 0.0  # absent patterns are zero rows
prof = prof / prof.amax(1, keepdim=True).clamp_min(1e-12)


def net_only(enc, h):
    pos = enc.pos.to(h.dtype)
    h = h.unsqueeze(1)
    import torch.nn.functional as F
    h = torch.cat([h, pos.expand(h.shape[0], -1, -1)], dim=1)
    h = enc.stem(h)
    for stage, proj in zip(enc.stages, enc.pos_proj):
        h = h + proj(F.adaptive_avg_pool1d(pos, h.shape[-1]).to(h.dtype))
        h = stage(h)
    pooled = torch.cat([h.mean(dim=-1), h.amax(dim=-1)], dim=1)
    return enc.head(pooled)


def run(variant, steps=12):
    torch.manual_seed(1)
    enc = XRDCNNEncoder(out_dim=256).to(dev)
    opt = torch.optim.AdamW(enc.parameters(), lr=2e-3, fused=True)
    pre = enc.preprocess
    net = lambda h: net_only(enc, h)  # noqa: E731
    if variant in ("all", "pre"):
        pre = torch.compile(enc.preprocess)
    if variant in ("all", "net"):
        net = torch.compile(net)
    if variant == "stem":
        enc.stem = torch.compile(enc.stem)
    if variant == "stages":
        enc.stages = torch.nn.ModuleList([torch.compile(s) for s in enc.stages])
    if variant == "net_maxpool":  # the stem's pooling as nn.MaxPool1d (what the CNN had before)
        enc.stem[3] = torch.nn.MaxPool1d(3, stride=2, padding=1)
        net = torch.compile(net)
    if variant == "head":
        enc.head = torch.compile(enc.head)
    out = {"variant": variant, "steps": []}
    t0 = time.time()
    for _ in range(steps):
        with torch.autocast(dev, dtype=torch.bfloat16):
            h = pre(prof)
            y = net(h)
            loss = (y.float() @ y.float().T / 16).logsumexp(1).mean()
        loss.backward()
        gfin = all(bool(torch.isfinite(p.grad).all()) for p in enc.parameters() if p.grad is not None)
        out["steps"].append({"loss": float(loss), "pre_finite": bool(torch.isfinite(h).all()),
                             "out_finite": bool(torch.isfinite(y).all()), "grads_finite": gfin,
                             "pre_max": float(h.float().abs().max())})
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["seconds"] = round(time.time() - t0, 1)
    first_bad = next((i for i, s in enumerate(out["steps"]) if not (s["out_finite"] and s["grads_finite"])), None)
    out["first_nonfinite_step"] = first_bad
    out["steps"] = out["steps"][:3] + out["steps"][-1:]
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    out = None
    if "--out" in args:
        i = args.index("--out")
        out, args = args[i + 1], args[:i] + args[i + 2:]
    res = [run(v) for v in (args or ["eager", "all", "pre", "net", "net_maxpool", "stem", "stages", "head"])]
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
