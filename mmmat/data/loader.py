"""Reading shards: a streaming webdataset pipeline for scale, and an in-memory path for small sets.

Streaming (:func:`shard_loader`): shard list (local paths or any URL webdataset understands, brace
expansion included) -> deterministic shard shuffle per epoch -> split_by_node -> split_by_worker -> tar
reading and decoding that never throw (bad samples are logged and counted) -> sample shuffle buffer ->
:class:`~mmmat.data.batch.Collator`. Every worker of every rank yields exactly ``batches_per_worker``
batches per epoch (the shard stream repeats with a new shuffle when it runs out), so ranks never wait on
each other at the end of an epoch.

In memory (:func:`load_records` + :class:`RecordDataset`): decode every shard once and serve records from
RAM through a plain ``DataLoader`` with a ``DistributedSampler``; MP-20-sized sets fit easily.
"""

from __future__ import annotations

import glob
import logging
import math
import multiprocessing as mp
import os
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mmmat.data.batch import Collator
from mmmat.data.schema import MaterialRecord

log = logging.getLogger(__name__)

_SKIPPED = 0  # bad samples skipped in this process


def limit_threads(n: int = 1) -> None:
    """Limit torch and BLAS/OpenMP thread pools of this process (one per worker process avoids oversubscription)."""
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        pass


def _worker_init(worker_id: int) -> None:
    limit_threads(1)


def skipped_count() -> int:
    """Bad samples skipped so far by this process."""
    return _SKIPPED


def count_and_warn(exc: Exception) -> bool:
    """Webdataset handler: log the error, count it, and keep going."""
    global _SKIPPED
    _SKIPPED += 1
    log.warning("skipping bad sample (%d so far in pid %d): %s", _SKIPPED, os.getpid(), str(exc)[:300])
    return True


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Expand a shard spec into a sorted list of shard URLs.

    Accepts a folder (every ``*.tar`` under it), a glob, a brace pattern (``data-{000..009}.tar``), an
    ``http(s)://``/``pipe:`` URL, or a list of any of these.
    """
    import braceexpand

    if isinstance(spec, str | Path):
        spec = [spec]
    out: list[str] = []
    for s in spec:
        s = str(s)
        if "://" in s or s.startswith("pipe:"):
            out.extend(braceexpand.braceexpand(s))
        elif os.path.isdir(s):
            out.extend(sorted(str(p) for p in Path(s).rglob("*.tar")))
        elif any(c in s for c in "*?["):
            out.extend(sorted(glob.glob(s)))
        else:
            out.extend(braceexpand.braceexpand(s))
    if not out:
        raise FileNotFoundError(f"no shards found for {spec!r}")
    return out


_TAR_IN_URL = re.compile(r"([^\s'\"]+\.tar)(?=$|[\s'\"?#])")


def shard_name(url: str) -> tuple[str, str]:
    """The ``(split/name.tar, name.tar)`` keys of the tar a shard URL names.

    Works for local paths, ``http(s)://``/``s3://`` URLs and ``pipe:`` commands alike (the last ``*.tar`` token
    of the command is taken: ``pipe:aws s3 cp s3://bucket/mp/train/shard-000003.tar -`` gives
    ``("train/shard-000003.tar", "shard-000003.tar")``).
    """
    found = _TAR_IN_URL.findall(url)
    if not found:
        raise ValueError(f"shard URL {url!r} names no *.tar file")
    parts = found[-1].rstrip("/").split("/")
    return "/".join(parts[-2:]), parts[-1]


def read_sizes(path: str | Path) -> dict[str, int]:
    """Samples per shard from a sizes file.

    Either ``{"shard-000000.tar": 256, ...}`` (open_clip's ``sizes.json``) or a ``manifest.json`` written by
    ``mmmat data build`` (keys ``<split>/shard-NNNNNN.tar``).
    """
    import json

    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "splits" in data and "manifest_version" in data:
        return {s["path"]: int(s["samples"]) for sp in data["splits"].values() for s in sp.get("shards", [])}
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise ValueError(f"{path}: a sizes file maps shard file names to sample counts ({{name: int}})")
    return {str(k): int(v) for k, v in data.items()}


def count_samples(urls: Sequence[str], sizes: dict[str, int]) -> int:
    """Samples in ``urls`` according to ``sizes`` (see :func:`read_sizes`).

    Each URL is looked up by ``split/name.tar``, then by ``name.tar``; a URL missing from ``sizes`` is an error
    naming it.
    """
    total = 0
    for u in urls:
        keys = shard_name(u)
        hit = next((k for k in keys if k in sizes), None)
        if hit is None:
            raise KeyError(f"shard {u!r} is not in the sizes file (looked up {list(dict.fromkeys(keys))})")
        total += sizes[hit]
    return total


def split_shards(shard_dir: str | Path, split: str) -> list[str]:
    """Shard paths of one split of a folder written by ``mmmat data build`` (:func:`mmmat.io.find_shards`).

    Raises:
        mmmat.io.ShardsNotFoundError: (a ``FileNotFoundError``) the split holds no shards.

    """
    from mmmat.io import find_shards

    return find_shards(shard_dir, [split])[split]


def decode(sample: dict[str, Any]) -> MaterialRecord:
    """Decode one raw webdataset sample into a record (raises on a bad sample; the handler counts it)."""
    rec = MaterialRecord.from_sample(sample)
    if rec.num_atoms == 0:
        raise ValueError(f"sample {sample.get('__key__')!r}: empty structure")
    return rec


class SharedEpoch:
    """An epoch counter shared with DataLoader worker processes (also persistent ones)."""

    def __init__(self, epoch: int = 0):
        self._v = mp.Value("i", epoch)

    def set_value(self, epoch: int) -> None:
        """Set the epoch."""
        self._v.value = epoch

    def get_value(self) -> int:
        """Current epoch."""
        return self._v.value


class _ShardStream:
    """Endless shard list: each pass is a deterministic shuffle seeded by (seed, epoch, pass)."""

    def __init__(self, urls: list[str], shuffle: bool, seed: int, epoch: SharedEpoch, resampled: bool):
        self.urls, self.shuffle, self.seed, self.epoch, self.resampled = urls, shuffle, seed, epoch, resampled

    def __call__(self) -> Iterator[dict[str, str]]:
        epoch = self.epoch.get_value()
        for rep in range(1 << 30):
            rng = random.Random((self.seed * 1_000_003 + epoch) * 7919 + rep)
            if self.resampled:
                for _ in range(len(self.urls)):
                    yield {"url": rng.choice(self.urls)}
                continue
            urls = list(self.urls)
            if self.shuffle:
                rng.shuffle(urls)
            yield from ({"url": u} for u in urls)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_pipeline(
    urls: Sequence[str] | str,
    collator: Collator,
    batch_size: int,
    num_samples: int,
    num_workers: int = 0,
    shuffle: bool = True,
    shuffle_buffer: int = 2000,
    resampled: bool = False,
    seed: int = 0,
    epoch: SharedEpoch | None = None,
    world_size: int | None = None,
    drop_last: bool = True,
    repeat: bool = True,
) -> Any:
    """A webdataset ``DataPipeline`` yielding :class:`MultimodalBatch` objects.

    Args:
        urls: Shard URLs (a list, or one spec :func:`expand_shards` takes: brace pattern, glob, folder,
            ``pipe:`` command).
        collator: Builds each batch.
        batch_size: Samples per batch per rank.
        num_samples: Samples in one epoch over all ranks (e.g. from manifest.json).
        num_workers: DataLoader workers per rank (0 = main process).
        shuffle: Shuffle shards (deterministically per epoch) and samples (buffer of ``shuffle_buffer``).
        resampled: Draw shards with replacement (for very large or unevenly sized shard sets).
        seed: Base seed; the shard order depends only on (seed, epoch).
        epoch: Shared epoch counter (set it before each epoch).
        world_size: Number of ranks (default: from torch.distributed or $WORLD_SIZE).
        drop_last: Round the per-worker batch count down (else up, repeating some samples).
        repeat: Training mode (endless shard stream cut at an equal batch count per worker). False reads
            every shard once and keeps the last partial batch: for evaluation, where each sample must be
            seen exactly once (ranks may then get unequal batch counts).

    """
    import webdataset as wds

    urls = expand_shards(urls) if isinstance(urls, str | Path) else list(urls)
    _, ws = _world()
    world_size = world_size or ws
    nw = max(1, num_workers)
    if repeat and not resampled and len(urls) < nw * world_size:
        raise ValueError(
            f"{len(urls)} shards < {nw} workers x {world_size} ranks: some workers would get no data. "
            "Write smaller shards (--shard-size), use fewer workers, or set resampled=True."
        )
    if not repeat and len(urls) < world_size:
        raise ValueError(
            f"{len(urls)} shards < {world_size} ranks: some ranks would get no evaluation data. "
            "Write smaller shards (--shard-size) so that every rank reads at least one."
        )
    global_batch = batch_size * world_size
    rnd = math.floor if drop_last else math.ceil
    batches = max(1, rnd(num_samples / global_batch))
    per_worker = max(1, math.ceil(batches / nw))
    epoch = epoch or SharedEpoch(0)

    def to_batches(src: Iterator[MaterialRecord]) -> Iterator[Any]:
        buf: list[MaterialRecord] = []
        for rec in src:
            buf.append(rec)
            if len(buf) == batch_size:
                yield collator(buf, skipped=skipped_count())
                buf = []
        if buf and not repeat:
            yield collator(buf, skipped=skipped_count())

    source: Any = _ShardStream(urls, shuffle, seed, epoch, resampled) if repeat else wds.SimpleShardList(urls)
    stages = [
        source,
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=count_and_warn),
    ]
    if shuffle:
        # a buffer larger than a worker's share of the epoch would mix the next pass into this one
        buf = max(1, min(shuffle_buffer, num_samples // (world_size * nw) // 2))

        def sample_shuffle(src: Iterator[dict]) -> Iterator[dict]:
            # seeded by (seed, epoch, rank, worker): the same run gives the same order
            info = torch.utils.data.get_worker_info()
            wid = info.id if info is not None else 0
            s = hash((seed, epoch.get_value(), _world()[0], wid)) & 0x7FFFFFFF
            return wds.shuffle(buf, initial=buf, seed=s)(src)

        stages.append(sample_shuffle)
    stages += [wds.map(decode, handler=count_and_warn), to_batches]
    pipe = wds.DataPipeline(*stages)
    if repeat:
        pipe = pipe.with_epoch(per_worker)
    else:
        per_worker = math.ceil(num_samples / world_size / batch_size / nw)
    pipe.batches_per_worker = per_worker
    pipe.batches_per_epoch = per_worker * nw
    pipe.epoch = epoch
    return pipe


def shard_loader(
    urls: Sequence[str] | str, collator: Collator, batch_size: int, num_samples: int, num_workers: int = 2, **kw: Any
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over :func:`shard_pipeline` (batches come ready-made from the workers)."""
    pipe = shard_pipeline(urls, collator, batch_size, num_samples, num_workers=num_workers, **kw)
    loader = torch.utils.data.DataLoader(
        pipe,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_worker_init,
    )
    loader.num_batches = pipe.batches_per_epoch
    loader.epoch = pipe.epoch
    return loader


def load_records(urls: Sequence[str] | str | Path) -> list[MaterialRecord]:
    """Decode every sample of ``urls`` into memory (bad samples and truncated shards are counted, not fatal)."""
    import webdataset as wds

    urls = expand_shards(urls) if isinstance(urls, str | Path) else list(urls)
    pipe = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=count_and_warn),
        wds.map(decode, handler=count_and_warn),
    )
    return list(pipe)


class RecordDataset(torch.utils.data.Dataset):
    """Records held in memory; use with :func:`memory_loader`."""

    def __init__(self, records: list[MaterialRecord]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> MaterialRecord:
        return self.records[i]


def memory_loader(
    records: list[MaterialRecord],
    collator: Collator,
    batch_size: int,
    num_workers: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    distributed: bool | None = None,
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over in-memory records; a ``DistributedSampler`` gives every rank equal batches."""
    ds = RecordDataset(records)
    rank, ws = _world()
    distributed = ws > 1 if distributed is None else distributed
    sampler = None
    if distributed:
        sampler = torch.utils.data.DistributedSampler(
            ds, num_replicas=ws, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collator,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_worker_init,
    )
