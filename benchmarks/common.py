"""Shared helpers for benchmarks: the card, the date, the command, and the results file."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def card() -> str:
    """A description of the machine the benchmark ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{os.cpu_count()} CPU cores ({cpu})"
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            desc = f"{n}x {torch.cuda.get_device_name(0)}, " + desc
    except ImportError:
        pass
    return desc


def command() -> str:
    """The command line that ran this benchmark."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def write_result(name: str, metrics: dict, extra: dict | None = None, out: str | Path | None = None) -> Path:
    """Write ``{"card", "date", "command", "metrics", ...}`` to ``benchmarks/results/<name>.json``."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "card": card(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command(),
        "metrics": metrics,
        **(extra or {}),
    }
    path.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    return path
