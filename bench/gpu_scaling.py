"""1 GPU vs 2 GPUs through the train stage (tiny and full sam3 presets); run on a 2-GPU machine.

Each run is `python -m sam3ft.stages.train --params .gpu/<run>.yaml` (one process per GPU, DDP over
NCCL, sam3's trainer unchanged). The tiny pair keeps the effective batch equal (4 x 1 GPU vs 2 x 2
GPUs) so their metrics can be compared; the sam3 pair runs batch 1 per GPU to measure scaling.

    python bench/gpu_scaling.py > $OUT/scaling.json     (prepare .gpu/ first: bench/gpu_scaling.md)
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNS = ("tiny-1", "tiny-2", "sam3-1", "sam3-2")


def tsv(path: Path) -> list[tuple[int, float]]:
    with open(path) as f:
        return [(int(r[0]), float(r[1])) for r in list(csv.reader(f, delimiter="\t"))[1:]]


def summarise(name: str, seconds: float) -> dict[str, object]:
    run = Path(".gpu/runs") / name
    telemetry = run / "scratch/train/telemetry/plots/metrics/train"
    rates = [v for s, v in tsv(telemetry / "images_per_s.tsv") if s >= 3]  # after warm-up
    live = json.loads((run / "train/dvclive/metrics.json").read_text())
    launch = json.loads((run / "train/run/launch.json").read_text())
    val = json.loads((run / "train/run/val_stats.json").read_text())[-1]
    dumps = run / "scratch/train/dumps/valid/coco_predictions_bbox.json"
    images = sorted({p["image_id"] for p in json.loads(dumps.read_text())}) if dumps.is_file() else []
    return {
        "run": name,
        "world_size": launch["world_size"],
        "effective_batch": launch["effective_batch"],
        "stage_seconds": round(seconds, 1),
        "images_per_s_median": round(statistics.median(rates), 3),
        "peak_mem_gb_rank0": max(v for _, v in tsv(telemetry / "peak_mem_gb.tsv")),
        "final_train_loss": round(live["train"]["loss"], 4),
        "val_AP": live["val"]["AP"],
        "val_AP50": live["val"]["AP50"],
        "val_images_evaluated": images,
        "val_steps": val["Trainer/steps_val"],
    }


def main() -> None:
    results = []
    for name in sys.argv[1:] or RUNS:
        start = time.monotonic()
        cmd = [sys.executable, "-m", "sam3ft.stages.train", "--params", f".gpu/{name}.yaml"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if proc.returncode:
            results.append({"run": name, "error": proc.stderr[-3000:]})
            continue
        results.append(summarise(name, time.monotonic() - start))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
