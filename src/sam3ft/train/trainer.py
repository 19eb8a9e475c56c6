"""sam3's Trainer with three switches more: a single training process may skip the DDP wrapper, a
training step may read its loss values from the device once instead of once per loss term, and a
model whose training forward is compiled with CUDA graphs gets its first step eager; and it keeps
the best validated epoch's checkpoint and stops early."""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sam3.train.trainer import Trainer as Sam3Trainer
from sam3.train.trainer import unwrap_ddp_if_wrapped
from sam3.train.utils.train_utils import AverageMeter, get_amp_type
from torch.utils.data import Sampler

from sam3ft.compile_cache import CompileLog
from sam3ft.errors import Sam3ftError
from sam3ft.preflight import GB
from sam3ft.train.ema import EMA_KEY, WeightEma
from sam3ft.train.optim import DeviceGradScaler, GradientClipper, InBackward
from sam3ft.train.run import STATS_FILES, read_stats
from sam3ft.train.select import BEST_CHECKPOINT, metric_curve, select_epoch
from sam3ft.train.transfer import unpack

log = logging.getLogger(__name__)


class HostFloats:
    """Python floats of scalar tensors and numbers, copied from the device in one copy that is queued
    now and read later (`get`), without waiting for work queued after it.

    float64 on the way keeps each value exact (float32, bfloat16 and ints below 2**53 convert
    without rounding), so the floats equal `float(t.item())` of each tensor.
    """

    def __init__(self, values: Sequence[Any]) -> None:
        # None where a tensor's value will be: no reference to the tensors is kept
        self.values = [None if isinstance(v, torch.Tensor) else float(v) for v in values]
        tensors = [v.detach().reshape(()) for v in values if isinstance(v, torch.Tensor)]
        self.event: torch.cuda.Event | None = None
        self.host: torch.Tensor | None = None
        if not tensors:
            return
        stacked = torch.stack([t.to(device=tensors[0].device, dtype=torch.float64) for t in tensors])
        if stacked.is_cuda:  # into pinned memory, so the copy joins the stream's queue
            self.host = torch.empty(stacked.shape, dtype=torch.float64, pin_memory=True)
            self.host.copy_(stacked, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = stacked

    def get(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()  # the one wait, for this copy only
        fetched = iter(self.host.tolist() if self.host is not None else [])
        return [next(fetched) if v is None else v for v in self.values]


@dataclass
class _Queued:
    """One micro-batch's loss, extra loss terms and held logs, on their way to the host."""

    loss_key: str
    batch_size: int
    names: list[str]  # of the extra loss terms
    held: list[tuple[str, int]]  # name and step of each held log
    values: HostFloats  # loss, extra terms, held logs


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


class ValShard(Sampler):  # type: ignore[type-arg]
    """This process's share of the validation items, each item in exactly one process: items
    rank, rank + world, ... Upstream's DistributedSampler pads the last round with items from the
    start so that every process gets as many, and those are evaluated twice (the prediction merge
    drops the copies, sam3/eval/coco_writer.py `gather_and_merge_predictions`). Validation makes no
    collective per step, so shares may differ by one item."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.size, self.rank, self.world = size, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))

    def set_epoch(self, epoch: int) -> None:
        """Same items every epoch (sam3's loader calls it on its sampler)."""


def checkpoint_bytes(checkpoint: Any) -> int:
    """Tensor bytes in a (nested) checkpoint: what torch.save will write, give or take metadata."""
    if isinstance(checkpoint, torch.Tensor):
        return checkpoint.numel() * checkpoint.element_size()
    if isinstance(checkpoint, dict):
        return sum(checkpoint_bytes(v) for v in checkpoint.values())
    if isinstance(checkpoint, (list, tuple)):
        return sum(checkpoint_bytes(v) for v in checkpoint)
    return 0


def keep_as(checkpoint: Path, kept: Path) -> None:
    """`kept` becomes a copy of `checkpoint`, atomically: a hard link where the filesystem has them
    (no bytes copied; the trainer replaces checkpoint.pt by a new file, so the link keeps the old
    content), else a copy."""
    tmp = kept.with_name(kept.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(checkpoint, tmp)
    except OSError:  # no hard links here (e.g. some network filesystems)
        shutil.copyfile(checkpoint, tmp)
    os.replace(tmp, kept)


class Trainer(Sam3Trainer):  # type: ignore[misc]  # sam3 ships no type information
    """sam3's Trainer plus

    - `ddp_one_process: false` leaves the model unwrapped when the run has one process.
      DDP with gradient_as_bucket_view allocates every gradient in its buckets when it wraps the model,
      so 4 B per trainable parameter (3.3 GB for the full model) sit in memory through the forward
      pass too; without it, gradients exist only from the backward pass on (set_to_none frees them).
      With one process DDP's all-reduce is an identity, so the numbers are the same.
    - `sync_once: true` reads a training step's loss, its loss terms and the logged scalars from the
      device in one copy, queued after the backward pass and read in the next step, once that
      step's forward is queued (its Hungarian matching waits for the GPU anyway), or at once in an
      epoch's last step. Upstream's step calls `.item()` on each (and its TensorBoard logger and
      our step logger read each logged tensor again): 293 of a full SAM3 step's 489 waits for the
      GPU, and the last of them leaves the GPU idle while the host clips, steps the optimizer and
      loads the next batch. Same values, same logs in the same order per step (a step's losses
      logged after its learning rates). A non-finite loss still stops training, one step later:
      before the next optimizer step and before any checkpoint, so no saved weight ever took it.
    - GradScaler and the gradient clipper hand their passes over the gradients to adamw_bf16 on its
      kernel, which unscales, checks for infs and clips inside its update (train/optim.py).
    - `compile_model: true` goes with a model built with the same switch
      (`train/model.compile_training_forward`): the process's first training step runs eager, so sam3
      fills its lazy device caches outside any CUDA graph, and every later step tells CUDA graph
      trees where it begins (outputs of the previous step's graphs may then be overwritten).
    - an optimizer that steps inside the backward pass (train/optim.py `InBackward`) gets its
      learning rates and weight decays from the schedulers before the backward (upstream sets them
      after it, just before its step), the gradient clipping's max norm (it clips per parameter),
      and no GradScaler: bf16 needs none, and the scaled gradients would be applied before any
      unscale or overflow check (params.Trainer refuses fp16 with it).
    - Python's cyclic garbage collector leaves the objects alive after the first training step
      alone (`_freeze_gc`).
    - each epoch and validation that compiled anything (compile_model, compile_trunk,
      compile_layers) logs what compiling took and how many graphs came from inductor's cache.
    - `select` (a validation metric, or `last`): after each validation, the best epoch's
      checkpoint is kept as best.pt beside checkpoint.pt, and `patience` validated epochs without
      improvement stop training (`_select_after_val`).
    - `ema_decay` > 0: an exponential moving average of the weights (train/ema.py), updated after
      every optimizer step, is what validation scores (so `select` picks by it) and is saved in
      each checkpoint under "ema" (a resume continues it).
    """

    logger: Any  # sam3's Logger; a _HeldLogger while a step runs
    scaler: Any  # torch's GradScaler
    gradient_clipper: Any  # ours (train/optim.py), None without clipping
    # EMA off until __init__ says otherwise: the checkpoint and optimizer hooks read these
    ema_decay: float = 0.0
    ema: WeightEma | None = None
    _resumed_ema: dict[str, Any] | None = None
    _epoch_steps = 0  # training steps of this epoch (train_epoch's loader length); 0: outside one
    _data_iter = 0  # the training step of this epoch that runs next

    def __init__(
        self,
        *,
        ddp_one_process: bool = True,
        sync_once: bool = False,
        compile_model: bool = False,
        select: str = "last",
        min_delta: float = 0.0,
        patience: int = 0,
        ema_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.ema_decay = ema_decay
        self.ema: WeightEma | None = None  # made once the weights are loaded (load_checkpoint)
        self._resumed_ema: dict[str, Any] | None = None
        self.select = select
        self.min_delta = min_delta
        self.patience = patience
        self._validated_epoch: int | None = None  # the epoch this process last validated
        self.ddp_one_process = ddp_one_process
        self.sync_once = sync_once
        self.compile_model = compile_model
        self._eager_step_done = False
        self._gc_frozen = False  # see _freeze_gc
        self._queued: list[_Queued] = []  # the previous step's values (sync_once)
        self._steps_left = 0  # in this epoch; 0: read each step's values at its end
        self._compile_log = CompileLog()
        super().__init__(**kwargs)

    def _setup_dataloaders(self) -> None:
        """Upstream's loaders; under DDP each validation item goes to one process (`ValShard`),
        unless there are fewer items than processes: DDP's first forward after training
        broadcasts the module's buffers, so every process must run at least one validation step."""
        super()._setup_dataloaders()
        world = dist.get_world_size() if dist.is_initialized() else 1
        val = self.val_dataset
        if world > 1 and val is not None and val.sampler is not None and len(val.dataset) >= world:
            val.sampler = ValShard(len(val.dataset), dist.get_rank(), world)

    def _setup_components(self) -> None:
        super()._setup_components()
        # the same GradScaler, but one that leaves unscaling to an optimizer able to do it in its update
        self.scaler = DeviceGradScaler(self.device, enabled=self.scaler.is_enabled())

    def _construct_optimizers(self) -> None:
        super()._construct_optimizers()
        if isinstance(self.gradient_clipper, GradientClipper):  # it may hand the clipping to the optimizer
            self.gradient_clipper.optimizer = self.optim.optimizer
        if self.ema_decay > 0:  # torch runs step post-hooks only after a step that happened
            self.optim.optimizer.register_step_post_hook(self._update_ema)
        if isinstance(self.optim.optimizer, InBackward):
            self.scaler = DeviceGradScaler(self.device, enabled=False)  # scale() and step() pass through
            # each gradient is gone by the time upstream's clipper would run: it clips per parameter
            if self.gradient_clipper is not None and self.gradient_clipper.max_norm is not None:
                self.optim.optimizer.max_norm = float(self.gradient_clipper.max_norm)
            self.gradient_clipper = None

    def _schedule_before_backward(self) -> None:
        """For an optimizer stepping in the backward: the lr and weight decay upstream's train_epoch
        sets after this step's backward (sam3/train/trainer.py `train_epoch`, the same `where` and
        `step`), set before it; upstream's call after the backward then sets the same values again."""
        if self._epoch_steps == 0 or not isinstance(self.optim.optimizer, InBackward):
            return
        exact_epoch = self.epoch + float(self._data_iter) / self._epoch_steps
        where = float(exact_epoch) / self.max_epochs
        if where < 1.0:
            self.optim.step_schedulers(where, step=int(exact_epoch * self._epoch_steps))

    def _update_ema(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.ema is not None:
            self.ema.update(unwrap_ddp_if_wrapped(self.model))

    def load_checkpoint(self) -> None:
        """Upstream's (initial weights, or a resume), then the EMA: started from the loaded weights,
        or continued from the resumed checkpoint's."""
        super().load_checkpoint()
        if self.ema_decay > 0:
            self.ema = WeightEma(unwrap_ddp_if_wrapped(self.model), self.ema_decay)
            if self._resumed_ema is not None:
                self.ema.load_state_dict(self._resumed_ema)
                self._resumed_ema = None

    def _load_resuming_checkpoint(self, ckpt_path: str) -> None:
        super()._load_resuming_checkpoint(ckpt_path)
        if self.ema_decay > 0:
            saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            if EMA_KEY not in saved:
                raise Sam3ftError(
                    f"{ckpt_path} has no EMA weights but trainer.ema_decay is {self.ema_decay}",
                    fix=f"delete {Path(ckpt_path).parent.parent} to train from the start",
                )
            self._resumed_ema = saved[EMA_KEY]

    def _save_checkpoint(self, checkpoint: dict[str, Any], checkpoint_path: str) -> None:
        """Upstream's save through a temporary file, moved over the old checkpoint in one atomic
        `os.replace`. Upstream removes the old checkpoint before moving the new one in
        (sam3/train/trainer.py:381), so a kill between the two left no checkpoint at all. A write
        that fails removes its partial temporary file; on a full disk the error says how much space
        is needed. The previous checkpoint is untouched either way, so the next run resumes from it."""
        if self.ema is not None:
            checkpoint = {**checkpoint, EMA_KEY: self.ema.state_dict()}
        tmp = Path(f"{checkpoint_path}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as exc:
            tmp.unlink(missing_ok=True)
            need, free = checkpoint_bytes(checkpoint) / GB, shutil.disk_usage(tmp.parent).free / GB
            # torch's zip writer reports a full disk as RuntimeError ("unexpected pos ..."), not ENOSPC
            if getattr(exc, "errno", None) != errno.ENOSPC and free >= need:
                raise
            raise Sam3ftError(
                f"disk full while writing {checkpoint_path}: it needs ~{need:.2f} GB, {free:.2f} GB free; "
                "the previous checkpoint is intact",
                fix=f"free at least {max(need - free, 0.01):.2f} GB on {tmp.parent}, then `dvc repro` "
                "resumes from it",
            ) from exc
        os.replace(tmp, checkpoint_path)

    def run_val(self) -> None:
        """Upstream's validation, then (with `select`) the best checkpoint kept and early stopping.
        An epoch this process validated already is not validated again: after an early stop,
        upstream's `run` validates the epoch its loop ended on once more."""
        if self._validated_epoch == self.epoch:
            return
        if self.ema is None:
            super().run_val()
        else:
            with self.ema.swapped_in(unwrap_ddp_if_wrapped(self.model)):
                super().run_val()
        self._validated_epoch = self.epoch
        self._log_compiling(f"epoch {self.epoch}'s validation")
        if self.select != "last":
            self._select_after_val()

    def _select_after_val(self) -> None:
        """Decide from the logged validation curve up to this epoch (logs survive a kill, so a resumed
        run, which re-validates the epoch of its checkpoint, decides as the unbroken run): when this
        epoch is the best, checkpoint.pt (saved before this validation, so it holds exactly the
        validated weights) becomes best.pt; when `patience` epochs brought no improvement, the loop's
        bound drops to this epoch, so upstream's `run_train` ends after it. Rank 0 decides (it alone
        writes logs and checkpoints) and tells the other ranks."""
        decision = [False]
        if self.distributed_rank == 0:
            stats = read_stats(Path(self.logging_conf.log_dir), STATS_FILES[1])  # val_stats.json
            curve = [point for point in metric_curve(stats, self.select) if point[0] <= self.epoch]
            chosen = select_epoch(curve, self.min_delta, self.patience)
            if chosen.epoch == self.epoch:
                folder = Path(self.checkpoint_conf.save_dir)
                keep_as(folder / "checkpoint.pt", folder / BEST_CHECKPOINT)
            decision = [chosen.stop]
            if chosen.stop:
                logging.info(
                    "early stop after epoch %d: %s has not improved by more than %g for %d epochs "
                    "(best %.4f at epoch %d)",
                    self.epoch,
                    self.select,
                    self.min_delta,
                    self.patience,
                    chosen.value,
                    chosen.epoch,
                )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(decision, src=0)
        if decision[0]:
            self.max_epochs = self.epoch + 1

    def _step(self, batch: Any, model: torch.nn.Module, phase: str) -> Any:
        """Upstream's step on the batch unpacked onto the device (our collate packs it: one copy)."""
        return super()._step(unpack(batch, self.device), model, phase)

    def train_epoch(self, train_loader: Any) -> Any:
        self._steps_left = self._epoch_steps = len(train_loader)
        self._data_iter = 0
        try:
            out = super().train_epoch(train_loader)
        finally:
            self._steps_left = self._epoch_steps = 0
        if isinstance(self.optim.optimizer, InBackward):  # no GradScaler skipped its non-finite steps
            self.optim.optimizer.check_skipped(len(train_loader), self.epoch)
        elif isinstance(self.scaler, DeviceGradScaler):
            self.scaler.check_skipped(len(train_loader), self.epoch)
        self._log_compiling(f"epoch {self.epoch}'s training")
        return out

    def _log_compiling(self, what: str) -> None:
        """On the terminal: our logger goes to the stage's handlers (sam3's root logger, which
        `logging.info` reaches, shows warnings only there)."""
        spent = self._compile_log.since_last()
        if spent is not None:
            log.info("%s: compiling took %s", what, spent)

    def _setup_ddp_distributed_training(self, distributed_conf: Any, accelerator: str) -> None:
        if self.ddp_one_process or dist.get_world_size() > 1:
            super()._setup_ddp_distributed_training(distributed_conf, accelerator)
            return
        # the training loop calls model.no_sync() between accumulated micro-batches (trainer.py:936)
        self.model.no_sync = contextlib.nullcontext

    @contextlib.contextmanager
    def _step_stance(self) -> Iterator[None]:
        """With `compile_model`: the process's first training step runs eager (dynamo's force_eager
        stance), every later one is marked as a new step for CUDA graph trees. After the first step
        that ran as every later one will (compiled or eager): `_freeze_gc`."""
        if not self.compile_model:
            yield
        elif not self._eager_step_done:
            with torch.compiler.set_stance("force_eager"):
                yield
            self._eager_step_done = True
            return  # the next step compiles
        else:
            if torch.cuda.is_available():
                torch.compiler.cudagraph_mark_step_begin()
            yield
        if not self._gc_frozen:
            self._freeze_gc()

    def _freeze_gc(self) -> None:
        """After the process's first training step (with `compile_model`: its first compiled one):
        collect, then move every object alive into gc's permanent generation until `run` ends. The
        imports, the model, the loaders and dynamo's graphs are all alive by then and stay alive,
        and each generation-2 collection walked them all again: 0.55-1.8 s pauses inside eager
        training steps on the H200 (bench/LOG.md)."""
        gc.collect()
        gc.freeze()
        self._gc_frozen = True

    def run(self) -> None:
        """Upstream's run; the objects `_freeze_gc` froze are collectable again after it."""
        try:
            super().run()
        finally:
            if self._gc_frozen:
                gc.unfreeze()
                self._gc_frozen = False

    def _run_step(
        self,
        batch: Any,
        phase: str,
        loss_mts: dict[str, AverageMeter],
        extra_loss_mts: dict[str, AverageMeter],
        raise_on_error: bool = True,
    ) -> None:
        """Upstream's forward/backward (sam3/train/trainer.py `_run_step`) under `_step_stance`;
        with `sync_once`, one device read per step: loss, extra loss terms and every tensor logged
        in `_step`, queued after the backward, read after the next step's forward."""
        self._schedule_before_backward()
        self._data_iter += 1
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
            queued: list[_Queued] = []
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
                        if i == 0:  # the previous step's values, copied by now (floats: the held
                            # logger passes them straight on)
                            self._read_queued(loss_mts, extra_loss_mts)
                        self.scaler.scale(loss).backward()
                finally:
                    self.logger = held.logger
                values = HostFloats([loss, *extra_losses.values(), *(data for _, data, _ in held.held)])
                logs = [(name, step) for name, _, step in held.held]
                queued.append(_Queued(loss_key, batch_size, list(extra_losses), logs, values))
            self._queued = queued
            self._steps_left -= 1
            # at once: in an epoch's last step, outside train_epoch, and where a non-finite loss
            # must skip the step without stopping
            if self._steps_left <= 0 or not raise_on_error:
                self._read_queued(loss_mts, extra_loss_mts, raise_on_error)

    def _read_queued(
        self,
        loss_mts: dict[str, AverageMeter],
        extra_loss_mts: dict[str, AverageMeter],
        raise_on_error: bool = True,
    ) -> None:
        """Log the queued step's values and add them to the meters; a non-finite loss raises, or
        with `raise_on_error` false drops the step's gradients (upstream skips its backward)."""
        queued, self._queued = self._queued, []
        for each in queued:
            values = each.values.get()
            for (name, step), value in zip(each.held, values[1 + len(each.names) :], strict=True):
                self.logger.log(name, value, step)  # upstream logs them before its finite check too
            if not math.isfinite(values[0]):
                # the gradients of a step read at its end never reach a weight; of a step read in
                # the next one, they did, and training stops before the next optimizer step
                self.optim.zero_grad(set_to_none=True)
                message = f"Loss is {values[0]}, attempting to stop training"
                logging.error(message)
                if raise_on_error:
                    raise FloatingPointError(message)
                return
            loss_mts[each.loss_key].update(values[0], each.batch_size)
            for name, value in zip(each.names, values[1 : 1 + len(each.names)], strict=True):
                if name not in extra_loss_mts:
                    extra_loss_mts[name] = AverageMeter(name, self.device, ":.2e")
                extra_loss_mts[name].update(value, each.batch_size)
