"""One optimizer step over the full SAM3 model's parameter shapes on the GPU, per optimizer kind.

Parameters get the exact shapes of the `sam3` preset (built on the meta device), random values and
random gradients; each kind then runs `--warmup` steps and `--steps` timed ones (CUDA events).
Isolates what `trainer.optimizer` costs per training step, apart from the forward and backward.

    python bench/optim_step.py --kinds adamw,adamw_fused,adamw_bf16,adamw_bf16:torch

`adamw_bf16` uses its Triton kernel on CUDA; `adamw_bf16:torch` is the same optimizer on torch ops
(its path off CUDA). `step_temp_mb`: peak memory the step allocates beyond what it holds before.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from sam3ft.model.build import build_model, bundled_vocab, empty_weights
from sam3ft.model.spec import load_preset
from sam3ft.train.optim import AdamWBf16, make_optimizer


def optimizer(params: list[torch.nn.Parameter], kind: str) -> torch.optim.Optimizer:
    group = [{"params": params, "lr": 1e-4, "weight_decay": 0.1}]
    if kind == "adamw_bf16:torch":
        return AdamWBf16(group, kernel=False)
    return make_optimizer(group, kind)


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
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen) * 1e-3
    rows = []
    for kind in args.kinds.split(","):
        opt = optimizer(params, kind)
        for _ in range(args.warmup):
            opt.step()
        temp_mb = None
        if device == "cuda":
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            opt.step()
            temp_mb = round((torch.cuda.max_memory_allocated() - held) / 2**20, 1)
        times = []
        for _ in range(args.steps):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                opt.step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                import time

                t0 = time.perf_counter()
                opt.step()
                times.append((time.perf_counter() - t0) * 1e3)
        rows.append(
            {
                "kind": kind,
                "ms_per_step": round(statistics.median(times), 2),
                "step_temp_mb": temp_mb,
                "params": sum(p.numel() for p in params),
                "tensors": len(params),
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "torch": torch.__version__,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del opt
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
