"""Pieces the trainer config instantiates for data: a reseeding data loader and a collate that
chunks for gradient accumulation. The model builder is in train/model.py."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from sam3.train.data.collator import collate_fn_api, collate_fn_api_with_chunking
from sam3.train.data.torch_dataset import TorchDataset
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

# configs/train/sam3ft.yaml's model `_target_` is sam3ft.train.data.build_trainable_model: every run
# records that name in its trainer_config.yaml (a train output), so the builder stays importable here
from sam3ft.train.model import build_trainable_model as build_trainable_model
from sam3ft.train.transfer import PackedBatch


def reseed(seed: int, epoch: int, item: int | None = None) -> None:
    """Seed python, numpy and torch from (seed, epoch[, item]): a resumed run draws what an
    unbroken one does."""
    value = seed * 100_003 + epoch
    if item is not None:
        value = value * 1_000_003 + item
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


class SeededTorchDataset(TorchDataset):
    """sam3's TorchDataset, reseeded at every epoch start and shuffled from our seed.

    Upstream seeds once per process, so augmentation after a resume would differ from an unbroken
    run; and its DistributedSampler shuffles with seed 0 whatever the run's seed.
    """

    def __init__(self, *, seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = seed
        self._stream: EpochStream | None = None
        if getattr(self, "sampler", None) is not None:  # upstream's, seeded with 0: replace it
            sampler: Any = DistributedSampler(self.dataset, shuffle=self.shuffle, seed=seed)
            self.sampler = sampler

    def get_loader(self, epoch: int) -> Any:
        if self.num_workers > 0:
            if self._stream is None or not self._stream.continues(epoch):
                self._stream = EpochStream(self, epoch)
            return self._stream.next_epoch()
        return self.per_epoch_loader(epoch)

    def per_epoch_loader(self, epoch: int) -> Any:
        """Upstream's way: a new DataLoader for this epoch, the process RNGs seeded from (seed, epoch)."""
        reseed(self.seed, epoch)
        return super().get_loader(epoch)


class _SeededItems(Dataset):  # type: ignore[type-arg]
    """`dataset[idx]` for keys (epoch, idx), augmenting from a seed of its own: what an image
    gets depends on (seed, epoch, image) only, not on the worker or the number of workers."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, idx = key
        reseed(self.seed, epoch, idx)
        return self.dataset[idx]


class _EpochBatches(Sampler):  # type: ignore[type-arg]
    """Batches of epoch `first`, then of every later epoch, each epoch cut exactly as a fresh
    per-epoch loader would cut it (same sampler order, same drop_last)."""

    def __init__(self, loader: SeededTorchDataset, first: int) -> None:
        self.loader, self.first = loader, first

    def per_epoch(self) -> int:
        n = len(self.loader.sampler) if self.loader.sampler is not None else len(self.loader.dataset)
        size = self.loader.batch_size
        return n // size if self.loader.drop_last else -(-n // size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, size = self.first, self.loader.batch_size
        while True:
            sampler = self.loader.sampler
            if sampler is not None:
                sampler.set_epoch(epoch)
            order = list(sampler) if sampler is not None else list(range(len(self.loader.dataset)))
            for batch in range(self.per_epoch()):
                yield [(epoch, idx) for idx in order[batch * size : (batch + 1) * size]]
            epoch += 1


class EpochStream:
    """One data loader for many epochs, so its workers live on and prefetch across epoch ends.

    sam3's trainer asks for a fresh loader every epoch; with workers that means new processes and
    an empty pipeline each time, and on a small dataset (one or two batches per epoch) every step
    then waits for a single worker to build a whole batch. The stream serves the same batches in
    the same order, epoch after epoch; asked for any other epoch than the next (a resume), or
    before the previous epoch was drained, it starts over from that epoch.
    """

    def __init__(self, loader: SeededTorchDataset, first: int) -> None:
        self.batches = _EpochBatches(loader, first)
        self.per_epoch = self.batches.per_epoch()
        self.loader = DataLoader(
            _SeededItems(loader.dataset, loader.seed),
            batch_sampler=self.batches,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            collate_fn=loader.collate_fn,
            worker_init_fn=loader.worker_init_fn,
        )
        self.iterator = iter(self.loader)
        self.epoch, self.served = first, 0  # the epoch next_epoch() hands out; batches taken of the last

    def continues(self, epoch: int) -> bool:
        """Whether `epoch` is the next one and the previous one was served in full."""
        return epoch == self.epoch and self.served == self.per_epoch

    def next_epoch(self) -> _Epoch:
        self.served = 0
        self.epoch += 1
        return _Epoch(self)


class _Epoch:
    """One epoch's batches of the stream, with the length sam3's trainer reads for its progress."""

    def __init__(self, stream: EpochStream) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return self.stream.per_epoch

    def __iter__(self) -> Iterator[Any]:
        stream = self.stream
        while stream.served < stream.per_epoch:
            batch = next(stream.iterator)
            stream.served += 1
            yield batch


def collate_fn(batch: list[Any], dict_key: str, num_chunks: int = 1, with_seg_masks: bool = False) -> Any:
    """One batch, or `num_chunks` micro-batches for gradient accumulation (the trainer's contract).

    Named `collate_fn`: sam3's trainer finds validation keys by matching targets against it
    (sam3/train/utils/train_utils.py:29). Each (micro-)batch comes packed into one buffer
    (train/transfer.PackedBatch); the trainer unpacks it onto its device."""
    if num_chunks == 1:
        return PackedBatch(collate_fn_api(batch, dict_key, with_seg_masks=with_seg_masks))
    chunks = collate_fn_api_with_chunking(batch, num_chunks, dict_key, with_seg_masks=with_seg_masks)
    return [PackedBatch(chunk) for chunk in chunks]
