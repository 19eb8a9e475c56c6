"""Does the CPU pipeline give the same bytes on this CPU as on another? One row per run.

Copies this checkout (tracked and untracked-not-ignored files, plus the restored `data/`) to a
temporary folder, runs the pipeline stages there with `python -m sam3ft.stages.<name>` under the given
environment (CUDA hidden), and appends one JSON row to `bench/results/cpu_repro.jsonl`: the CPU
(vendor, model, AVX2/AVX-512), the torch build, the ATen kernel set actually used, the md5 of every
tracked training output and the evaluate metrics. Compare rows made on two machines.

    python bench/cpu_repro.py --label native                               # the machine's own kernels
    python bench/cpu_repro.py --label avx2 --env ATEN_CPU_CAPABILITY=avx2  # other kernels, same CPU
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import copy_worktree, cpu_type, cpuinfo  # noqa: E402  (tests/ is no package)

STAGES = ("check", "fetch", "prepare", "baseline", "train", "evaluate", "export")  # dvc.yaml order
HASHED = (
    "artifacts/train/checkpoint.pt",
    "artifacts/train/dvclive/metrics.json",
    "artifacts/eval/metrics.json",
    "artifacts/export/model/model.safetensors",
)


def cpu() -> dict[str, object]:
    """The CPU type the tests compare (vendor, vector instruction sets), plus what identifies the host."""
    fields = cpuinfo()
    return {
        **cpu_type(),
        "model": fields.get("model name", ""),
        "cpuid_model": int(fields.get("model", "0") or 0),
        "glibc": platform.libc_ver()[1],
    }


def copy_checkout(dst: Path) -> None:
    """What a fresh clone holds (where git is at hand, else the tree minus outputs), plus `data/`."""
    try:
        copy_worktree(dst)
    except (OSError, subprocess.CalledProcessError):  # a copy of the tree without .git (GPU host)
        skip = shutil.ignore_patterns(".git", ".venv", ".work", ".whl", "artifacts", "data", "cache", "tmp")
        shutil.copytree(REPO, dst, ignore=skip, dirs_exist_ok=True)
    shutil.copytree(REPO / "data", dst / "data")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the stages")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/cpu_repro.jsonl")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    env.update(extra, CUDA_VISIBLE_DEVICES="", PYTHONPATH=f"src{os.pathsep}{env.get('PYTHONPATH', '')}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copy_checkout(work)
        start = time.monotonic()
        for stage in STAGES:
            done = subprocess.run(
                [sys.executable, "-m", f"sam3ft.stages.{stage}"],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode:
                sys.exit(f"{stage} failed:\n{done.stderr[-4000:]}")
        seconds = time.monotonic() - start
        probe = "import sam3ft.stages, torch; print(torch.backends.cpu.get_cpu_capability())"
        capability = subprocess.run(
            [sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        metrics = json.loads((work / "artifacts/eval/metrics.json").read_text())
        import torch

        row = {
            "date": datetime.date.today().isoformat(),
            "label": args.label,
            "env": extra,
            "cpu": cpu(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "aten_capability": capability,
            "seconds": round(seconds, 1),
            "md5": {rel: md5(work / rel) for rel in HASHED},
            "AP": {split: m.get("AP") for split, m in metrics.items()},
            "AP50": {split: m.get("AP50") for split, m in metrics.items()},
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
