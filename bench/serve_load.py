"""Bounded load test of `sam3ft serve` on loopback: latency p50/p99 and throughput at concurrency 1/4/16.

Starts the real server, sends a fixed number of POST /predict requests of one sample photo (512 x 512
JPEG) per concurrency level with httpx from a thread pool, and writes the table. The model is a seeded
random export with a mask head (`--preset`: tiny, or sam3 on a GPU): the work per request is the
real model's. Several server settings (`--setting`, repeatable) run one after another in one call,
so their rows compare. Per level: errors (non-200 replies), the server's resident memory (all its
processes) and, on a GPU, the device memory in use, before and after: memory must stay flat.

CPU (tiny, one thread), as in bench/results/serve_load.md:
    PYTHONPATH=src python bench/serve_load.py [--requests 48]
GPU (sam3 preset; repository root with .whl/ carried, see bench/gpu_serve.sh):
    python bench/serve_load.py --preset sam3 --device cuda --dets 10 \\
        --setting unbatched="--max-batch-size 1" --setting batched="--max-batch-size 8" --out $OUT/serve_load
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import SAMPLE, write_tiny_export  # noqa: E402
from sam3ft.train.run import free_port  # noqa: E402


def wait_healthy(url: str, process: subprocess.Popen, limit_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no /health in {limit_s} s")


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and every process below it, MB."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return round(total / 2**20, 1)


def gpu_used_mb() -> float | None:
    """Device memory in use on GPU 0 (nvidia-smi), MB; None without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return float(out.split()[0])


def one_level(
    url: str, photo: bytes, form: dict[str, str], concurrency: int, requests: int, pid: int
) -> dict[str, Any]:
    def one(_: int) -> tuple[float, int, int]:
        start = time.perf_counter()
        reply = httpx.post(
            f"{url}/predict", files={"image": ("a.jpg", photo, "image/jpeg")}, data=form, timeout=120
        )
        batch = reply.json().get("batch", 1) if reply.status_code == 200 else 0
        return time.perf_counter() - start, reply.status_code, batch

    rss_before, gpu_before = tree_rss_mb(pid), gpu_used_mb()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(d[0] for d in done)
    batches = [d[2] for d in done if d[1] == 200]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "errors": sum(d[1] != 200 for d in done),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))] * 1000, 1),
        "throughput_rps": round(requests / wall, 2),
        "mean_batch": round(statistics.mean(batches), 2) if batches else None,
        "rss_mb": [rss_before, tree_rss_mb(pid)],
        "gpu_mb": [gpu_before, gpu_used_mb()],
    }


def run_setting(
    name: str, options: list[str], model: Path, args: argparse.Namespace, photo: bytes
) -> dict[str, Any]:
    """Start the server with `options`, warm it up, run every concurrency level, stop it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    port = free_port()
    command = [sys.executable, "-m", "sam3ft", "serve", "--model", str(model), "--port", str(port)]
    command += ["--device", args.device, "--threads", "1", "--log-level", "warning", *options]
    log = args.out.parent / f"{args.out.name}_{name}.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        ready_s = wait_healthy(url, process, args.ready_limit_s)
        one_level(url, photo, {}, 1, 4, process.pid)  # warm-up: first-call allocations, text cache
        everything = httpx.post(
            f"{url}/predict", files={"image": ("a.jpg", photo)}, data={"threshold": "0"}, timeout=120
        ).json()["detections"]
        form = {}
        if args.dets:  # the threshold that keeps `--dets` detections (with masks) per reply
            # replies round scores to 4 decimals: half a step below the K-th keeps it (random-init
            # scores lie so close together that a smaller margin kept none on a GPU)
            kth = sorted((d["score"] for d in everything), reverse=True)[args.dets - 1]
            form["threshold"] = repr(round(kth - 5e-5, 6))
        for c in args.levels:  # each level once more: batch shapes and allocator pools settle
            one_level(url, photo, form, c, c, process.pid)
        rows = [one_level(url, photo, form, c, args.requests, process.pid) for c in args.levels]
        reply = httpx.post(f"{url}/predict", files={"image": ("a.jpg", photo)}, data=form, timeout=120).json()
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {
        "setting": name,
        "server": "sam3ft serve --model <export> " + shlex.join(command[command.index("--device") :]),
        "server_ready_s": round(ready_s, 1),
        "threshold": form.get("threshold", "model default"),
        "detections_per_reply": len(reply["detections"]),
        "masks_per_reply": sum("segmentation" in d for d in reply["detections"]),
        "rows": rows,
    }


def markdown(result: dict[str, Any], argv: list[str]) -> str:
    lines = [
        f"# `sam3ft serve` load test ({result['date']})",
        "",
        f"Device: {result['device']}.",
        f"Model: {result['model']}. Command: `python bench/serve_load.py {shlex.join(argv)}`.",
        "",
    ]
    for s in result["settings"]:
        lines += [
            f"## {s['setting']}",
            "",
            f"Server: `{s['server']}`; ready (/health 200) {s['server_ready_s']} s after start; "
            f"threshold {s['threshold']}: {s['detections_per_reply']} detections, "
            f"{s['masks_per_reply']} with masks, per reply.",
            "",
            "| concurrency | requests | errors | p50 ms | p99 ms | requests/s | mean batch | server RSS MB "
            "before → after | GPU MB before → after |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s["rows"]:
            rss = " → ".join(str(v) for v in r["rss_mb"])
            gpu = " → ".join(str(v) for v in r["gpu_mb"]) if r["gpu_mb"][0] is not None else "-"
            lines.append(
                f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['p50_ms']} | {r['p99_ms']} | "
                f"{r['throughput_rps']} | {r['mean_batch']} | {rss} | {gpu} |"
            )
        lines.append("")
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=48, help="per concurrency level")
    parser.add_argument("--levels", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--preset", default="tiny", help="random export of this preset (mask head)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dets",
        type=int,
        default=0,
        help="threshold each request so replies carry this many (0: the model's)",
    )
    parser.add_argument(
        "--setting",
        action="append",
        metavar="NAME=OPTIONS",
        help="a server setting: a name and extra `sam3ft serve` options (repeatable; default: one, none)",
    )
    parser.add_argument("--ready-limit-s", type=float, default=600, help="wait this long for /health")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_load")
    args = parser.parse_args()
    args.levels = [int(v) for v in args.levels.split(",")]
    return args


def main() -> None:
    args = parse()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = [s.partition("=") for s in args.setting or ["default="]]
    photo = sorted((SAMPLE / "valid").glob("*.jpg"))[0].read_bytes()
    device = f"CPU: {platform.machine()}, {os.cpu_count()} cores"
    if args.device.startswith("cuda"):
        smi = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader", "-i", "0"]
        device = (
            subprocess.run(smi, capture_output=True, text=True, check=True).stdout.strip() + f"; {device}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        # operating threshold 0.25: the random tiny model's best scores are ~0.27, so each reply carries
        # a few detections with masks (RLE-encoded), as a trained model's would
        started = time.perf_counter()
        model = write_tiny_export(Path(tmp) / "model", masks=True, threshold=0.25, preset=args.preset)
        export_s = time.perf_counter() - started
        result: dict[str, Any] = {"settings": []}
        for name, _, options in settings:  # the table is rewritten after each: a timeout keeps the rest
            result["settings"].append(run_setting(name, shlex.split(options), model, args, photo))
            result |= {
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "device": f"{device}; load average {os.getloadavg()[0]:.1f}; client on this machine",
                "model": f"seeded random {args.preset} export, bf16, mask head (written in {export_s:.0f} s)",
                "image": "512 x 512 JPEG from the bundled sample",
            }
            args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
            args.out.with_suffix(".md").write_text(markdown(result, sys.argv[1:]))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
