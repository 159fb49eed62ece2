"""LightningDataModule over a shard folder written by ``mmmat data build``."""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
import torch

from mmmat.data.batch import Collator, MultimodalBatch
from mmmat.data.loader import (
    SharedEpoch,
    count_samples,
    expand_shards,
    load_records,
    memory_loader,
    read_sizes,
    shard_loader,
    split_shards,
)


class MultimodalDataModule(pl.LightningDataModule):
    """Serves :class:`MultimodalBatch` objects for the train/val/test splits of a shard folder.

    Args:
        shards: Folder with ``manifest.json`` and one sub-folder of shards per split. With ``urls`` the folder
            needs only ``manifest.json`` (property columns, sample counts; shards may live elsewhere).
        batch_size: Samples per batch per rank.
        num_workers: DataLoader workers per rank.
        mode: ``"resident"`` packs each split once as tensors on the training device and assembles batches
            there (fastest; for sets that fit in device memory, e.g. MP-20); ``"memory"`` decodes every shard
            once and collates from RAM in worker processes; ``"stream"`` reads shards with webdataset (any
            size; shards >= workers x ranks unless ``resampled``).
        properties: Property columns to carry; default: every column listed in the manifest.
        cutoff: Periodic neighbour-graph cutoff, Å.
        max_num_neighbors: Nearest neighbours kept per atom (None = all within the cutoff).
        build_graph: Build graphs in the loader workers (False: the model builds them on its device).
        include_generated_text: Count generated descriptions as literature text.
        max_text_tokens: Token budget per text.
        resampled: Stream shards with replacement.
        shuffle_buffer: Sample shuffle buffer when streaming.
        seed: Seed of shuffles and text choice.
        train_split / val_split / test_split: Split names in the shard folder.
        urls: Optional shard URLs per split, read instead of ``<shards>/<split>/``: anything webdataset opens
            (local paths, brace patterns ``shard-{000000..000127}.tar``, ``http(s)://``, ``pipe:`` commands such
            as ``pipe:aws s3 cp s3://bucket/mp/train/shard-{000000..000127}.tar -``), a string or a list.
        sizes: Samples per shard for counting the samples of ``urls``: a JSON ``{shard file name: samples}``
            (open_clip's ``sizes.json``) or a ``manifest.json``; default: ``<shards>/manifest.json``.
        reduce_cells: Give every crystal its Niggli-reduced cell when the records are loaded
            (:meth:`~mmmat.data.schema.MaterialRecord.reduced`; resident and memory modes). Models that are
            invariant to the cell choice do not need it; a generator of lattice parameters does.
        precompute_graph: Resident mode: build each crystal's neighbour list once when the split is packed
            and assemble batches by gathering (the same graph; no graph search and no synchronisation per step).
        edge_capacity: Resident mode with ``precompute_graph``: pad every batch's edge list to this fixed length
            (0 = chosen from the data); overflowing batches grow it, never truncate (see
            :class:`~mmmat.data.resident.ResidentData`).

    """

    def __init__(
        self,
        shards: str,
        batch_size: int = 64,
        num_workers: int = 2,
        mode: Literal["resident", "memory", "stream"] = "memory",
        properties: list[str] | None = None,
        cutoff: float = 5.0,
        max_num_neighbors: int | None = None,
        build_graph: bool = True,
        include_generated_text: bool = False,
        max_text_tokens: int = 128,
        resampled: bool = False,
        shuffle_buffer: int = 2000,
        seed: int = 0,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        tokenizer: str | None = None,
        build_tokenizer: bool = False,
        tokenizer_vocab_size: int = 8000,
        reduce_cells: bool = False,
        precompute_graph: bool = False,
        edge_capacity: int | None = None,
        urls: dict[str, str | list[str]] | None = None,
        sizes: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if (precompute_graph or edge_capacity is not None) and mode != "resident":
            raise ValueError("precompute_graph and edge_capacity need mode 'resident'")
        if reduce_cells and mode == "stream":
            raise ValueError("reduce_cells needs mode 'resident' or 'memory' (records are reduced when loaded)")
        from mmmat.data.manifest import load_manifest

        self.manifest = load_manifest(shards)
        self.properties = list(properties) if properties is not None else list(self.manifest["property_columns"])
        unknown = sorted(set(self.properties) - set(self.manifest["property_columns"]))
        if unknown:
            raise ValueError(
                f"properties {unknown} are not in {shards}/manifest.json (columns: "
                f"{self.manifest['property_columns']})"
            )
        bad = sorted(set(urls or {}) - {train_split, val_split, test_split})
        if bad:
            raise ValueError(f"data.urls names unknown splits {bad} (splits: {train_split}, {val_split}, {test_split})")
        self._sizes: dict[str, int] | None = None
        self._records: dict[str, list] = {}
        self._resident: dict[str, Any] = {}
        self._epoch = SharedEpoch(0)
        self.tokenizer: Any = self._load_or_build_tokenizer()

    def _load_or_build_tokenizer(self) -> Any:
        from pathlib import Path

        from mmmat.data.tokenizer import build_tokenizer, corpus_from_records, load_tokenizer

        h = self.hparams
        if h.tokenizer is None:
            return None
        if Path(h.tokenizer).exists() or ":" in h.tokenizer or not h.build_tokenizer:
            return load_tokenizer(h.tokenizer)
        texts = list(corpus_from_records(self.records(h.train_split)))
        if not texts:
            raise ValueError(f"no texts in split {h.train_split!r} to train a tokenizer on")
        return build_tokenizer(texts, vocab_size=h.tokenizer_vocab_size, out_dir=h.tokenizer)

    def collator(self, train: bool) -> Collator:
        """The collator for training (random text choice) or evaluation."""
        h = self.hparams
        return Collator(
            property_names=self.properties,
            cutoff=h.cutoff,
            max_num_neighbors=h.max_num_neighbors,
            build_graph=h.build_graph,
            tokenizer=self.tokenizer,
            max_text_tokens=h.max_text_tokens,
            random_text=train,
            include_generated_text=h.include_generated_text,
            seed=h.seed,
        )

    def shard_urls(self, split: str) -> list[str]:
        """Shard URLs of ``split``: from ``urls`` when it names the split, else ``<shards>/<split>/``."""
        urls = self.hparams.urls or {}
        if split in urls:
            return expand_shards(urls[split])
        return split_shards(self.hparams.shards, split)

    def num_samples(self, split: str) -> int:
        """Samples in ``split``: from the sizes of its shards when ``urls`` names it, else from the manifest."""
        if split not in (self.hparams.urls or {}):
            return int(self.manifest["splits"][split]["samples"])
        if self._sizes is None:
            from pathlib import Path

            self._sizes = read_sizes(self.hparams.sizes or Path(self.hparams.shards) / "manifest.json")
        return count_samples(self.shard_urls(split), self._sizes)

    def records(self, split: str) -> list:
        """Decoded records of ``split`` (memory mode; cached)."""
        if split not in self._records:
            recs = load_records(self.shard_urls(split))
            if self.hparams.reduce_cells:
                recs = [r.reduced() for r in recs]
            self._records[split] = recs
        return self._records[split]

    def resident(self, split: str, device: torch.device | str | None = None) -> Any:
        """The split packed as tensors on ``device`` (resident mode; cached)."""
        from mmmat.data.resident import ResidentData

        if split not in self._resident:
            if device is None:
                device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
            h = self.hparams
            self._resident[split] = ResidentData(
                self.records(split), self.properties, tokenizer=self.tokenizer, max_text_tokens=h.max_text_tokens,
                include_generated_text=h.include_generated_text, cutoff=h.cutoff if h.build_graph else None,
                max_num_neighbors=h.max_num_neighbors, device=device,
                precompute_graph=h.precompute_graph and h.build_graph, edge_capacity=h.edge_capacity,
            )
        return self._resident[split]

    def _loader(self, split: str, train: bool) -> Any:
        h = self.hparams
        if h.mode == "resident":
            from mmmat.data.resident import ResidentLoader

            loader = ResidentLoader(self.resident(split), h.batch_size, shuffle=train, seed=h.seed, drop_last=train)
            if self.trainer is not None:
                loader.set_epoch(self.trainer.current_epoch)
            return loader
        if h.mode == "memory":
            return memory_loader(
                self.records(split), self.collator(train), h.batch_size, num_workers=h.num_workers,
                shuffle=train, drop_last=train, seed=h.seed,
            )
        urls = self.shard_urls(split)
        nw = h.num_workers if train else min(h.num_workers, len(urls))
        return shard_loader(
            urls, self.collator(train), h.batch_size, self.num_samples(split), num_workers=nw,
            shuffle=train, resampled=h.resampled and train, shuffle_buffer=h.shuffle_buffer,
            seed=h.seed, epoch=self._epoch, drop_last=train, repeat=train,
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        """Training batches (shuffled; equal batch count on every rank)."""
        if self.trainer is not None:
            self._epoch.set_value(self.trainer.current_epoch)
        return self._loader(self.hparams.train_split, train=True)

    def set_epoch(self, epoch: int) -> None:
        """Tell the streaming loaders which epoch starts (the shard order depends on it)."""
        self._epoch.set_value(epoch)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        """Validation batches."""
        return self._loader(self.hparams.val_split, train=False)

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        """Test batches."""
        return self._loader(self.hparams.test_split, train=False)

    def transfer_batch_to_device(self, batch: MultimodalBatch, device: torch.device, dataloader_idx: int) -> Any:
        """Move a :class:`MultimodalBatch` to ``device`` (a no-op for resident batches)."""
        if batch.crystal.z.device == device:
            return batch
        return batch.to(device, non_blocking=True)
