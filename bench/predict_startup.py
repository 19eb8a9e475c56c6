"""Start-up of `sam3ft predict` on the CPU: a new process to its first detection, tiny export.

Runs the real CLI in a fresh interpreter, one image, `--threads 1`, several times, and reports the
median wall time of the whole process (imports, model build and load, one detection, files written)
plus the time to refuse a path that does not exist (no torch import). The tiny export is a seeded
random one (tests/conftest.py `write_tiny_export`): start-up does not depend on the weights' values.

    PYTHONPATH=src python bench/predict_startup.py [--runs 5]   # -> bench/results/predict_startup.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import SAMPLE, write_tiny_export  # noqa: E402


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + sys: less sensitive to other work on a shared machine), rc."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, cwd=REPO)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "predict_startup.json")
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the sam3ft sources to time")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(args.src), "PYTHONWARNINGS": "ignore"}
    image = sorted((SAMPLE / "valid").glob("*.jpg"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_export(Path(tmp) / "model")
        predict = [sys.executable, "-m", "sam3ft", "predict", str(image), "--model", str(model)]
        predict += [
            "--out",
            str(Path(tmp) / "out"),
            "--device",
            "cpu",
            "--threads",
            "1",
            "--threshold",
            "0.5",
        ]
        missing = [sys.executable, "-m", "sam3ft", "predict", "no-such.jpg", "--model", str(model)]
        missing += ["--out", str(Path(tmp) / "out")]  # older sources wrote a report for it
        timed(predict, env)  # warm the page cache: every later run reads the same files
        runs = [timed(predict, env) for _ in range(args.runs)]
        refusals = [timed(missing, env) for _ in range(args.runs)]
    assert all(rc == 0 for *_, rc in runs), runs
    seconds = sorted(round(wall, 2) for wall, _, _ in runs)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end (shared machine)",
        "command": " ".join(["OMP_NUM_THREADS=1", "python", *predict[1:]])
        .replace(str(model), "<tiny export>")
        .replace(str(Path(tmp) / "out"), "<tmp>/out")
        .replace(str(REPO) + "/", ""),
        "src": str(args.src),
        "first_detection_s_median": statistics.median(seconds),
        "first_detection_s_runs": seconds,
        "first_detection_cpu_s_median": round(statistics.median(cpu for _, cpu, _ in runs), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        "missing_path_refused_s_median": round(statistics.median(wall for wall, _, _ in refusals), 2),
        "missing_path_exit_codes": sorted({rc for *_, rc in refusals}),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
