"""Loading weights with every key verified: upstream's loader silently loads nothing when prefixes
differ (sam3 issues #434, #606), so ours reports missing/unexpected keys by module and refuses."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """The `model` state dict of a sam3 trainer checkpoint, read weights-only (no pickled code).

    Memory-mapped: the optimizer state beside the weights (twice their size with AdamW) is never read.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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


def save_safetensors(state: StateDict, path: Path, metadata: dict[str, str]) -> None:
    """Tensors as they are, each stored as its own contiguous copy (safetensors refuses shared ones)."""
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path), metadata=metadata)


def load_safetensors(path: Path) -> StateDict:
    return load_file(str(path), device="cpu")


UPSTREAM_PREFIX = "detector."  # sam3.pt: the image model's keys; "tracker." keys are the video tracker


@dataclass
class LoadReport:
    """How a weights file maps onto a model: what loads, what is missing, what is left over."""

    source_format: str
    """`sam3.pt` (keys under `detector.`) or `bare` (trainer checkpoints, our exports)."""
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[str]
    ignored: int
    """Keys outside the image model (sam3.pt's video tracker), dropped on purpose."""
    loaded_fraction: float
    """Share of the model's parameter elements the file provides."""

    def summary(self) -> dict[str, Any]:
        return {
            "source_format": self.source_format,
            "loaded_keys": len(self.loaded),
            "loaded_fraction": round(self.loaded_fraction, 6),
            "ignored_keys": self.ignored,
            "missing": _by_module(self.missing),
            "unexpected": _by_module(self.unexpected),
            "wrong_shape": self.wrong_shape[:10],
        }


def image_model_state(state: StateDict) -> tuple[StateDict, str, int]:
    """Keys as the image model names them: sam3.pt's `detector.` prefix stripped, tracker dropped."""
    if any(k.startswith(UPSTREAM_PREFIX) for k in state):
        kept = {k[len(UPSTREAM_PREFIX) :]: v for k, v in state.items() if k.startswith(UPSTREAM_PREFIX)}
        return kept, "sam3.pt", len(state) - len(kept)
    return dict(state), "bare", 0


def match_weights(model: nn.Module, state: StateDict) -> LoadReport:
    """Compare a state dict with a model's, by key and shape (works on meta tensors too)."""
    state, fmt, ignored = image_model_state(state)
    expected = model.state_dict()
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    loaded = [k for k in expected if k in state and k not in wrong]
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    covered = sum(params[k].numel() for k in loaded if k in params)
    return LoadReport(
        fmt,
        loaded,
        sorted(set(expected) - set(state)),
        sorted(set(state) - set(expected)),
        wrong,
        ignored,
        covered / total if total else 0.0,
    )


def check_report(report: LoadReport, source: str, min_loaded: float) -> None:
    """Refuse weights that would leave the model largely at random init, naming the likely cause."""
    if report.loaded_fraction >= min_loaded and not report.wrong_shape:
        return
    hint = ""
    if not report.loaded and report.unexpected:
        sample = report.unexpected[0]
        hint = (
            f" None of the file's keys match (e.g. {sample!r}): a prefix mismatch? sam3.pt keys "
            f"start with '{UPSTREAM_PREFIX}', trainer checkpoints and sam3ft exports have none."
        )
    raise WeightsError(
        f"{source}: only {report.loaded_fraction:.1%} of the model's parameters would load "
        f"(minimum {min_loaded:.0%}); {len(report.wrong_shape)} wrong shapes {report.wrong_shape[:3]}; "
        f"missing [{_by_module(report.missing)}]; unexpected [{_by_module(report.unexpected)}].{hint}",
        fix="use weights of the same model preset, or lower fetch.min_loaded knowingly",
    )


def read_weights_file(path: Path) -> StateDict:
    """Tensors of a safetensors file or a weights-only torch checkpoint (`model` unwrapped).

    torch files are memory-mapped, so checking a 3.4 GB sam3.pt costs no RAM.
    """
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a pickle with code, a truncated file, not a checkpoint at all
        raise WeightsError(
            f"{path}: cannot be read as weights-only ({exc})",
            fix="use a .pt saved with torch.save of tensors, or .safetensors",
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path}: not a mapping of tensor names to tensors", fix="use a state dict")
    return data


def load_base_weights(model: nn.Module, path: Path, min_loaded: float) -> LoadReport:
    """Load what fits from `path` into `model` after checking it covers at least `min_loaded`."""
    file_state = read_weights_file(path)
    report = match_weights(model, file_state)
    check_report(report, str(path), min_loaded)
    state, _, _ = image_model_state(file_state)
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report


def make_initializer(path: str | None, min_loaded: float) -> Callable[..., nn.Module] | None:
    """sam3 trainer hook (`checkpoint.model_weight_initializer`): base weights before step 0."""
    if path is None:
        return None

    def initialise(model: nn.Module) -> nn.Module:
        report = load_base_weights(model, Path(path), min_loaded)
        logging.info("base weights %s: %s", path, report.summary())
        return model

    return initialise
