"""Rebuild a trained model from pipeline artifacts: fetch's spec + vocab, train's checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from sam3.model.sam3_image import Sam3Image

from sam3ft.layout import MANIFEST, SPEC_FILE, VOCAB_NAME
from sam3ft.model.build import build_model, build_to_load
from sam3ft.model.spec import ModelSpec, load_spec_file
from sam3ft.model.weights import load_base_weights, load_trainer_checkpoint, verify_and_load

MASK_HEAD = "segmentation_head."  # parameter prefix of the mask head


def load_trained(base_dir: Path, checkpoint: Path) -> tuple[Sam3Image, ModelSpec]:
    """An eval-mode model with the checkpoint's weights, every key verified.

    A run with `trainer.segmentation: true` adds a mask head to presets without one (tiny): the
    checkpoint's keys say so, and the returned spec records it (export's model.json carries it on).
    """
    spec = load_spec_file(base_dir / SPEC_FILE)
    state = load_trainer_checkpoint(checkpoint)
    spec = spec.with_mask_head(any(k.startswith(MASK_HEAD) for k in state))
    model = build_to_load(spec, str(base_dir / VOCAB_NAME))  # every weight comes from the checkpoint
    verify_and_load(model, state, str(checkpoint))
    return model.eval(), spec


def load_base(base_dir: Path, seed: int) -> tuple[Sam3Image, ModelSpec]:
    """The eval-mode model the train stage starts from: the preset built right after
    `torch.manual_seed(seed)`, then fetch's weights loaded as the trainer's
    `model_weight_initializer` loads them (none with `fetch.weights: none`).

    The trainer draws the init the same way (`train/model.build_trainable_model`'s `init_seed`),
    apart from sam3's per-process seeding, so the base is the trainer's start for every base.seed.
    """
    spec = load_spec_file(base_dir / SPEC_FILE)
    manifest = json.loads((base_dir / MANIFEST).read_text())
    torch.manual_seed(seed)
    model = build_model(spec, str(base_dir / VOCAB_NAME), training=False, coord_cache=False)
    if "file" in manifest["weights"]:
        load_base_weights(model, base_dir / manifest["weights"]["file"], manifest["min_loaded"])
    return model.eval(), spec


def device_for(accelerator: str) -> str:
    return "cuda" if accelerator == "cuda" and torch.cuda.is_available() else "cpu"
