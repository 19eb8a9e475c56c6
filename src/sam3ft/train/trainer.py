"""sam3's Trainer with three switches more: a single training process may skip the DDP wrapper, a
training step may read its loss values from the device once instead of once per loss term, and a
model whose training forward is compiled with CUDA graphs gets its first step eager."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from sam3.train.trainer import Trainer as Sam3Trainer
from sam3.train.utils.train_utils import AverageMeter, get_amp_type


def host_floats(values: Sequence[Any]) -> list[float]:
    """Python floats of scalar tensors and numbers, with a single device-to-host copy for all tensors.

    float64 on the way keeps each value exact (float32, bfloat16 and ints below 2**53 convert
    without rounding), so the floats equal `float(t.item())` of each tensor.
    """
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    device = tensors[0].device
    stacked = torch.stack([t.detach().reshape(()).to(device=device, dtype=torch.float64) for t in tensors])
    fetched = iter(stacked.tolist())  # the one wait for the device
    return [next(fetched) if isinstance(v, torch.Tensor) else float(v) for v in values]


class _HeldLogger:
    """Stands in for the trainer's logger during a step: tensor values wait in `held` (in call order)
    instead of each being read from the device by every logger; other values pass straight through."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.held: list[tuple[str, torch.Tensor, int]] = []

    def log(self, name: str, data: Any, step: int) -> None:
        if isinstance(data, torch.Tensor):
            self.held.append((name, data, step))
        else:
            self.logger.log(name, data, step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.logger, name)


class Trainer(Sam3Trainer):  # type: ignore[misc]  # sam3 ships no type information
    """sam3's Trainer plus

    - `ddp_one_process: false` leaves the model unwrapped when the run has one process.
      DDP with gradient_as_bucket_view allocates every gradient in its buckets when it wraps the model,
      so 4 B per trainable parameter (3.3 GB for the full model) sit in memory through the forward
      pass too; without it, gradients exist only from the backward pass on (set_to_none frees them).
      With one process DDP's all-reduce is an identity, so the numbers are the same.
    - `sync_once: true` reads a training step's loss, its loss terms and the logged scalars from the
      device in one copy, after the backward pass is queued. Upstream's step calls `.item()` on each
      (and its TensorBoard logger and our step logger read each logged tensor again): 293 of a full
      SAM3 step's 489 waits for the GPU. Same values, same logs in the same order, and a non-finite
      loss still stops training before the optimizer step. Measured on an H100 the step was not
      faster for it (1.443 -> 1.429 s, bench/gpu_recipes.md): these waits come after the backward,
      when little is queued.
    - `compile_model: true` goes with a model built with the same switch
      (`data.compile_training_forward`): the process's first training step runs eager, so sam3
      fills its lazy device caches outside any CUDA graph, and every later step tells CUDA graph
      trees where it begins (outputs of the previous step's graphs may then be overwritten).
    """

    logger: Any  # sam3's Logger; a _HeldLogger while a step runs

    def __init__(
        self,
        *,
        ddp_one_process: bool = True,
        sync_once: bool = False,
        compile_model: bool = False,
        **kwargs: Any,
    ) -> None:
        self.ddp_one_process = ddp_one_process
        self.sync_once = sync_once
        self.compile_model = compile_model
        self._eager_step_done = False
        super().__init__(**kwargs)

    def _setup_ddp_distributed_training(self, distributed_conf: Any, accelerator: str) -> None:
        if self.ddp_one_process or dist.get_world_size() > 1:
            super()._setup_ddp_distributed_training(distributed_conf, accelerator)
            return
        # the training loop calls model.no_sync() between accumulated micro-batches (trainer.py:936)
        self.model.no_sync = contextlib.nullcontext

    @contextlib.contextmanager
    def _step_stance(self) -> Iterator[None]:
        """With `compile_model`: the process's first training step runs eager (dynamo's force_eager
        stance), every later one is marked as a new step for CUDA graph trees; else nothing."""
        if not self.compile_model:
            yield
        elif not self._eager_step_done:
            with torch.compiler.set_stance("force_eager"):
                yield
            self._eager_step_done = True
        else:
            if torch.cuda.is_available():
                torch.compiler.cudagraph_mark_step_begin()
            yield

    def _run_step(
        self,
        batch: Any,
        phase: str,
        loss_mts: dict[str, AverageMeter],
        extra_loss_mts: dict[str, AverageMeter],
        raise_on_error: bool = True,
    ) -> None:
        """Upstream's forward/backward (sam3/train/trainer.py `_run_step`) under `_step_stance`;
        with `sync_once`, one device read per micro-batch: loss, extra loss terms and every tensor
        logged in `_step`, after the backward."""
        with self._step_stance():
            if not self.sync_once:
                super()._run_step(batch, phase, loss_mts, extra_loss_mts, raise_on_error)
                return
            self.optim.zero_grad(set_to_none=True)  # None, not 0: Adam would move weights on zero grads
            accum_steps = self.gradient_accumulation_steps
            if accum_steps > 1:
                if not isinstance(batch, list) or len(batch) != accum_steps:
                    raise ValueError(f"expected a list of {accum_steps} batches for gradient accumulation")
                chunks = batch
            else:
                chunks = [batch]
            amp = self.optim_conf.amp
            for i, chunk in enumerate(chunks):
                ddp_context = self.model.no_sync() if i < len(chunks) - 1 else contextlib.nullcontext()
                held = _HeldLogger(self.logger)
                self.logger = held
                try:
                    with ddp_context:
                        with torch.amp.autocast(
                            device_type="cuda", enabled=amp.enabled, dtype=get_amp_type(amp.amp_dtype)
                        ):
                            loss_dict, batch_size, extra_losses = self._step(chunk, self.model, phase)
                        ((loss_key, loss),) = loss_dict.items()
                        self.scaler.scale(loss).backward()
                finally:
                    self.logger = held.logger
                names = list(extra_losses)
                values = host_floats([loss, *extra_losses.values(), *(data for _, data, _ in held.held)])
                for (name, _, step), value in zip(held.held, values[1 + len(names) :], strict=True):
                    self.logger.log(name, value, step)  # upstream logs them before its finite check too
                if not math.isfinite(values[0]):
                    # upstream checks before the backward; the gradients of this step never reach a weight
                    self.optim.zero_grad(set_to_none=True)
                    message = f"Loss is {values[0]}, attempting to stop training"
                    logging.error(message)
                    if raise_on_error:
                        raise FloatingPointError(message)
                    return
                loss_mts[loss_key].update(values[0], batch_size)
                for name, value in zip(names, values[1 : 1 + len(names)], strict=True):
                    if name not in extra_loss_mts:
                        extra_loss_mts[name] = AverageMeter(name, self.device, ":.2e")
                    extra_loss_mts[name].update(value, batch_size)
