"""AdamWBf16's update as one Triton kernel launch per optimizer step (CUDA).

The torch path in train/optim.py concatenates each bucket's slices into fp32 temporaries and runs
~20 kernels per bucket. Here each element is read once (fp32 weight and grad, bf16 moments) and
written once, with the same math: moments updated in fp32, written back with stochastic rounding,
the weight updated from the unrounded moments. Full model on an H100 (bench/optim_step.py, call
22): 20.7 ms per step and no temporaries, against 68.0 ms and 352 MB on torch ops (torch's fused
fp32 AdamW: 12.8 ms).

The tensors of a launch are addressed through a table of raw pointers, as apex's multi-tensor
apply does: program i handles BLOCK elements of tensor `block_tensor[i]` from `block_start[i]`.
Hyper-parameters come per tensor from a second table, so every param group (sam3 makes one per
lr/weight-decay pair, 73 for the full model) and step count share the one launch.
The rounding noise is Philox from a per-tensor seed (the optimizer derives it from its seed, the
step and the tensor's index), so a resumed run draws the same noise as an unbroken one. It is not
the same noise as the torch path's generator.
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
def _adamw_bf16(
    table,  # int64 (5, T): addresses of weight, grad, exp_avg, exp_avg_sq; then the noise seed
    hyper,  # float32 (7, T): the rows of HYPER
    sizes,  # int64 (T,): elements per tensor
    block_tensor,  # int32 (programs,)
    block_start,  # int32 (programs,)
    found_inf,  # float32 (): nonzero skips the whole update (GradScaler's found_inf, on the device)
    n_tensors,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    lr = tl.load(hyper + t)
    beta1 = tl.load(hyper + n_tensors + t)
    beta2 = tl.load(hyper + 2 * n_tensors + t)
    eps = tl.load(hyper + 3 * n_tensors + t)
    decay = tl.load(hyper + 4 * n_tensors + t)
    bias1 = tl.load(hyper + 5 * n_tensors + t)
    bias2_sqrt = tl.load(hyper + 6 * n_tensors + t)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    keep = (tl.load(found_inf) == 0.0).to(tl.int64)  # 0: no element of any tensor is touched
    mask = offs < tl.load(sizes + t) * keep
    p_ptr = tl.load(table + t).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(table + n_tensors + t).to(tl.pointer_type(tl.float32))
    m_ptr = tl.load(table + 2 * n_tensors + t).to(tl.pointer_type(tl.bfloat16))
    v_ptr = tl.load(table + 3 * n_tensors + t).to(tl.pointer_type(tl.bfloat16))
    seed = tl.load(table + 4 * n_tensors + t)

    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
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


Blocks = dict[tuple[torch.device, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _blocks(cache: Blocks, device: torch.device, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The sizes, and the (tensor index, first element) of every program, on `device`: fixed for
    a fixed set of shapes, so made once per `cache` (the optimizer's)."""
    key = (device, sizes)
    if key not in cache:
        counts = torch.tensor([triton.cdiv(n, BLOCK) for n in sizes])
        tensor = torch.repeat_interleave(torch.arange(len(sizes)), counts)
        first = torch.cumsum(counts, 0) - counts  # each tensor's first program
        start = (torch.arange(len(tensor)) - first[tensor]) * BLOCK
        cache[key] = (
            to_device(torch.tensor(sizes, dtype=torch.int64), device),
            to_device(tensor.to(torch.int32), device),
            to_device(start.to(torch.int32), device),
        )
    return cache[key]


def supports(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> bool:
    """Whether the kernel can update these: contiguous fp32 weights and grads, each under 2**31 elements."""
    return all(
        p.dtype == g.dtype == torch.float32 and p.is_contiguous() and g.is_contiguous() and p.numel() < 2**31
        for p, g in zip(params, grads, strict=True)
    )


def adamw_bf16_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    seeds: Sequence[int],
    hypers: Sequence[tuple[float, ...]],
    blocks: Blocks,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One AdamW step, in place, for all these tensors in one launch; `hypers` holds each tensor's
    HYPER row, `blocks` keeps the launch layout between steps; a nonzero `found_inf` (a device
    scalar) leaves every tensor as it was."""
    device = params[0].device
    if found_inf is None:
        found_inf = torch.zeros((), device=device)
    sizes = tuple(p.numel() for p in params)
    size_table, block_tensor, block_start = _blocks(blocks, device, sizes)
    addresses = [t.data_ptr() for ts in (params, grads, exp_avgs, exp_avg_sqs) for t in ts]
    table = torch.tensor([*addresses, *seeds], dtype=torch.int64)
    # (7, T); float32 as Triton's float arguments were: the same values, the same math
    hyper_table = torch.tensor(hypers, dtype=torch.float32).T.contiguous()
    table = to_device(table, device)  # grads are new tensors every step: a new table
    hyper_table = to_device(hyper_table, device)
    _adamw_bf16[(len(block_tensor),)](
        table, hyper_table, size_table, block_tensor, block_start, found_inf.float(), len(params), BLOCK=BLOCK
    )
