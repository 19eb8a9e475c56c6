"""Loading weights with every key verified: upstream's loader silently loads nothing when prefixes
differ (sam3 issues #434, #606), so ours reports missing/unexpected keys by module and refuses."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sam3ft.errors import WeightsError

StateDict = dict[str, torch.Tensor]


def _by_module(keys: list[str], depth: int = 2) -> str:
    counts = Counter(".".join(k.split(".")[:depth]) for k in keys)
    return ", ".join(f"{module} ({n})" for module, n in sorted(counts.items()))


def verify_and_load(model: nn.Module, state: StateDict, source: str) -> None:
    """Load `state` into `model`, failing unless the key sets match exactly and shapes agree."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        hint = ""
        if unexpected and all(k.startswith("detector.") for k in unexpected):
            hint = " (the file uses the 'detector.' prefix of sam3.pt; strip it)"
        elif missing and any(f"detector.{k}" in state for k in missing):
            hint = " (keys carry a 'detector.' prefix the model lacks)"
        raise WeightsError(
            f"{source}: keys do not match the model{hint}: {len(missing)} missing "
            f"[{_by_module(missing)}], {len(unexpected)} unexpected [{_by_module(unexpected)}]",
            fix="load weights saved from the same model preset (see model.json / manifest.json)",
        )
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise WeightsError(
            f"{source}: {len(wrong)} tensors have the wrong shape, e.g. {wrong[:3]}",
            fix="use the model preset the weights were trained with",
        )
    model.load_state_dict(state, strict=True)


def load_trainer_checkpoint(path: Path) -> StateDict:
    """The `model` state dict of a sam3 trainer checkpoint, read weights-only (no pickled code)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise WeightsError(f"{path}: not found", fix="run the train stage (dvc repro)") from exc
    except Exception as exc:  # truncated zip, pickle with code, ...: all mean "not a safe checkpoint"
        raise WeightsError(
            f"{path}: cannot be read as a weights-only checkpoint ({exc})",
            fix="re-run training; never load checkpoints from untrusted sources",
        ) from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise WeightsError(f"{path}: no 'model' state dict inside", fix="use a sam3 trainer checkpoint")
    return ckpt["model"]


def save_safetensors(state: StateDict, path: Path, dtype: torch.dtype, metadata: dict[str, str]) -> None:
    """Model-only weights; floating tensors cast to `dtype`, each stored as its own copy."""
    out = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}
    save_file(out, str(path), metadata=metadata)


def load_safetensors(path: Path) -> StateDict:
    return load_file(str(path), device="cpu")
