"""Batched prediction on one GPU: `Predictor.predict_batch` eager and compiled for batches of 1 and 8.

Outside the server (no LitServe), so a slow compiled server can be told apart from a slow compiled
batched predictor. The sam3 preset with a mask head, seeded random init, bf16 as `sam3ft serve`
loads it; one sample photo, thresholded so that ~10 detections per image keep masks. Per variant and
batch size: median / p90 ms per call, dynamo's and inductor's counters (recompiles, CUDA graph
recordings) after timing.

    PYTHONPATH=src:/tmp/site python3 bench/gpu_batch_predict.py --out $OUT/batch_predict.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import SAMPLE, write_tiny_export  # noqa: E402
from sam3ft.model.export import load_export  # noqa: E402
from sam3ft.model.predict import Predictor  # noqa: E402

PROMPTS = {1: "fuse neutrals"}


def timed(call: Any, iters: int) -> dict[str, float]:
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"median_ms": round(statistics.median(times), 2), "p90_ms": round(times[int(0.9 * len(times))], 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with Image.open(sorted((SAMPLE / "valid").glob("*.jpg"))[0]) as opened:
        image = opened.convert("RGB")
    rows: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_export(Path(tmp) / "m", masks=True, preset="sam3")
        for name, mode in (("eager", None), ("compiled reduce-overhead, batches 1 and 8", "reduce-overhead")):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            model, spec, _ = load_export(model_dir, dtype=torch.bfloat16)
            started = time.perf_counter()
            predictor = Predictor(model, spec.image_size, "cuda", torch.bfloat16, mode, "all", True, (1, 8))
            row: dict[str, Any] = {"setup_s": round(time.perf_counter() - started, 1)}
            for _ in range(3):  # first calls: text cache, graph recording
                predictor.predict_batch([image], PROMPTS, 100, [0.0])
            scores = sorted((d.score for d in predictor.predict(image, PROMPTS, 100)), reverse=True)
            threshold = scores[9]
            for turn, size in enumerate((1, 8, 1)):  # 1 again: after the batch of 8
                call = functools.partial(
                    predictor.predict_batch, [image] * size, PROMPTS, 100, [threshold] * size
                )
                call()
                kept = len(call()[0])
                key = f"batch {size}" + (" again" if turn else "")
                row[key] = timed(call, args.iters) | {"kept_per_image": kept}
                print(name, key, row[key], flush=True)
            counters = torch._dynamo.utils.counters
            row["counters"] = {
                k: dict(v) for k, v in counters.items() if k in ("inductor", "stats", "frames")
            }
            rows[name] = row
            predictor = model = None  # one model on the device at a time
            torch.cuda.empty_cache()
            args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
