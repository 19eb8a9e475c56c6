"""One optimizer step over the full SAM3 model's parameter shapes on the GPU, per optimizer kind:
ours against torch's and the libraries' (torchao, bitsandbytes) in one process.

Parameters get the exact shapes of the `sam3` preset (built on the meta device), random values and
random gradients (the same for every kind); each kind then runs `--warmup` steps and `--steps`
timed ones (CUDA events). Isolates what `trainer.optimizer` costs per training step, apart from the
forward and backward.

    python bench/optim_step.py --kinds adamw,adamw_fused,adamw_bf16,adamw_bf16:torch,bnb_adamw8bit

Kinds: `adamw` / `adamw_fused` (torch), `adamw_bf16` (ours: its Triton kernel on CUDA) and
`adamw_bf16:torch` (the same on torch ops, its path off CUDA), `torchao_adamw8bit`,
`torchao_adamw4bit`, `torchao_adamwfp8`, `bnb_adamw8bit`, `bnb_paged_adamw8bit`. A `@bf16` suffix
holds the weights in bf16 (trainer.weight_dtype: bfloat16): `adamw_bf16:torch@bf16` is ours with
stochastic rounding of the weights, `torchao_adamw@bf16` torchao's `_AdamW(bf16_stochastic_round)`.

Per kind: `first_step_s` (torchao compiles a step per parameter shape there), `ms_per_step`
(median), `step_temp_mb` (peak the step allocates beyond what it holds before), `state_bytes_per_param`
(what the optimizer holds after its first step, per parameter), and `drift`: after all steps,
||u - u_ref|| / ||u_ref||, u the kind's total update of the weights (from its own start, rounded to
bf16 for `@bf16`) and u_ref fp32 torch AdamW's from the same start and gradients: how far the
kind's update lies from the exact one, relative to that update's size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from sam3ft.model.build import build_model, bundled_vocab, empty_weights
from sam3ft.model.spec import load_preset
from sam3ft.train.optim import AdamWBf16, make_optimizer

LR, WEIGHT_DECAY = 1e-4, 0.1


def optimizer(params: list[torch.nn.Parameter], kind: str) -> torch.optim.Optimizer:
    group: list[dict[str, Any]] = [{"params": params, "lr": LR, "weight_decay": WEIGHT_DECAY}]
    if kind == "adamw_bf16:torch":
        return AdamWBf16(group, kernel=False)
    if kind.startswith("torchao_"):
        import torchao.optim

        # one compiled step per parameter shape: more shapes than dynamo's default cache holds
        torch._dynamo.config.cache_size_limit = 4096
        torch._dynamo.config.accumulated_cache_size_limit = 8192
        name = {"adamw": "_AdamW", "adamw8bit": "AdamW8bit", "adamw4bit": "AdamW4bit", "adamwfp8": "AdamWFp8"}
        cls = getattr(torchao.optim, name[kind.removeprefix("torchao_")])
        return cls(group, bf16_stochastic_round=params[0].dtype == torch.bfloat16)
    if kind.startswith("bnb_"):
        import bitsandbytes.optim

        name = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit"}
        return getattr(bitsandbytes.optim, name[kind.removeprefix("bnb_")])(group)
    return make_optimizer(group, kind)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", default="adamw,adamw_fused,adamw_bf16,adamw_bf16:torch")
    parser.add_argument("--preset", default="sam3")
    parser.add_argument("--vocab", help="BPE vocabulary (default: open_clip_torch's copy)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with empty_weights():
        model = build_model(load_preset(args.preset), args.vocab or str(bundled_vocab()), coord_cache=False)
    shapes = [p.shape for p in model.parameters()]
    del model
    gen = torch.Generator(device=device).manual_seed(0)
    start = [torch.randn(s, device=device, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, device=device, generator=gen) * 1e-3 for s in shapes]
    n_steps = args.warmup + 1 + args.steps

    def run(kind: str) -> tuple[list[torch.Tensor], dict[str, Any]]:
        base, _, weights = kind.partition("@")
        dtype = torch.bfloat16 if weights == "bf16" else torch.float32
        params = [torch.nn.Parameter(w.to(dtype, copy=True)) for w in start]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(dtype, copy=True)  # a kind may scale or reuse it in place
        held = torch.cuda.memory_allocated() if device == "cuda" else 0
        opt = optimizer(params, base)
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        first_s = time.perf_counter() - t0
        state_bytes = (torch.cuda.memory_allocated() - held) if device == "cuda" else None
        for _ in range(args.warmup):
            opt.step()
        temp_mb = None
        if device == "cuda":
            sync(device)
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            opt.step()
            temp_mb = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
        else:
            opt.step()
        times = []
        for _ in range(args.steps - 1):
            t0 = time.perf_counter()
            if device == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                opt.step()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                opt.step()
                times.append((time.perf_counter() - t0) * 1e3)
        n = sum(p.numel() for p in params)
        row = {
            "kind": kind,
            "first_step_s": round(first_s, 2),
            "ms_per_step": round(statistics.median(times), 2) if times else None,
            "step_temp_mb": temp_mb,
            "state_bytes_per_param": round(state_bytes / n, 2) if state_bytes is not None else None,
            "params": n,
            "tensors": len(params),
            "steps": n_steps,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__,
        }
        # the kind's own total update: a bf16 start is already rounded, which is not the optimizer's doing
        update = [p.detach().float() - w.to(dtype).float() for p, w in zip(params, start, strict=True)]
        del opt, params
        if device == "cuda":
            torch.cuda.empty_cache()
        return update, row

    reference, _ = run("adamw")
    ref_size = sum(float(r.square().sum()) for r in reference) ** 0.5
    for kind in args.kinds.split(","):
        try:
            update, row = run(kind)
        except Exception as exc:  # a library missing or failing on this machine: say so, go on
            print(json.dumps({"kind": kind, "error": f"{type(exc).__name__}: {exc}"[:500]}), flush=True)
            continue
        off = sum(float((u - r).square().sum()) for u, r in zip(update, reference, strict=True)) ** 0.5
        row["drift"] = round(off / ref_size, 4)
        print(json.dumps(row), flush=True)
        del update


if __name__ == "__main__":
    main()
