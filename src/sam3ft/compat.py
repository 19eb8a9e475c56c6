"""Runtime workarounds for sam3 0.1.4 quirks, applied in our process only (site-packages untouched).

Each patch names the sam3 file and line it works around. All are idempotent.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

_APPLIED: set[str] = set()
# words of a variable name (split at "_") that mark its value as a credential
SECRET_WORDS = {"TOKEN", "SECRET", "KEY", "APIKEY", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS"}
SECRET_WORDS |= {"AUTH", "SESSION", "SAS", "CONNECTION"}  # Azure's SAS tokens, connection strings


def is_secret_name(name: str) -> bool:
    """Environment variable names whose values must never be written anywhere: HF_TOKEN,
    AWS_SECRET_ACCESS_KEY, ... by whole words, so TOKENIZERS_PARALLELISM or AWS_CA_BUNDLE are not."""
    words = name.upper().split("_")
    return any(w in SECRET_WORDS or w.endswith(("TOKEN", "SECRET", "PASSWORD")) for w in words)


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


def _console_warnings_only(setup: Callable[..., Any]) -> Callable[..., Any]:
    """sam3/train/utils/logger.py:185 `setup_logging` prints every INFO line (the model summary:
    hundreds of lines) to stdout, and makes its logger the new root after emptying the old root's
    handlers. Here the console shows warnings only, the log file keeps everything, and the stage's
    own handlers (`[train] ...` lines) are put back on the root our loggers propagate to."""

    @functools.wraps(setup)
    def wrapper(name: str, *args: Any, **kwargs: Any) -> Any:
        ours = logging.Logger.root  # the root our module loggers hang under
        handlers = list(ours.handlers)
        result = setup(name, *args, **kwargs)
        sam3_logger = logging.getLogger(name)
        sam3_logger.propagate = False  # its lines go to its own handlers, not to ours as well
        for handler in sam3_logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr):
                handler.setStream(sys.__stderr__)  # the terminal, also while stdout goes to a file
                handler.setLevel(max(handler.level, logging.WARNING))
        ours.handlers = handlers
        return result

    return wrapper


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


def _focal_loss_plain_where_kernel_fails(focal: Callable[..., Any]) -> Callable[..., Any]:
    """sam3/train/loss/loss_fns.py:126 defaults to a Triton kernel; use the PyTorch branch off-GPU,
    and with gamma 0 everywhere: the kernel's backward (sam3/train/loss/sigmoid_focal_loss.py:142)
    takes (1 - p_t) ** (gamma - 1), which is 1/0 once the sigmoid of a correct prediction rounds
    to 1, so a confident presence logit (`presence_gamma` 0, |logit| > ~17) gets a nan gradient
    (sam3#575); PyTorch's pow gives exponent 0 a zero derivative."""
    gamma_default = inspect.signature(focal).parameters["gamma"].default

    @functools.wraps(focal)
    def wrapper(inputs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        gamma = args[3] if len(args) > 3 else kwargs.get("gamma", gamma_default)
        if not inputs.is_cuda or gamma == 0:
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


def apply(training: bool = True) -> None:
    """Install every workaround that applies to this machine; `training=False`: only those inference
    needs, without importing sam3's trainer and losses (about a second of imports, torchmetrics, scipy)."""
    if training and "env" not in _APPLIED:
        import sam3.train.trainer as trainer_module
        from sam3.train.loss import loss_fns
        from sam3.train.utils import train_utils

        trainer_module.log_env_variables = log_env_names_only  # type: ignore[attr-defined]
        trainer_module.setup_logging = _console_warnings_only(trainer_module.setup_logging)  # type: ignore[attr-defined]
        train_utils.MemMeter.update = _mem_meter_update  # type: ignore[method-assign]
        # per call: CPU tensors take the PyTorch branch, also on a machine with a GPU
        loss_fns.sigmoid_focal_loss = _focal_loss_plain_where_kernel_fails(loss_fns.sigmoid_focal_loss)
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
