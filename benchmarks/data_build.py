"""Build mp20p shards from ../shared/data/mp_20 and record the build's speed, counts and failures.

    python benchmarks/data_build.py --root ../shared/data/mp_20 --out shards/mp20p --workers 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from data_pipelines.base import BuildOptions, get_source  # noqa: E402
from data_pipelines.build import build_shards  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="mp20")
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mp_20"))
    ap.add_argument("--out", default="shards/mp20p")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--fresh", action="store_true", help="delete --out first (a timed build from scratch)")
    ap.add_argument("--result", default=None, help="results file (default benchmarks/results/data_build.json)")
    args = ap.parse_args()
    if not Path(args.root).exists():
        sys.exit(f"{args.root} not found: this benchmark needs the raw data (../shared/data/mp_20)")
    if args.fresh and Path(args.out).exists():
        shutil.rmtree(args.out)
    src = get_source(args.source)(args.root, limit=args.limit)
    m = build_shards(src, args.out, workers=args.workers, options=BuildOptions(), command=" ".join(sys.argv))
    metrics = {
        "structures_per_s": m["build"]["structures_per_s"],
        "wall_seconds": m["build"]["wall_seconds"],
        "workers": args.workers,
        "failures": m["total_failures"],
        "samples": m["total_samples"],
        "shards_resumed": m["build"]["shards_resumed"],
    }
    for split, s in m["splits"].items():
        metrics[f"{split}_samples"] = s["samples"]
        for mod, n in s["coverage"].items():
            metrics[f"{split}_{mod}"] = n
    extra = {
        "failure_reasons": m["failure_reasons"],
        "joins": {k: v for k, v in m["source_info"].items() if k in ("recipes", "literature")},
        "bytes": sum(sh["bytes"] for s in m["splits"].values() for sh in s["shards"]),
    }
    write_result("data_build", metrics, extra, args.result)


if __name__ == "__main__":
    main()
