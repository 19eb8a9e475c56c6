"""The training data loader with workers: one pool of workers for all epochs (EpochStream), the
batches a fresh per-epoch loader would give, augmentation seeded per (seed, epoch, image)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from sam3.train.data.torch_dataset import TorchDataset

from conftest import write_params
from sam3ft import params
from sam3ft.train.data import SeededTorchDataset
from test_train import finish, train, workspace


class Draws(torch.utils.data.Dataset):
    """Item i -> (i, a draw from each RNG an augmentation may use, the worker's pid)."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, idx: int) -> tuple[int, float, float, int]:
        return idx, random.random(), torch.rand(()).item(), os.getpid()


def _collate(batch: list) -> list:
    return batch


@pytest.fixture
def one_process_group():
    """DistributedSampler (what sam3's loader shuffles with) needs a process group: world size 1."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _loader(workers: int, seed: int = 7) -> SeededTorchDataset:
    return SeededTorchDataset(
        seed=seed,
        dataset=Draws(),
        batch_size=3,
        num_workers=workers,
        shuffle=True,
        pin_memory=False,
        drop_last=True,
        collate_fn=_collate,
    )


def _epochs(loader: SeededTorchDataset, first: int, count: int) -> list[list[list]]:
    return [[list(batch) for batch in loader.get_loader(epoch)] for epoch in range(first, first + count)]


def _strip(epochs: list[list[list]]) -> list[list[tuple]]:
    """Per epoch, every item without the worker pid."""
    return [[item[:3] for b in batches for item in b] for batches in epochs]


def test_stream_serves_the_per_epoch_loaders_batches_from_one_worker_pool(one_process_group):
    loader = _loader(workers=2)
    epochs = _epochs(loader, 0, 3)
    for epoch, batches in enumerate(epochs):
        upstream = [[item[0] for item in b] for b in TorchDataset.get_loader(_loader(0), epoch)]
        assert [[item[0] for item in b] for b in batches] == upstream  # same order, same drop_last
        assert len(batches) == 3  # 10 images, batches of 3, last partial batch dropped
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    pids = {item[3] for batches in epochs for b in batches for item in b}
    assert len(pids) == 2 and os.getpid() not in pids  # the same two workers served every epoch


def test_augmentation_draws_depend_on_seed_epoch_image_only(one_process_group):
    two = _epochs(_loader(workers=2), 0, 3)
    one = _epochs(_loader(workers=1), 0, 3)
    assert _strip(one) == _strip(two)  # independent of the number of workers
    resumed = _epochs(_loader(workers=2), 2, 1)  # a run resumed at epoch 2 draws what an unbroken one did
    assert _strip(resumed) == _strip(two)[2:]
    assert _strip(_epochs(_loader(workers=2, seed=8), 0, 1)) != _strip(two)[:1]


def test_an_epoch_left_unfinished_starts_over(one_process_group):
    loader = _loader(workers=2)
    first = next(iter(loader.get_loader(0)))
    again = [list(b) for b in loader.get_loader(0)]  # asked for epoch 0 again mid-way: from its start
    assert [item[:3] for item in again[0]] == [item[:3] for item in first]
    assert len(again) == 3
    after = [[list(b) for b in loader.get_loader(1)]]  # then on as if nothing happened
    assert _strip(after) == _strip(_epochs(_loader(workers=2), 0, 2))[1:]
    loader.get_loader(2)  # handed out, never iterated: epoch 3 must not get epoch 2's batches
    assert _strip([[list(b) for b in loader.get_loader(3)]]) == _strip(_epochs(_loader(workers=2), 3, 1))


@pytest.mark.slow
def test_training_with_workers_is_reproducible_and_worker_count_free(tmp_path, shipped_params):
    """Two epochs of the tiny preset with 1 and with 2 data-loader workers (one fetch and prepare,
    two trainings side by side): identical step losses."""
    first = workspace(tmp_path, shipped_params, max_epochs=2, batch_size=4, num_workers=1)
    second = params.read_params(first)
    for key in ("train", "eval", "export", "scratch"):
        second["paths"][key] = str(tmp_path / "w2" / key)
    second["trainer"]["num_workers"] = 2
    procs = [train(first), train(write_params(tmp_path / "w2.yaml", second))]
    for proc in procs:
        finish(proc)
    losses = [
        (Path(p) / "dvclive-steps/plots/metrics/step/loss.tsv").read_text()
        for p in (tmp_path / "train", tmp_path / "w2" / "train")
    ]
    assert len(losses[0].splitlines()) == 1 + 12 and losses[0] == losses[1]
