"""AdamWBf16's update as one Triton kernel launch per optimizer step (CUDA).

The torch path in train/optim.py concatenates each bucket's slices into fp32 temporaries and runs
~20 kernels per bucket. Here each element is read once (fp32 weight and grad, bf16 moments) and
written once, with the same math: moments updated in fp32, written back with stochastic rounding,
the weight updated from the unrounded moments: no temporaries, and a fraction of the torch path's
step time (bench/optim_step.py measures both; results in bench/README.md).

The tensors of a launch are addressed through a table of raw pointers, as apex's multi-tensor
apply does: program i handles BLOCK elements of tensor `block_tensor[i]` from `block_start[i]`.
Hyper-parameters come per row of a second table (one row per param group and step count), so
every param group (sam3 makes one per lr/weight-decay pair, 73 for the full model) and step count
share the one launch. The tables that stay fixed while the same weights get gradients (`Layout`:
sizes, program blocks, weight and moment addresses, each tensor's row and noise index) are made
once; a step sends the gradients' addresses only when they moved, and the rows.
The rounding noise is Philox from a per-tensor seed (the optimizer derives it from its seed, the
step and the tensor's index), so a resumed run draws the same noise as an unbroken one. It is not
the same noise as the torch path's generator.

With `check` (the optimizer took over GradScaler's unscaling or the clipping, see optim.py) a
first kernel sums the squares of the unscaled gradients per program, torch sums those partial
sums, and the update reads the total: a non-finite total skips the whole step (and is written to
GradScaler's found_inf), otherwise every gradient is unscaled and clipped on the fly, as
GradScaler.unscale_ and clip_grad_norm_ would have done in place, without their passes over the
gradients and their per-tensor host work. The gradients themselves are left as the backward made them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from sam3ft.train.transfer import to_device

BLOCK = 2048  # elements per program


@triton.jit
def _round_bf16(x, noise):
    """fp32 -> bf16, rounding the magnitude up with probability equal to the dropped fraction."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + (noise & 0xFFFF).to(tl.int32)) & -65536
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _sum_squares(
    table,  # int64 (4, T): addresses of weight, grad, exp_avg, exp_avg_sq
    sizes,  # int64 (T,): elements per tensor
    block_tensor,  # int32 (programs,)
    block_start,  # int32 (programs,)
    scale,  # float32 (): multiplies every gradient (GradScaler's inverse scale)
    partial,  # float32 (programs,): out, each program's sum of squares
    n_tensors,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    mask = offs < tl.load(sizes + t)
    g_ptr = tl.load(table + n_tensors + t).to(tl.pointer_type(tl.float32))
    g = tl.load(g_ptr + offs, mask=mask, other=0.0) * tl.load(scale)
    tl.store(partial + pid, tl.sum(g * g, axis=0))


@triton.jit
def _adamw_bf16(
    table,  # int64 (4, T): addresses of weight, grad, exp_avg, exp_avg_sq
    hyper,  # float32 (7, R): the rows of HYPER
    seeds,  # int64 (R,): each row's noise seed base; a tensor's seed adds its index
    rows,  # int32 (T,): each tensor's row
    index,  # int64 (T,): each tensor's noise index
    sizes,  # int64 (T,): elements per tensor
    block_tensor,  # int32 (programs,)
    block_start,  # int32 (programs,)
    scale,  # float32 (): multiplies every gradient (GradScaler's inverse scale, or 1)
    found_inf,  # float32 (): nonzero skips the whole update (GradScaler's found_inf, on the device)
    norm_sq,  # float32 (): with CHECK, the sum of squares of the scaled gradients
    found_out,  # float32 (): with CHECK, program 0 writes 1 here when the step is skipped, else 0
    max_norm,  # with CHECK: clip the gradients to this global L2 norm; <= 0: no clipping
    n_tensors,
    n_rows,
    CHECK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    r = tl.load(rows + t)
    lr = tl.load(hyper + r)
    beta1 = tl.load(hyper + n_rows + r)
    beta2 = tl.load(hyper + 2 * n_rows + r)
    eps = tl.load(hyper + 3 * n_rows + r)
    decay = tl.load(hyper + 4 * n_rows + r)
    bias1 = tl.load(hyper + 5 * n_rows + r)
    bias2_sqrt = tl.load(hyper + 6 * n_rows + r)
    skip = tl.load(found_inf) != 0.0
    if CHECK:
        total = tl.load(norm_sq)
        skip = skip | (total - total != 0.0)  # inf or nan in some gradient
        if pid == 0:
            tl.store(found_out, skip.to(tl.float32))
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    keep = (skip == 0).to(tl.int64)  # 0: no element of any tensor is touched
    mask = offs < tl.load(sizes + t) * keep
    p_ptr = tl.load(table + t).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(table + n_tensors + t).to(tl.pointer_type(tl.float32))
    m_ptr = tl.load(table + 2 * n_tensors + t).to(tl.pointer_type(tl.bfloat16))
    v_ptr = tl.load(table + 3 * n_tensors + t).to(tl.pointer_type(tl.bfloat16))
    seed = tl.load(seeds + r) + tl.load(index + t)

    g = tl.load(g_ptr + offs, mask=mask, other=0.0) * tl.load(scale)
    if CHECK:  # then clipped, as clip_grad_norm_ does after GradScaler.unscale_
        clip = tl.minimum(max_norm / (tl.sqrt(tl.load(norm_sq)) + 1e-6), 1.0)
        g = tl.where(max_norm > 0.0, g * clip, g)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m + (1.0 - beta1) * (g - m)  # torch's lerp for weights below 0.5
    v = v * beta2 + (1.0 - beta2) * (g * g)
    noise_m, noise_v, _, _ = tl.randint4x(seed, offs)
    tl.store(m_ptr + offs, _round_bf16(m, noise_m), mask=mask)
    tl.store(v_ptr + offs, _round_bf16(v, noise_v), mask=mask)

    p = tl.load(p_ptr + offs, mask=mask, other=0.0) * decay
    denom = tl.sqrt(v) / bias2_sqrt + eps
    p = p + (m / denom) * (-lr / bias1)
    tl.store(p_ptr + offs, p, mask=mask)


HYPER = ("lr", "beta1", "beta2", "eps", "1 - lr * weight_decay", "1 - beta1**step", "sqrt(1 - beta2**step)")


def hyper(group: dict[str, Any], step: int) -> tuple[float, ...]:
    """The HYPER row of a tensor in param group `group` at optimizer step `step`."""
    beta1, beta2 = group["betas"]
    lr, decay = group["lr"], 1 - group["lr"] * group["weight_decay"]
    return lr, beta1, beta2, group["eps"], decay, 1 - beta1**step, (1 - beta2**step) ** 0.5


def supports(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> bool:
    """Whether the kernel can update these: contiguous fp32 weights and grads, each under 2**31 elements."""
    fp32 = torch.float32
    return all(
        p.dtype is fp32 and g.dtype is fp32 and p.is_contiguous() and g.is_contiguous() and p.numel() < 2**31
        for p, g in zip(params, grads, strict=True)
    )


class Layout:
    """The launch tables of one list of weights (in launch order), their moments, step counts,
    param-group numbers and noise indices: fixed while the same weights get gradients.

    Each weight's step count (`state["step"]`, a CPU scalar as in torch's AdamW) becomes a 0-d view
    into one CPU tensor here, so a step counts all of them with one add and reads them with one
    `tolist`; each state still holds a scalar under "step", so checkpoints look as before (a loaded
    optimizer gives each state its own copy again, AdamWBf16.load_state_dict).
    """

    def __init__(
        self,
        key: Any,
        params: Sequence[torch.Tensor],
        states: Sequence[dict[str, Any]],
        groups: Sequence[int],
        index: Sequence[int],
    ) -> None:
        self.key = key
        self.device = device = params[0].device
        self.n = len(params)
        self.groups = list(groups)  # each tensor's param-group number (among the launch's groups)
        self.steps = torch.stack([s["step"].reshape(()).float() for s in states])
        for i, state in enumerate(states):
            state["step"] = self.steps[i]
        sizes = [p.numel() for p in params]
        counts = torch.tensor([triton.cdiv(n, BLOCK) for n in sizes])
        tensor = torch.repeat_interleave(torch.arange(len(sizes)), counts)
        first = torch.cumsum(counts, 0) - counts  # each tensor's first program
        start = (torch.arange(len(tensor)) - first[tensor]) * BLOCK
        self.programs = len(tensor)
        self.sizes = to_device(torch.tensor(sizes, dtype=torch.int64), device)
        self.block_tensor = to_device(tensor.to(torch.int32), device)
        self.block_start = to_device(start.to(torch.int32), device)
        self.index = to_device(torch.tensor(index, dtype=torch.int64), device)
        self.group_rows = to_device(torch.tensor(groups, dtype=torch.int32), device)
        addresses = [
            *(p.data_ptr() for p in params),
            *([0] * self.n),  # the gradients': each step
            *(s["exp_avg"].data_ptr() for s in states),
            *(s["exp_avg_sq"].data_ptr() for s in states),
        ]
        self.table = to_device(torch.tensor(addresses, dtype=torch.int64), device).view(4, self.n)
        self.grad_addresses: list[int] = []  # as last sent
        self.one = torch.ones((), device=device)
        self.zero = torch.zeros((), device=device)

    def count(self) -> list[int]:
        """Add one to every weight's step count; the counts after it."""
        self.steps += 1
        return [int(s) for s in self.steps.tolist()]

    def send_grads(self, grads: Sequence[torch.Tensor]) -> None:
        """Put the gradients' addresses in the table where they moved since the last step (set_to_none
        gives new tensors each step, mostly at the addresses of the last)."""
        addresses = [g.data_ptr() for g in grads]
        if addresses != self.grad_addresses:
            self.table[1].copy_(to_device(torch.tensor(addresses, dtype=torch.int64), self.device))
            self.grad_addresses = addresses


def adamw_bf16_(
    layout: Layout,
    grads: Sequence[torch.Tensor],
    hypers: Sequence[tuple[float, ...]],
    seeds: Sequence[int],
    rows: Sequence[int] | None = None,
    *,
    found_inf: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    check: bool = False,
    max_norm: float | None = None,
    found_out: torch.Tensor | None = None,
) -> None:
    """One AdamW step, in place, for all of `layout`'s weights in one launch.

    `hypers` and `seeds` hold one HYPER row and noise seed base per row; `rows` gives each weight's
    row (None: its param group's). A nonzero `found_inf` (a device scalar) leaves every tensor as it
    was; `scale` (a device scalar) multiplies every gradient. With `check`, a first kernel sums the
    squares of the scaled gradients: a non-finite sum skips the step (and sets `found_out` to 1, else
    0), and with `max_norm` the gradients are clipped to that global norm as clip_grad_norm_ does.
    """
    layout.send_grads(grads)
    device = layout.device
    hyper_table = to_device(torch.tensor(hypers, dtype=torch.float32).T.contiguous(), device)  # (7, R)
    seed_table = to_device(torch.tensor(seeds, dtype=torch.int64), device)
    if rows is None:
        row_table = layout.group_rows
    else:
        row_table = to_device(torch.tensor(rows, dtype=torch.int32), device)
    scale = layout.one if scale is None else scale.float()
    found_inf = layout.zero if found_inf is None else found_inf.float()
    grid = (layout.programs,)
    if check:
        partial = torch.empty(layout.programs, dtype=torch.float32, device=device)
        _sum_squares[grid](
            layout.table, layout.sizes, layout.block_tensor, layout.block_start, scale, partial, layout.n,
            BLOCK=BLOCK,
        )  # fmt: skip
        norm_sq = partial.sum()
        found_out = torch.empty((), device=device) if found_out is None else found_out
    else:
        norm_sq = found_out = layout.zero  # not read
    _adamw_bf16[grid](
        layout.table, hyper_table, seed_table, row_table, layout.index, layout.sizes,
        layout.block_tensor, layout.block_start, scale, found_inf, norm_sq, found_out,
        float(max_norm or 0.0), layout.n, len(hypers), CHECK=check, BLOCK=BLOCK,
    )  # fmt: skip
