"""Optimizers the trainer config can name (`trainer.optimizer`), built by sam3's construct_optimizer.

- adamw: torch AdamW as upstream's recipe uses it (foreach on CUDA: fast, but its temporaries
  cost up to one copy of the largest parameter group at step time).
- adamw_fused: torch AdamW with the fused kernel (same math, no group-sized temporaries, fewer launches).
- adamw_bf16: AdamW keeping both moments in bfloat16 with stochastic rounding; fp32 master weights
  and fp32 update math. Halves optimizer memory (6.7 -> 3.4 GB for the full model). On CUDA cards
  with native bf16 one Triton kernel launch per step does the update (train/adamw_kernel.py);
  elsewhere torch ops.
- adamw_in_backward, adamw_bf16_in_backward: the same math per parameter, stepped inside the
  backward pass as each gradient is produced, which is then freed (`InBackward`): no gradient of
  the whole model is ever held. Clipping scales each gradient by the factor the previous
  backward's global norm gives (`InBackward.clip`); no accumulation or fp16 GradScaler
  (params.Trainer refuses them).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from sam3.train.optim.optimizer import GradientClipper as Sam3GradientClipper
from sam3.train.optim.schedulers import InverseSquareRootParamScheduler
from torch.amp.grad_scaler import OptState

from sam3ft.params import IN_BACKWARD, OPTIMIZERS  # the names params.yaml accepts; each one is built below

CHUNK = 1 << 24  # elements per update bucket: fp32 temporaries of 64 MB each


def make_optimizer(params: Iterable[Any], kind: str, seed: int = 0) -> torch.optim.Optimizer:
    """The optimizer `kind` over sam3's param groups (lr and weight decay come from its schedulers)."""
    if kind == "adamw":
        return torch.optim.AdamW(params)
    if kind == "adamw_fused":
        return torch.optim.AdamW(params, fused=True)
    if kind == "adamw_bf16":
        return AdamWBf16(params, seed=seed)
    if kind in OPTIMIZERS and kind.endswith(IN_BACKWARD):
        return InBackward(params, kind.removesuffix(IN_BACKWARD), seed=seed)
    raise ValueError(f"unknown optimizer {kind!r}; expected one of {OPTIMIZERS}")


class InBackward(torch.optim.Optimizer):
    """The optimizer `kind` stepped per parameter inside the backward pass, as torchtune's
    optimizer-in-backward: a post-accumulate-grad hook on each parameter steps that parameter's own
    `kind` optimizer as soon as its gradient is complete, then frees the gradient. Gradient memory
    is one parameter's gradient at a time (plus what autograd holds in flight), not the model's.

    This object holds sam3's param groups, so its schedulers set lr and weight decay here as
    usual; each hook copies its group's values into the parameter's optimizer before stepping.
    Schedulers must therefore run before the backward pass (our Trainer does).

    With `max_norm` (the trainer hands over trainer.grad_clip) the global norm over all gradients
    never exists while a weight steps, so `clip` picks what stands in for it:
    - "lagged" (default): every gradient scaled by min(1, max_norm / the previous backward's global
      norm), summed on the device from each unclipped finite gradient as its hook runs; the first
      backward of a run clips as "budget" (a checkpoint keeps the factor for a resume).
    - "budget": each gradient clipped to max_norm x sqrt(its share of the trainable elements),
      which bounds the global norm by max_norm as global clipping does, each tensor on its own.
    - "tensor": each gradient clipped to max_norm on its own; the global norm may reach
      max_norm x sqrt(number of tensors).
    `step` is a no-op for the weights (they moved in the backward) and closes a "lagged"
    backward's norm, so the trainer's scaler.step and step hooks (EMA) run unchanged. The
    per-parameter states live in this optimizer's `state`, so `state_dict` and `load_state_dict`
    are torch's, and a checkpoint has the layout of the ordinary optimizer's.
    adamw_bf16's rounding noise comes from a seed per parameter here (its position in the groups),
    not per bucket: the same distribution, other draws than the whole-model step. A hook fires once
    per backward call, so every weight's gradient must be complete in one: sam3's activation
    checkpointing is non-reentrant (a reentrant checkpoint's inner backward would step a weight on
    a partial gradient).
    """

    HYPER = ("lr", "weight_decay")  # what sam3's schedulers set per group and step
    CLIPS = ("lagged", "budget", "tensor")
    clip = "lagged"  # see the class docstring

    def __init__(self, params: Iterable[Any], kind: str, seed: int = 0) -> None:
        super().__init__(params, {"lr": 1e-3, "weight_decay": 1e-2})  # both set by sam3's schedulers
        self.kind = kind
        self.max_norm: float | None = None  # per-parameter gradient clipping; None: off
        # how many weight updates a non-finite gradient skipped (a device scalar; None: none ran yet)
        self.skipped: torch.Tensor | None = None
        # each trainable weight's optimizer and the index of its group (load_state_dict replaces
        # the group dicts, so the hooks look them up)
        self._inner: dict[torch.Tensor, tuple[torch.optim.Optimizer, int]] = {}
        self._sumsq: torch.Tensor | None = None  # "lagged": this backward's squared global norm so far
        self._scale: torch.Tensor | None = None  # "lagged": the clip factor from the previous backward
        for at, group in enumerate(self.param_groups):
            for param in group["params"]:
                if not param.requires_grad:
                    continue
                index = len(self._inner)
                hyper = {k: v for k, v in group.items() if k != "params"}
                inner = make_optimizer([{"params": [param], **hyper}], kind, seed=seed * 1_000_003 + index)
                inner.state = self.state  # one state dict: the per-parameter states are this one's
                self._inner[param] = (inner, at)
                param.register_post_accumulate_grad_hook(self._step_param)
        total = sum(param.numel() for param in self._inner)
        self._share = {param: math.sqrt(param.numel() / total) for param in self._inner}

    @torch.no_grad()
    def _step_param(self, param: torch.Tensor) -> None:
        inner, at = self._inner[param]
        inner_group, group = inner.param_groups[0], self.param_groups[at]
        for key in self.HYPER:
            inner_group[key] = group[key]
        # a gradient with an inf or nan leaves its weight and moments as they were, as GradScaler
        # skips a whole step for one (no scaler runs here); handed to the step as GradScaler hands
        # its found_inf: on the device for the kernel, read on the host by the torch-ops path
        assert param.grad is not None  # the hook runs once the gradient is complete
        found_inf = (~torch.isfinite(param.grad).all()).float()
        self.skipped = found_inf if self.skipped is None else self.skipped + found_inf
        if self.max_norm is not None:
            self._clip_grad(param, found_inf)
        if isinstance(inner, AdamWBf16):
            inner.found_inf = found_inf  # type: ignore[attr-defined]
            try:
                inner.step()
            finally:
                del inner.found_inf  # type: ignore[attr-defined]
        elif not found_inf.item():  # torch's AdamW reads no found_inf: a host check
            inner.step()
        param.grad = None

    def _clip_grad(self, param: torch.Tensor, found_inf: torch.Tensor) -> None:
        assert self.max_norm is not None and param.grad is not None and self.clip in self.CLIPS
        grad = param.grad
        if self.clip == "tensor":
            torch.nn.utils.clip_grad_norm_([param], max_norm=self.max_norm)
            return
        if self.clip == "lagged":  # this gradient's share of the global norm, left out when not finite
            norm = torch.linalg.vector_norm(grad, dtype=torch.float32)  # no float32 copy of the gradient
            square = (norm * norm).masked_fill(found_inf.bool(), 0.0)
            self._sumsq = square if self._sumsq is None else self._sumsq + square
            if self._scale is not None:
                grad.mul_(self._scale.to(grad.dtype))
                return
        torch.nn.utils.clip_grad_norm_([param], max_norm=self.max_norm * self._share[param])

    SKIPPED_LIMIT = 0.01  # share of an epoch's weight updates that may be skipped before training stops

    def check_skipped(self, steps: int, epoch: int) -> None:
        """After an epoch of `steps` training steps: how many weight updates a non-finite gradient
        skipped (one host read), logged when any were; more than SKIPPED_LIMIT of them stops training
        with FloatingPointError, before the epoch's checkpoint, as a non-finite loss does."""
        skipped, self.skipped = (0 if self.skipped is None else int(self.skipped)), None
        if not skipped:
            return
        updates = steps * len(self._inner)
        message = (
            f"epoch {epoch}: {skipped} of {updates} weight updates ({skipped / updates:.1%}) skipped on "
            f"non-finite gradients by trainer.optimizer {self.kind}{IN_BACKWARD}"
        )
        if skipped <= self.SKIPPED_LIMIT * updates:
            logging.warning(message)
            return
        raise FloatingPointError(
            f"{message}; training stopped. Use an optimizer stepping after the backward pass (recipe "
            "lean: GradScaler then skips a whole step on one non-finite gradient); docs/training.md "
            "says where the in-backward recipes stand"
        )

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Every parameter with a gradient stepped in the backward pass; with "lagged" clipping its
        global norm gives the next backward's clip factor (on the device, as clip_grad_norm_'s)."""
        if self._sumsq is not None:
            assert self.max_norm is not None
            self._scale = (self.max_norm / (self._sumsq.sqrt() + 1e-6)).clamp(max=1.0)
            self._sumsq = None
        return closure() if closure is not None else None

    def state_dict(self) -> dict[str, Any]:
        """torch's, plus the "lagged" clip factor the next backward uses, so a resume clips as the
        unbroken run would."""
        saved = super().state_dict()
        if self._scale is not None:
            saved["clip_scale"] = self._scale
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        scale = state_dict.pop("clip_scale", None)
        if scale is not None:
            self._scale = scale.to(next(iter(self._inner)).device)
        super().load_state_dict(state_dict)  # replaces self.state: point the inner ones at it again
        for inner, _ in self._inner.values():
            inner.state = self.state
            if isinstance(inner, AdamWBf16):
                inner._layout = None
        if self.kind == "adamw_bf16":
            _restore_bf16_state(self.state)


class GradientClipper(Sam3GradientClipper):  # type: ignore[misc]  # sam3 ships no type information
    """sam3's GradientClipper (clip_grad_norm_ over the model's gradients) over the trainable
    parameters listed at the first call instead of walking `model.parameters()` at every step:
    for the full model that walk visits ~3000 modules, host time in every step while the GPU
    waits. Same tensors in the same order, the same norm."""

    optimizer: torch.optim.Optimizer | None = None  # set by our Trainer: one that may clip in its step

    def __call__(self, model: torch.nn.Module) -> None:
        if self.max_norm is None:
            return
        if getattr(self, "_model", None) is not model:
            self._model = model
            self._params = [p for p in model.parameters() if p.requires_grad]
        handover = getattr(self.optimizer, "clip_on_device", None)
        if self.norm_type == 2 and handover is not None and handover(self.max_norm, self._params):
            return  # adamw_bf16's kernel clips as it updates: no pass over the gradients here
        torch.nn.utils.clip_grad_norm_(self._params, max_norm=self.max_norm, norm_type=self.norm_type)


class InverseSquareRootSchedule(InverseSquareRootParamScheduler):  # type: ignore[misc]  # untyped
    """sam3's inverse-square-root learning-rate schedule with linear warmup and cooldown, the same
    value at every step, without the division that crashes a run whose step count equals
    `warmup_steps`: upstream computes a `progress` it never uses, dividing by
    (total steps - warmup_steps) (sam3/train/optim/schedulers.py:24). Say 24 training images,
    `batch_size: 6`, `max_epochs: 1` and `warmup_steps: 4`: ZeroDivisionError at the second step."""

    def __call__(self, step: int, where: float) -> float:
        total_steps = step / where if where > 0 else 1
        lr = float(self.base_lr)
        if self.warmup_steps < step:
            lr /= math.sqrt((step + self.timescale - self.warmup_steps) / self.timescale)
        if self.warmup_steps:
            lr *= min(1.0, step / self.warmup_steps)
        if self.cooldown_steps:
            lr *= min(1.0, (total_steps - step) / self.cooldown_steps)
        return lr


class DeviceGradScaler(torch.amp.GradScaler):
    """torch's GradScaler, whose unscale_ leaves the division by the scale and the inf check to an
    optimizer that does both inside its update (`unscale_on_device`: adamw_bf16 on its kernel), instead
    of a pass over every gradient with per-tensor host work. Its found_inf is written by that step,
    before `update` reads it; other optimizers are unscaled as torch does. `update` also counts the
    steps it skipped on non-finite gradients, on the device (`check_skipped` reads them per epoch)."""

    skipped: torch.Tensor | None = None  # steps skipped since the last check_skipped; None: none ran

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        if self._enabled and new_scale is None:
            states = self._per_optimizer_states.values()
            found = [f for state in states for f in state["found_inf_per_device"].values()]
            if found:  # torch's update raises on none; the same found_inf values it reads
                assert self._scale is not None  # set by the scale() this step began with
                hit = torch.stack([f.to(self._scale.device) for f in found]).sum().gt(0).float()
                self.skipped = hit if self.skipped is None else self.skipped + hit
        super().update(new_scale)

    def check_skipped(self, steps: int, epoch: int) -> None:
        """After an epoch of `steps` training steps: a warning naming how many steps GradScaler
        skipped on non-finite gradients (one host read), so a run that stopped learning says so."""
        skipped, self.skipped = (0 if self.skipped is None else int(self.skipped)), None
        if skipped:
            logging.warning(
                "epoch %d: %d optimizer steps (of %d batches) skipped on non-finite gradients "
                "(GradScaler's scale now %g); a run skipping most steps learns nothing",
                epoch,
                skipped,
                steps,
                float(self.get_scale()),
            )

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        handover = getattr(optimizer, "unscale_on_device", None)
        if not self._enabled or handover is None:
            super().unscale_(optimizer)
            return
        state = self._per_optimizer_states[id(optimizer)]
        scale = self._scale
        if state["stage"] is not OptState.READY or scale is None:
            super().unscale_(optimizer)  # torch's, with its errors for a second call
            return
        self._check_scale_growth_tracker("unscale_")
        inv_scale = scale.double().reciprocal().float()  # as torch computes it
        found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
        if not handover(inv_scale, found_inf):
            super().unscale_(optimizer)
            return
        state["found_inf_per_device"] = {found_inf.device: found_inf}
        state["stage"] = OptState.UNSCALED


def kernel_by_default(device: torch.device) -> bool:
    """Whether adamw_bf16 uses its Triton kernel on `device` unless told: CUDA cards with native
    bf16 (compute capability 8.0 on, where it was measured); older ones (a T4) keep torch ops."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator) -> None:
    """Write fp32 `src` into bf16 `dst`, rounding up with probability equal to the dropped fraction.

    Round-to-nearest would freeze the second moment: v * 0.999 is v again in bf16 (8-bit mantissa),
    so it could only grow. Stochastic rounding keeps every update right in expectation.
    """
    bits = src.view(torch.int32)
    noise = torch.randint(0, 1 << 16, src.shape, device=src.device, dtype=torch.int32, generator=generator)
    # adding noise to the low 16 bits then truncating them = rounding up with the dropped share
    dst.copy_(((bits + noise) & -65536).view(torch.float32))


@dataclass
class _Handover:
    """What GradScaler.unscale_ (through DeviceGradScaler) and the clipper left to the next step."""

    inv_scale: torch.Tensor | None = None  # multiplies every gradient
    found_inf: torch.Tensor | None = None  # GradScaler's, for the step to write
    max_norm: float | None = None  # clip the unscaled gradients to this L2 norm
    on_kernel: bool | None = None  # whether every weight with a gradient updates in the kernel

    @property
    def active(self) -> bool:
        return self.inv_scale is not None or self.max_norm is not None


class AdamWBf16(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with bf16 moments and fp32 update math.
    bf16 weights (trainer.weight_dtype) take the new weight computed in fp32 and rounded onto bf16
    stochastically, as the moments are (torch ops; the Triton kernel updates fp32 weights only).

    The parameters of a group are updated in flat buckets of up to CHUNK elements (pieces of
    bigger tensors, whole small ones side by side): a few dozen kernels per bucket instead of
    ~18 per tensor, and fp32 temporaries bounded by the bucket size. Moments stay one bf16
    tensor per parameter, so checkpoints look like torch's AdamW state.

    The rounding noise comes from (seed, step, bucket), so a run resumed from a checkpoint draws
    the same noise as an unbroken one.

    GradScaler (sam3's trainer enables it under bf16 autocast too) hands this optimizer its
    `found_inf` and `grad_scale` as device tensors (`_step_supports_amp_scaling`), as it does to
    torch's fused AdamW, instead of reading found_inf on the host before every step. The kernel
    skips the update on the device; a skipped step still counts in the bias correction (torch's
    fused AdamW takes it back on the device; the counts here live on the host).
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        seed: int = 0,
        kernel: bool | None = None,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.seed = seed
        self.kernel = kernel  # the Triton update; None: where kernel_by_default says
        self._generators: dict[torch.device, torch.Generator] = {}
        self._layout: Any = None  # the kernel's launch tables for the weights of the last step
        self._handed = _Handover()  # what GradScaler and the clipper left to this step
        self._clip_params: tuple[int, bool] | None = None  # (id of the clipper's list, same weights)

    def _seed(self, step: int, index: int) -> int:
        return (self.seed * 1_000_003 + step) * 100_003 + index

    def _generator(self, device: torch.device, step: int, index: int) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device].manual_seed(self._seed(step, index))

    def _all_on_kernel(self) -> bool:
        """Whether every weight with a gradient updates in the kernel (and some do); asked once a step."""
        if self._handed.on_kernel is None:
            groups = [g for g in self.param_groups if any(p.grad is not None for p in g["params"])]
            self._handed.on_kernel = bool(groups) and all(self._use_kernel(g) for g in groups)
        return self._handed.on_kernel

    def unscale_on_device(self, inv_scale: torch.Tensor, found_inf: torch.Tensor) -> bool:
        """Take over GradScaler.unscale_ (DeviceGradScaler asks): the next step multiplies every
        gradient by `inv_scale` inside the update and writes `found_inf` (1: some gradient is not
        finite, the step skipped). Only where every weight updates in the kernel."""
        if not self._all_on_kernel():
            return False
        self._handed.inv_scale, self._handed.found_inf = inv_scale, found_inf
        return True

    def clip_on_device(self, max_norm: float, params: list[torch.Tensor]) -> bool:
        """Take over clip_grad_norm_(params, max_norm) with the L2 norm: the next step clips inside
        the update. Only where `params` are this optimizer's trainable weights (then the norm is over
        the same gradients) and every weight with a gradient updates in the kernel."""
        if self._clip_params is None or self._clip_params[0] != id(params):
            mine = {id(p) for g in self.param_groups for p in g["params"] if p.requires_grad}
            self._clip_params = (id(params), mine == {id(p) for p in params})
        if not (self._clip_params[1] and self._all_on_kernel()):
            return False
        self._handed.max_norm = max_norm
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._handed = _Handover()  # a step that never came does not hand its scale on
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step for this call
        grad_scale = getattr(self, "grad_scale", None)  # None once GradScaler.unscale_ ran
        handed, self._handed = self._handed, _Handover()
        if handed.inv_scale is not None:
            found_inf = None  # GradScaler computed it from the found_inf this step has yet to write
        if grad_scale is not None:
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch._foreach_mul_(grads, grad_scale.reciprocal())
        if handed.active:  # then every group with gradients was found to update in the kernel
            kernel = [any(p.grad is not None for p in group["params"]) for group in self.param_groups]
        else:
            kernel = [self._use_kernel(group) for group in self.param_groups]
        if found_inf is not None and not all(kernel) and found_inf.item():  # torch ops: a host check
            return loss
        index = 0  # bucket (torch path) or tensor (kernel) number within the step: its own noise
        kernel_groups: list[tuple[dict[str, Any], int]] = []  # (group, index of its first tensor)
        for group, use_kernel in zip(self.param_groups, kernel, strict=True):
            if use_kernel:
                kernel_groups.append((group, index))
                index += sum(p.grad is not None for p in group["params"])
                continue
            for step, bucket in self._buckets(group):
                self._update(bucket, group, step, index)
                index += 1
        if kernel_groups:  # every kernel group's tensors in one launch
            self._kernel_step(kernel_groups, found_inf, handed)
        return loss

    def _use_kernel(self, group: dict[str, Any]) -> bool:
        with_grad = [p for p in group["params"] if p.grad is not None]
        if not with_grad or self.kernel is False:
            return False
        if self.kernel is None and not kernel_by_default(with_grad[0].device):
            return False
        from sam3ft.train import adamw_kernel  # imports Triton: only where the kernel runs

        return adamw_kernel.supports(with_grad, [p.grad for p in with_grad])

    def _kernel_step(
        self, groups: list[tuple[dict[str, Any], int]], found_inf: torch.Tensor | None, handed: _Handover
    ) -> None:
        """Count the step of the weights with gradients of `groups` (each with the index of its
        first tensor) and update them in one launch, with their group's hyper-parameters at their
        step count and their own noise seed."""
        from sam3ft.train import adamw_kernel

        params = [p for group, _ in groups for p in group["params"] if p.grad is not None]
        key = (tuple(map(id, params)), tuple(at for _, at in groups))
        if self._layout is None or self._layout.key != key:
            members = [(n, at + i) for n, (g, at) in enumerate(groups)
                       for i, _ in enumerate(p for p in g["params"] if p.grad is not None)]  # fmt: skip
            self._layout = adamw_kernel.Layout(
                key, params, [self._state(p) for p in params], *zip(*members, strict=True)
            )
        layout = self._layout
        steps = layout.count()
        if min(steps) == max(steps):  # as always, but where a weight missed a gradient
            rows = None
            keys = [(n, steps[0]) for n in range(len(groups))]
        else:  # one row per group and step count
            found: dict[tuple[int, int], int] = {}
            rows = [found.setdefault((n, s), len(found)) for n, s in zip(layout.groups, steps, strict=True)]
            keys = list(found)
        adamw_kernel.adamw_bf16_(
            layout,
            [p.grad for p in params],
            [adamw_kernel.hyper(groups[n][0], s) for n, s in keys],
            [self._seed(s, 0) for _, s in keys],
            rows,
            found_inf=found_inf,
            scale=handed.inv_scale,
            check=handed.active,
            max_norm=handed.max_norm,
            found_out=handed.found_inf,
        )

    def _state(self, param: torch.Tensor) -> dict[str, Any]:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)  # on the CPU: reading it costs no device sync
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.bfloat16)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._layout = None
        _restore_bf16_state(self.state)

    def _buckets(self, group: dict[str, Any]) -> Iterable[tuple[int, list[list[torch.Tensor]]]]:
        """(step, pieces) with at most CHUNK elements per bucket; a piece is the flat slices
        [param, grad, exp_avg, exp_avg_sq] of one parameter (or of a CHUNK of a larger one).
        Parameters at different step counts (some had no gradient at times) or of different dtypes
        never share a bucket."""
        pieces: list[list[torch.Tensor]] = []
        size, step = 0, -1
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            if not (param.is_contiguous() and grad.is_contiguous()):
                raise ValueError(
                    f"adamw_bf16 needs contiguous parameters and grads (shape {tuple(param.shape)})"
                )
            state = self._state(param)
            state["step"] += 1
            n, at = param.numel(), int(state["step"].item())
            flat = [t.view(-1) for t in (param, grad, state["exp_avg"], state["exp_avg_sq"])]
            for start in range(0, n, CHUNK):
                piece = [t[start : start + CHUNK] for t in flat]
                if pieces and (
                    size + piece[0].numel() > CHUNK or at != step or param.dtype != pieces[0][0].dtype
                ):
                    yield step, pieces
                    pieces, size = [], 0
                pieces.append(piece)
                size, step = size + piece[0].numel(), at
        if pieces:
            yield step, pieces

    def _update(self, pieces: list[list[torch.Tensor]], group: dict[str, Any], step: int, index: int) -> None:
        params, grads, m16s, v16s = (list(t) for t in zip(*pieces, strict=True))
        generator = self._generator(params[0].device, step, index)
        beta1, beta2 = group["betas"]
        lr, decay = group["lr"], group["weight_decay"]
        g = torch.cat(grads).float() if len(grads) > 1 else grads[0].float()
        m = torch.cat(m16s).float().lerp_(g, 1 - beta1)
        v = torch.cat(v16s).float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        del g
        for dst, src in ((m16s, m), (v16s, v)):
            _round_into(dst, src, generator)
        # this step's update uses the unrounded moments; the rounded ones carry to the next
        denom = (v.sqrt_() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        update = m.div_(denom).mul_(-lr / (1 - beta1**step))
        del v
        if params[0].dtype == torch.bfloat16:  # bf16 weights: the new weight in fp32, rounded stochastically
            weights = torch.cat(params).float() if len(params) > 1 else params[0].float()
            if decay:
                weights.mul_(1 - lr * decay)
            weights.add_(update)
            del update
            _round_into(params, weights, generator)
            return
        if decay:
            torch._foreach_mul_(params, 1 - lr * decay)
        torch._foreach_add_(params, list(update.split([p.numel() for p in params])))


def _round_into(dst: list[torch.Tensor], src: torch.Tensor, generator: torch.Generator) -> None:
    """The fp32 values `src` (the pieces of `dst` side by side) rounded stochastically into the bf16
    tensors `dst`."""
    rounded = torch.empty_like(src, dtype=torch.bfloat16)
    stochastic_round_(rounded, src, generator)
    torch._foreach_copy_(dst, list(rounded.split([t.numel() for t in dst])))


def _restore_bf16_state(states: dict[Any, dict[str, Any]]) -> None:
    """After Optimizer.load_state_dict, which casts states to the weights' fp32: bf16 moments again."""
    for state in states.values():
        if "step" in state:  # its own scalar: the loaded one may be a view shared with the dict's owner
            state["step"] = state["step"].detach().clone().reshape(())
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state and state[key].dtype != torch.bfloat16:
                state[key] = state[key].to(torch.bfloat16)
