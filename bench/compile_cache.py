"""torch.compile's cost in the train stage and in `sam3ft predict --compile`, with an empty cache and
then with the cache the first run filled (sam3ft.compile_cache): both in one call, each run a fresh
process, same params.

Runs `python -m sam3ft.stages.train` twice in a work folder holding params.yaml (the checkout's, with
--set overrides, compile_model on) and copies of the checkout's artifacts/base and artifacts/prepared
(so run `make pipeline` or `dvc repro` first), with XDG_CACHE_HOME pointing at an empty folder. Records
each run's wall time, the trainer's "compiling took" lines and the checkpoint's md5. Then
`sam3ft predict --compile default` of the checkout's export (paths.export/model) on the first prepared
validation image, twice, with the same cache: wall time, its "compiling took" line, the output's md5.

    .venv/bin/python bench/compile_cache.py --set trainer.max_epochs=1 \\
        --out bench/results/compile_cache.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from sam3ft.compile_cache import CACHE_ENV
from sam3ft.layout import MODEL_DIR

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import cpuinfo  # noqa: E402

PREDICT_COMPILING = re.compile(
    r"^compiling took ([\d.]+) s \((\d+) graphs from the cache, (\d+) compiled", re.M
)
COMPILING = re.compile(
    r"(epoch \d+'s \w+): compiling took ([\d.]+) s \((\d+) graphs from the cache, (\d+) compiled"
)


def params_with(overrides: list[str]) -> dict[str, Any]:
    """The checkout's params.yaml with `section.key=value` overrides (values parsed as YAML)."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in ["trainer.compile_model=true", *overrides]:
        dotted, value = item.split("=", 1)
        *parents, key = dotted.split(".")
        node = data
        for name in parents:
            node = node[name]
        if key not in node:
            raise SystemExit(f"--set {item}: params.yaml has no {dotted}")
        node[key] = yaml.safe_load(value)
    return data


def cache_env(cache_home: Path) -> dict[str, str]:
    """This environment with inductor's cache under `cache_home` (compile_cache's XDG rule)."""
    env = {k: v for k, v in os.environ.items() if k != CACHE_ENV}
    env["XDG_CACHE_HOME"] = str(cache_home)
    return env


def run_train(work: Path, cache_home: Path, train_dir: str) -> dict[str, Any]:
    env = cache_env(cache_home)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "sam3ft.stages.train"], cwd=work, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"train stage failed ({done.returncode}):\n{done.stderr[-4000:]}")
    compiles = [
        {"when": m[0], "seconds": float(m[1]), "cached": int(m[2]), "compiled": int(m[3])}
        for m in COMPILING.findall(done.stderr + done.stdout)
    ]
    checkpoint = work / train_dir / "checkpoint.pt"
    md5 = hashlib.md5(checkpoint.read_bytes()).hexdigest()  # the cache may not change what trains
    return {"stage_wall_s": round(wall, 1), "compiling": compiles, "checkpoint_md5": md5}


def run_predict(export: Path, image: Path, cache_home: Path, out: Path) -> dict[str, Any]:
    env = cache_env(cache_home)
    command = [sys.executable, "-m", "sam3ft", "predict", str(image), "--model", str(export)]
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "--compile", "default", "--out", str(out)], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"predict failed ({done.returncode}):\n{done.stderr[-4000:]}")
    ((seconds, cached, compiled),) = PREDICT_COMPILING.findall(done.stderr)
    return {
        "wall_s": round(wall, 1),
        "compiling": {"seconds": float(seconds), "cached": int(cached), "compiled": int(compiled)},
        "detections_md5": hashlib.md5((out / "detections.json").read_bytes()).hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--set", action="append", default=[], help="params override, e.g. trainer.max_epochs=1"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON lines file to append the row to")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="compile-cache-") as tmp:
        work, cache_home = Path(tmp) / "work", Path(tmp) / "cache"
        (work / "artifacts").mkdir(parents=True)
        p = params_with(args.set)
        (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        for stage in ("base", "prepared"):
            shutil.copytree(REPO / p["paths"][stage], work / p["paths"][stage])
        cold = run_train(work, cache_home, p["paths"]["train"])
        shutil.rmtree(work / p["paths"]["scratch"], ignore_errors=True)  # no resume: train again
        shutil.rmtree(work / p["paths"]["train"], ignore_errors=True)
        warm = run_train(work, cache_home, p["paths"]["train"])
        export = REPO / p["paths"]["export"] / MODEL_DIR
        image = sorted((REPO / p["paths"]["prepared"] / "valid").glob("*.jpg"))[0]
        predict = [run_predict(export, image, cache_home, Path(tmp) / f"predict-{i}") for i in range(2)]
    row = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["bench/compile_cache.py", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpuinfo()["model name"],
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "overrides": args.set,
        "cold": cold,
        "warm": warm,
        "predict": {"cold": predict[0], "warm": predict[1]},
    }
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
