"""Host time of what sam3's trainer runs between the backward pass and the next step, with
adamw_bf16 on its kernel path: GradScaler.unscale_, the gradient clipper, GradScaler.step (the
optimizer) and GradScaler.update, over the full SAM3 model's trainable tensors and param groups.

The Triton launches are replaced by no-ops and the tensors hold 16 elements each, so what is timed
is the host's per-tensor work, on any machine (a GPU adds launch costs). Two ways side by side:
- `torch passes`: torch's GradScaler and clip_grad_norm_, each a pass over every gradient;
- `handed over`: DeviceGradScaler and a clipper that hand both passes to the optimizer, which
  unscales, checks and clips inside its update (what the trainer does).

    python bench/optim_host.py [--steps 15]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from sam3ft.model.build import build_model, bundled_vocab, empty_weights
from sam3ft.model.spec import load_preset
from sam3ft.train import adamw_kernel
from sam3ft.train.optim import AdamWBf16, DeviceGradScaler, GradientClipper

GROUPS = 73  # sam3's lr / weight-decay groups for the full model


class _NoLaunch:
    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: None


def time_path(shapes: list[torch.Size], handed_over: bool, steps: int) -> list[float]:
    params = [torch.nn.Parameter(torch.zeros(min(s.numel(), 16))) for s in shapes]
    groups = [{"params": params[i::GROUPS], "lr": 1e-4, "weight_decay": 0.1} for i in range(GROUPS)]
    opt = AdamWBf16(groups, kernel=True)
    model = torch.nn.Module()
    model.weights = torch.nn.ParameterList(params)
    clipper = GradientClipper(max_norm=0.1)
    clipper.optimizer = opt if handed_over else None
    scaler = (DeviceGradScaler if handed_over else torch.amp.GradScaler)("cpu")
    scaler.scale(torch.ones(()))  # makes its scale tensor, as the loss's scaling does

    def one() -> float:
        for p in params:
            p.grad = torch.ones_like(p)
        start = time.perf_counter()
        scaler.unscale_(opt)
        clipper(model=model)
        scaler.step(opt)
        scaler.update()
        return time.perf_counter() - start

    for _ in range(3):
        one()
    return [one() for _ in range(steps)]


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "?"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    adamw_kernel._adamw_bf16 = _NoLaunch()  # type: ignore[assignment]
    adamw_kernel._sum_squares = _NoLaunch()  # type: ignore[assignment]
    with empty_weights():
        model = build_model(load_preset("sam3"), str(bundled_vocab()), coord_cache=False)
    shapes = [p.shape for p in model.parameters()]
    del model
    torch.set_num_threads(1)
    row: dict[str, Any] = {"tensors": len(shapes), "groups": GROUPS, "cpu": cpu_name()}
    for name, handed in (("torch passes", False), ("handed over", True)):
        times = time_path(shapes, handed, args.steps)
        median, least = statistics.median(times), min(times)
        row[name] = {"median_ms": round(1e3 * median, 2), "min_ms": round(1e3 * least, 2)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
