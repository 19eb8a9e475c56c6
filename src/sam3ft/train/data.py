"""Pieces the trainer config instantiates: a reseeding data loader, a collate that chunks for
gradient accumulation, and the model builder that freezes the groups a run does not train."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from sam3.train.data.collator import collate_fn_api, collate_fn_api_with_chunking
from sam3.train.data.torch_dataset import TorchDataset
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from sam3ft.model.build import build_model
from sam3ft.model.lora import add_lora
from sam3ft.model.spec import load_spec_file
from sam3ft.train.matching import stack_model_matching
from sam3ft.train.transfer import PackedBatch

# Parameter-name prefixes of the groups `trainer.trainable` can list. Every parameter of a SAM3
# image model belongs to a group (tests/test_train.py checks it on the full model); a parameter is
# frozen when any group it belongs to is. The neck's two finest levels (convs.0: 4x, convs.1: 2x)
# feed only the mask head: without mask losses they get no gradient, which DDP refuses on the second
# step ("Expected to have finished reduction"), so they belong to "masks" too. "masks" is not a
# `trainer.trainable` choice: it trains exactly when `trainer.segmentation` is true (the train stage
# adds it), so the neck's mask levels train only with both "neck" listed and segmentation on.
GROUPS: dict[str, tuple[str, ...]] = {
    "trunk": ("backbone.vision_backbone.trunk.",),
    "neck": ("backbone.vision_backbone.convs.", "backbone.vision_backbone.sam2_convs."),
    "text": ("backbone.language_backbone.",),
    "encoder": ("transformer.encoder.",),
    "decoder": ("transformer.decoder.",),
    "geometry": ("geometry_encoder.",),
    "heads": ("dot_prod_scoring.",),
    "masks": ("segmentation_head.", "backbone.vision_backbone.convs.0.", "backbone.vision_backbone.convs.1."),
}


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


def frozen_prefixes(trainable: list[str]) -> tuple[str, ...]:
    return tuple(p for group, prefixes in GROUPS.items() if group not in trainable for p in prefixes)


def build_trainable_model(
    spec_path: str,
    bpe_path: str,
    trainable: list[str],
    segmentation: bool = False,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    autocast_cache: bool = True,
    compile_trunk: bool = False,
    compile_layers: bool = False,
    compile_model: bool = False,
    act_ckpt_text: bool = True,
    act_ckpt_geometry: bool = True,
    stacked_matching: bool = False,
) -> torch.nn.Module:
    """The model for the trainer, with every parameter outside `trainable` groups frozen;
    `segmentation` adds the mask head to a preset built without one (tiny); LoRA adapters
    (trainable) go on the trunk's attention when `lora_rank` > 0; `stacked_matching` matches all
    decoder layers' outputs in one matcher call (train/matching.py).

    `autocast_cache` is process-wide: sam3's trainer builds its autocast contexts without
    `cache_enabled`, so they take torch's global default, which is set here, in the training process.
    """
    torch.set_autocast_cache_enabled(autocast_cache)
    spec = load_spec_file(spec_path).with_mask_head(segmentation)
    model = freeze_and_adapt(build_model(spec, bpe_path), trainable, lora_rank, lora_alpha)
    compile_parts(model, trunk=compile_trunk, layers=compile_layers)
    if stacked_matching:
        stack_model_matching(model)
    if compile_model:
        compile_training_forward(model)
    if not act_ckpt_text:
        # upstream re-runs the text blocks in the backward pass, in Python: host time per step,
        # traded for keeping their activations (bench/LOG.md has the measured trade)
        text: Any = model.get_submodule("backbone.language_backbone.encoder.transformer")
        text.grad_checkpointing = False
    if not act_ckpt_geometry:
        # its layers' recompute runs eager in the backward even under compile_model: host time in
        # every step, which sets the step time of a compiled run at batch 1
        geometry: Any = model.get_submodule("geometry_encoder")
        geometry.use_act_ckpt = False
    return model


def compile_parts(model: torch.nn.Module, trunk: bool, layers: bool) -> None:
    """torch.compile the ViT trunk's forward and/or each DETR encoder and decoder layer's forward,
    in place. Both run under activation checkpointing in training, compiled in the forward pass and
    again in the backward's recompute."""
    if trunk:
        # what sam3's ViT does with its own `compile_mode` (sam3/model/vitdet.py:797): the whole
        # forward, activation checkpointing inside
        vit: Any = model.get_submodule("backbone.vision_backbone.trunk")
        vit.forward = torch.compile(vit.forward, fullgraph=True)
    if layers:
        # sam3 calls each through activation_ckpt_wrapper (sam3/model/act_ckpt_utils.py); the
        # decoder layers' Python options (dac, masks) cause graph breaks, so not fullgraph
        for name in ("transformer.encoder.layers", "transformer.decoder.layers"):
            stack: Any = model.get_submodule(name)  # a ModuleList
            for layer in stack:
                layer.forward = torch.compile(layer.forward)
    if trunk or layers:
        torch._dynamo.config.optimize_ddp = False  # DDP's graph splitting cannot split a checkpoint


def compile_training_forward(model: torch.nn.Module) -> None:
    """torch.compile the model's whole forward for training, in mode "reduce-overhead": on CUDA
    every compiled graph, forward and backward, replays as a CUDA graph, which takes the host's
    kernel launches out of the step.

    - Validation (eval mode) runs the eager forward: a compiled one would compile again.
    - The Hungarian matching stays eager: sam3's matcher runs scipy on host copies, and dynamo
      fails tracing its index building (sam3/train/matcher.py:651).
    - The geometry encoder stays eager: compiled, its box-pooling conv failed inductor's stride
      check in the backward on the CPU.
    - The trainer must run the first training step eager (`Trainer(compile_model=True)`): sam3
      fills device caches lazily on the first forward (sam3/model/position_encoding.py:123,
      sam3/model/decoder.py:336), and one filled inside a CUDA graph is overwritten by the next
      replay (seen on a GPU, bench/LOG.md).
    """
    eager = model.forward
    compiled = torch.compile(eager, mode="reduce-overhead")

    def forward(*args: Any, **kwargs: Any) -> Any:
        return (compiled if model.training else eager)(*args, **kwargs)

    model.forward = forward  # type: ignore[method-assign]
    matching: Any = model._compute_matching
    model._compute_matching = torch.compiler.disable(matching)  # type: ignore[method-assign]
    geometry: Any = model.get_submodule("geometry_encoder")
    geometry.forward = torch.compiler.disable(geometry.forward)
    torch._dynamo.config.optimize_ddp = False  # DDP's graph splitting cannot split a checkpoint


def trained_groups(trainable: list[str], segmentation: bool) -> list[str]:
    """The groups that train: `trainer.trainable`, plus "masks" exactly when masks train."""
    return list(trainable) + (["masks"] if segmentation else [])


def freeze_and_adapt(
    model: torch.nn.Module, trainable: list[str], lora_rank: int, lora_alpha: float
) -> torch.nn.Module:
    """Freeze every parameter outside the `trainable` groups; LoRA on the trunk when `lora_rank` > 0."""
    frozen = frozen_prefixes(trainable)
    for name, param in model.named_parameters():
        if name.startswith(frozen):
            param.requires_grad_(False)
    if lora_rank > 0:
        add_lora(model, lora_rank, lora_alpha)
    return model
