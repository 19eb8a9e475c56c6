"""Pieces the trainer config instantiates: a reseeding data loader, a collate that chunks for
gradient accumulation, and the model builder that freezes the groups a run does not train."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from sam3.train.data.collator import collate_fn_api, collate_fn_api_with_chunking
from sam3.train.data.torch_dataset import TorchDataset
from torch.utils.data import DistributedSampler

from sam3ft.model.build import build_model
from sam3ft.model.lora import add_lora
from sam3ft.model.spec import load_spec_file

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


def reseed(seed: int, epoch: int) -> None:
    """Seed python, numpy and torch from (seed, epoch): a resumed run draws what an unbroken one does."""
    value = seed * 100_003 + epoch
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
        if getattr(self, "sampler", None) is not None:  # upstream's, seeded with 0: replace it
            sampler: Any = DistributedSampler(self.dataset, shuffle=self.shuffle, seed=seed)
            self.sampler = sampler

    def get_loader(self, epoch: int) -> Any:
        reseed(self.seed, epoch)
        return super().get_loader(epoch)


def collate_fn(batch: list[Any], dict_key: str, num_chunks: int = 1, with_seg_masks: bool = False) -> Any:
    """One batch, or `num_chunks` micro-batches for gradient accumulation (the trainer's contract).

    Named `collate_fn`: sam3's trainer finds validation keys by matching targets against it
    (sam3/train/utils/train_utils.py:29)."""
    if num_chunks == 1:
        return collate_fn_api(batch, dict_key, with_seg_masks=with_seg_masks)
    return collate_fn_api_with_chunking(batch, num_chunks, dict_key, with_seg_masks=with_seg_masks)


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
) -> torch.nn.Module:
    """The model for the trainer, with every parameter outside `trainable` groups frozen;
    `segmentation` adds the mask head to a preset built without one (tiny); LoRA adapters
    (trainable) go on the trunk's attention when `lora_rank` > 0.

    `autocast_cache` is process-wide: sam3's trainer builds its autocast contexts without
    `cache_enabled`, so they take torch's global default, which is set here, in the training process.
    """
    torch.set_autocast_cache_enabled(autocast_cache)
    spec = load_spec_file(spec_path).with_mask_head(segmentation)
    return freeze_and_adapt(build_model(spec, bpe_path), trainable, lora_rank, lora_alpha)


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
