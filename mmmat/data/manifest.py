"""``manifest.json`` of a shard folder: its file name, version, and reading and writing it.

The shard builder (``mmmat data build``) writes the manifest; the data module, ``mmmat data info`` and the
benchmarks read it. Keys: ``source``, ``property_columns``, ``splits`` (rows, samples, failures, coverage and
shards per split), ``failures``, ``options``, ``build`` and ``versions``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: File name of the manifest inside a shard folder.
MANIFEST = "manifest.json"
#: Version written into new manifests.
MANIFEST_VERSION = 1


def load_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` of a shard folder (clear error when missing)."""
    p = Path(shard_dir) / MANIFEST
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: is {shard_dir} a folder written by `mmmat data build`?")
    return json.loads(p.read_text())


def write_manifest(shard_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` as ``manifest.json`` of ``shard_dir`` (atomically: a reader never sees half a file)."""
    p = Path(shard_dir) / MANIFEST
    tmp = p.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, p)
    return p
