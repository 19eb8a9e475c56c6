"""Runtime workarounds for sam3 0.1.4 quirks, applied in our process only (site-packages untouched).

Each patch names the sam3 file and line it works around. All are idempotent.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sam3ft.errors import Sam3ftError

_APPLIED: set[str] = set()
SECRET_MARKERS = ("TOKEN", "SECRET", "KEY", "PASSWORD", "CREDENTIAL", "AUTH", "SESSION")


def is_secret_name(name: str) -> bool:
    """Environment variable names whose values must never be written anywhere."""
    upper = name.upper()
    return upper.startswith("AWS_") or any(marker in upper for marker in SECRET_MARKERS)


def log_env_names_only() -> None:
    """Replacement for sam3's log_env_variables (sam3/train/trainer.py:210), which writes every
    environment variable, HF_TOKEN and AWS keys included, into logs/log.txt. We log names only."""
    names = sorted(os.environ)
    hidden = [n for n in names if is_secret_name(n)]
    logging.info(
        "Environment: %d variables (values not logged; %d secret-looking: %s)",
        len(names),
        len(hidden),
        ", ".join(hidden) or "none",
    )


def _without_pin_memory(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run `method` with Tensor.pin_memory as a no-op (pinning needs a CUDA driver)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        original = torch.Tensor.pin_memory
        torch.Tensor.pin_memory = lambda self, *a, **k: self  # type: ignore[method-assign]
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.pin_memory = original  # type: ignore[method-assign]

    return wrapper


def _focal_loss_plain_off_gpu(focal: Callable[..., Any]) -> Callable[..., Any]:
    """sam3/train/loss/loss_fns.py:126 defaults to a Triton kernel; use the PyTorch branch off-GPU."""

    @functools.wraps(focal)
    def wrapper(inputs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not inputs.is_cuda:
            kwargs["triton"] = False
        return focal(inputs, *args, **kwargs)

    return wrapper


def _mem_meter_update(self: Any, n: int = 1, reset_peak_usage: bool = True) -> None:
    """sam3/train/utils/train_utils.py:200-206 calls torch.cuda memory stats unguarded (fails off-GPU)
    and floors the peak to whole GB (`// 1e9`); this keeps it exact, in GB, and 0 without CUDA."""
    on_gpu = torch.cuda.is_available()
    self.val = torch.cuda.max_memory_allocated() / 1e9 if on_gpu else 0.0
    if on_gpu and reset_peak_usage:
        torch.cuda.reset_peak_memory_stats()
    self.sum += self.val * n
    self.count += n
    self.avg = self.sum / self.count
    self.peak = max(self.peak, self.val)


def checkpoint_bytes(checkpoint: Any) -> int:
    """Tensor bytes in a (nested) checkpoint: what torch.save will write, give or take metadata."""
    if isinstance(checkpoint, torch.Tensor):
        return checkpoint.numel() * checkpoint.element_size()
    if isinstance(checkpoint, dict):
        return sum(checkpoint_bytes(v) for v in checkpoint.values())
    if isinstance(checkpoint, (list, tuple)):
        return sum(checkpoint_bytes(v) for v in checkpoint)
    return 0


def _save_or_explain(save: Callable[..., Any]) -> Callable[..., Any]:
    """sam3/train/trainer.py:381 writes `<name>.tmp` then renames it over the previous checkpoint.
    On a full disk it dies with a bare OSError and leaves the partial .tmp behind; this removes the
    .tmp (the previous checkpoint is untouched: it is only replaced after a complete write) and says
    how much space the checkpoint needs."""

    @functools.wraps(save)
    def wrapper(self: Any, checkpoint: Any, checkpoint_path: str) -> Any:
        try:
            return save(self, checkpoint, checkpoint_path)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            tmp = Path(f"{checkpoint_path}.tmp")
            tmp.unlink(missing_ok=True)
            need, free = checkpoint_bytes(checkpoint) / 1e9, shutil.disk_usage(tmp.parent).free / 1e9
            raise Sam3ftError(
                f"disk full while writing {checkpoint_path}: it needs ~{need:.2f} GB, {free:.2f} GB free; "
                "the previous checkpoint is intact",
                fix=f"free at least {max(need - free, 0):.2f} GB, then `dvc repro` resumes from it",
            ) from exc

    return wrapper


def apply(training: bool = True) -> None:
    """Install every workaround that applies to this machine; `training=False`: only those inference
    needs, without importing sam3's trainer and losses (about a second of imports, torchmetrics, scipy)."""
    if training and "env" not in _APPLIED:
        import sam3.train.trainer as trainer_module
        from sam3.train.loss import loss_fns
        from sam3.train.utils import train_utils

        trainer_module.log_env_variables = log_env_names_only  # type: ignore[attr-defined]
        trainer_module.Trainer._save_checkpoint = _save_or_explain(  # type: ignore[method-assign]
            trainer_module.Trainer._save_checkpoint
        )
        train_utils.MemMeter.update = _mem_meter_update  # type: ignore[method-assign]
        # per call: CPU tensors take the PyTorch branch, also on a machine with a GPU
        loss_fns.sigmoid_focal_loss = _focal_loss_plain_off_gpu(loss_fns.sigmoid_focal_loss)
        _APPLIED.add("env")
    if torch.cuda.is_available():
        # sam3#530: the text encoder's forward runs under sdpa_kernel([MATH, EFFICIENT, FLASH]) but its
        # activation-checkpoint recompute does not, so torch picks cuDNN attention on recompute and
        # the first backward raises CheckpointError (torch 2.11, H100). Without cuDNN SDPA both
        # passes pick the same kernel; measured at no speed cost.
        torch.backends.cuda.enable_cudnn_sdp(False)
        return
    if "cpu" in _APPLIED:
        return
    from sam3.model.geometry_encoders import SequenceGeometryEncoder

    # sam3/model/geometry_encoders.py:659: unconditional .pin_memory() in box encoding.
    SequenceGeometryEncoder._encode_boxes = _without_pin_memory(  # type: ignore[method-assign]
        SequenceGeometryEncoder._encode_boxes
    )
    _APPLIED.add("cpu")
