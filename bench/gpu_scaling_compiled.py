"""Compiled lean (`trainer.compile_model: true`) on 1 and N GPUs of one host through the train stage:
images/s and scaling efficiency against N x the single-GPU compiled rate (the goal of issue 32:
at least 90% on 2 GPUs), each validation item evaluated once, losses per rank count.

Every run is the train stage (`python -m sam3ft.stages.train`, one process per GPU, DDP over NCCL)
on a params file derived from `--params` (the sam3 preset on one GPU, `.gpu/sam3-1.yaml` as
bench/gpu_sam3_train.md makes it): recipe lean, compile_model true, `num_gpus` N, the same
per-GPU batch, enough epochs for `--steps` steady steps per process (the first step runs eager,
the second compiles for minutes). Under DDP each mode of `--modes` is run: "reduce-overhead" (the
default, CUDA graphs) and "max-autotune-no-cudagraphs" (inductor without CUDA graphs), so a
failure or a slowdown of CUDA graphs under DDP shows beside the mode that avoids them. The mode is
not a params key: `stage` (this script's own subcommand) sets `trainer.model.compile_mode` in the
composed config before the launch, and the spawned ranks build the model with it.

    python bench/gpu_scaling_compiled.py --params .gpu/sam3-1.yaml --gpus 1 2 > $OUT/scaling_compiled.json
    python bench/gpu_scaling_compiled.py --gpus 4 --baseline bench/results/gpu_scaling_compiled.json
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

RUNS = Path(".gpu/runs")
TRAIN_IMAGES = 24  # the bundled sample's train split
DEFAULT_MODE = "reduce-overhead"


def tsv(path: Path) -> list[tuple[int, float]]:
    with open(path) as f:
        return [(int(r[0]), float(r[1])) for r in list(csv.reader(f, delimiter="\t"))[1:]]


def run_params(base: dict[str, Any], name: str, gpus: int, batch: int, steps: int) -> Path:
    """A params file for one run: outputs under .gpu/runs/<name>/, fetch and prepare shared."""
    p = copy.deepcopy(base)
    root = RUNS / name
    p["paths"].update({k: str(root / k) for k in ("train", "eval", "export", "scratch")})
    steps_per_epoch = TRAIN_IMAGES // (max(gpus, 1) * batch)  # gpus 0: a CPU dry run of the plumbing
    epochs = math.ceil((steps + 2) / steps_per_epoch)  # +2: the eager step and the compiling one
    p["trainer"].update(
        recipe="lean",
        compile_model=True,
        num_gpus=gpus,
        num_nodes=1,
        batch_size=batch,
        max_epochs=epochs,
        select="last",
        val_epoch_freq=epochs,  # validate once, after the last epoch
        checkpoint_freq=0,  # only the latest checkpoint
    )
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


def summarise(name: str, gpus: int, mode: str, seconds: float) -> dict[str, Any]:
    run = RUNS / name
    telemetry = run / "scratch/train/telemetry/plots/metrics/train"
    rates = tsv(telemetry / "images_per_s.tsv")  # images of all ranks per step (rank 0's step time)
    step_s = tsv(telemetry / "step_s.tsv")
    launch = json.loads((run / "train/run/launch.json").read_text())
    live = json.loads((run / "train/dvclive/metrics.json").read_text())
    dumps = run / "scratch/train/dumps/valid/coco_predictions_bbox.json"
    images = sorted({p["image_id"] for p in json.loads(dumps.read_text())}) if dumps.is_file() else []
    return {
        "run": name,
        "gpus": gpus,
        "compile_mode": mode,
        "world_size": launch["world_size"],
        "effective_batch": launch["effective_batch"],
        "stage_seconds": round(seconds, 1),
        "steps": len(rates),
        "first_steps_s": [round(v, 2) for _, v in step_s[:3]],  # eager, compiling, first replay
        "images_per_s_median": round(statistics.median(v for s, v in rates if s >= 3), 3),
        "peak_mem_gb_rank0": max(v for _, v in tsv(telemetry / "peak_mem_gb.tsv")),
        "final_train_loss": round(live["train"]["loss"], 4),
        "val_images_with_predictions": images,
    }


def bench(args: argparse.Namespace) -> None:
    base = yaml.safe_load(Path(args.params).read_text())
    results: list[dict[str, Any]] = []
    for gpus in args.gpus:
        for mode in args.modes if gpus > 1 else [DEFAULT_MODE]:
            name = f"compiled-{mode}-{gpus}"
            path = run_params(base, name, gpus, args.batch, args.steps)
            cmd = [sys.executable, __file__, "stage", "--params", str(path), "--mode", mode]
            start = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if proc.returncode:
                results.append(
                    {"run": name, "gpus": gpus, "compile_mode": mode, "error": proc.stderr[-3000:]}
                )
            else:
                results.append(summarise(name, gpus, mode, time.monotonic() - start))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    earlier = json.loads(Path(args.baseline).read_text()) if args.baseline else []
    single = next((r for r in [*results, *earlier] if r.get("gpus") == 1 and "error" not in r), None)
    for r in results:
        if single is not None and "error" not in r and r["gpus"] > 1:
            ideal = r["gpus"] * single["images_per_s_median"]
            r["scaling_efficiency"] = round(r["images_per_s_median"] / ideal, 3)  # goal >= 0.9
    print(json.dumps(results, indent=2))


def stage(args: argparse.Namespace) -> None:
    """The train stage with `trainer.model.compile_mode` set in the config its ranks get."""
    from omegaconf import open_dict

    from sam3ft import params
    from sam3ft.stages import train

    launch = train.launch

    def launch_with_mode(cfg: Any, trainer: Any, launcher: Any, scratch: Path) -> None:
        with open_dict(cfg):
            cfg.trainer.model.compile_mode = args.mode
        launch(cfg, trainer, launcher, scratch)

    train.launch = launch_with_mode
    train.run(params.load(train.SECTIONS, Path(args.params)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("stage", help="one run (what the bench calls per run)")
    one.add_argument("--params", required=True)
    one.add_argument("--mode", default=DEFAULT_MODE)
    parser.add_argument(
        "--params", default=".gpu/sam3-1.yaml", help="the sam3 preset's params, fetched and prepared"
    )
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=1, help="images per GPU and step")
    parser.add_argument("--steps", type=int, default=30, help="steady steps per process, at least")
    parser.add_argument("--modes", nargs="+", default=[DEFAULT_MODE, "max-autotune-no-cudagraphs"])
    parser.add_argument(
        "--baseline",
        help="this script's JSON output of an earlier call that ran --gpus 1 (when each call runs less)",
    )
    args = parser.parse_args()
    (stage if args.command == "stage" else bench)(args)


if __name__ == "__main__":
    main()
