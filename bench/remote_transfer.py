"""DVC push/pull of a GB-scale output through S3 vs plain boto3 transfers, same run, same server.

Starts moto's S3 server on loopback in a child process (objects in RAM: keep --size-mib <= 1024 on a
24 GB machine), builds a throwaway DVC repo whose one stage writes --size-mib of random bytes, and
times, each --repeat times (median reported, every sample kept):
  dvc push (cache -> S3)        vs  boto3 upload_file:   default TransferConfig (8 MiB parts, 10 threads)
                                                         and s3fs's shape (50 MiB parts, 10 threads)
  dvc pull (fresh git clone)    vs  boto3 download_file: default (8 MiB ranged GETs, 10 threads),
                                                         s3fs's shape (50 MiB ranges), one GET
  no-op `dvc status` and `dvc repro` with the output present, where it was made and in the fresh
  clone after its pull (goal: <= 3 s).
Every copy is checked bit for bit, and HTTP 5xx answers of the server are counted per step (the
clients retry them; the time includes that). Writes a Markdown report (device, command, date,
versions, every number) to --out. Not a unit test: run it by hand from the repo root, venv active:

    python bench/remote_transfer.py                 # 1 GiB, 3 repeats -> bench/results/remote_transfer.md
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing as mp
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig

REPO = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
BUCKET = "bench"
KEY_ID, SECRET = "bench-key-id", "bench-fake-secret"  # moto without auth accepts any key
OUTPUT = "big.bin"
NOOP_GOAL_S = 3.0
MIB = 1 << 20
MAKE_OUTPUT = """import os, sys
size, chunk = int(sys.argv[1]), 64 << 20
with open("big.bin", "wb") as f:
    for start in range(0, size, chunk):
        f.write(os.urandom(min(chunk, size - start)))
"""
UPLOADS = {  # boto3 request shapes for the same upload
    "boto3 upload_file, 8 MiB parts (default)": TransferConfig(),
    "boto3 upload_file, 50 MiB parts (as s3fs)": TransferConfig(multipart_chunksize=50 * MIB),
}
DOWNLOADS = {
    "boto3 download_file, 8 MiB ranges (default)": TransferConfig(),
    "boto3 download_file, 50 MiB ranges (as s3fs)": TransferConfig(multipart_chunksize=50 * MIB),
    "boto3 download_file, one GET": TransferConfig(multipart_threshold=1 << 50),
}
DVC_PUSH, DVC_PULL = "dvc push", "dvc pull, fresh clone"
NOTES = [  # how to read the table; facts about this setup, not about the numbers of one run
    "Reading it: DVC (s3fs underneath) uploads 50 MiB parts and downloads 50 MiB ranges (after opening",
    "one full GET), 10 at a time, so the boto3 rows marked *as s3fs* send about the same requests and",
    "their ratio is DVC's own overhead (process start, index, existence checks, hashing, retries). moto",
    "copies the whole object for every GET, ranged or not, under a per-object lock (`FakeKey.value`),",
    "so here a download costs about one object-sized copy per request: the 8 MiB default (128 requests)",
    "is slow for that reason only; on AWS S3 ranged GETs are cheap. 5xx during `dvc push` were, in our",
    "runs, moto answering 500 to CompleteMultipartUpload (`I/O operation on closed file`) under s3fs's",
    "concurrent parts; the client retries, and every copy above was checked bit for bit.",
]


def serve_moto(conn: Connection, log: str) -> None:
    """Child process: moto on a free loopback port, its request log in `log`; sends the port and
    serves until told to stop."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").addHandler(logging.FileHandler(log))
    logging.getLogger("werkzeug").setLevel(logging.INFO)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    conn.send(server.get_host_and_port()[1])
    conn.recv()
    server.stop()


def server_errors(log: Path) -> int:
    """HTTP 5xx answers the server has logged so far."""
    return len(re.findall(r'" 5\d\d ', log.read_text()))  # '..."POST /b/k HTTP/1.1" 500 -'


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed in {cwd}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def dvc(repo: Path, env: dict[str, str], *args: str) -> str:
    return sh([*DVC, *args], repo, env)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 * MIB):
            digest.update(block)
    return digest.hexdigest()


def clean_env(aws_dir: Path) -> dict[str, str]:
    """No AWS_* from this shell (keys go to config.local), empty AWS config files, git identity."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_", "GIT_"))}
    for name in ("config", "credentials"):
        (aws_dir / name).touch()
    return env | {
        "AWS_CONFIG_FILE": str(aws_dir / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(aws_dir / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@localhost",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@localhost",
    }


def use_bucket(repo: Path, env: dict[str, str], endpoint: str) -> None:
    """Endpoint and keys in the git-ignored .dvc/config.local, as docs/remotes.md says."""
    for option, value in (
        ("endpointurl", endpoint),
        ("access_key_id", KEY_ID),
        ("secret_access_key", SECRET),
    ):
        dvc(repo, env, "remote", "modify", "--local", "storage", option, value)


def make_repo(repo: Path, env: dict[str, str], size: int, cache_type: str) -> float:
    """git + DVC repo with our cache.type and one stage writing `size` random bytes; the repro time."""
    repo.mkdir()
    sh(["git", "init", "-q", "-b", "main"], repo, env)
    dvc(repo, env, "init", "-q")
    for key, value in (
        ("core.analytics", "false"),
        ("core.check_update", "false"),
        ("cache.type", cache_type),
    ):
        dvc(repo, env, "config", key, value)
    dvc(repo, env, "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc")
    (repo / "make_output.py").write_text(MAKE_OUTPUT)
    cmd = f"python make_output.py {size}"
    dvc(repo, env, "stage", "add", "-q", "-n", "make", "-d", "make_output.py", "-o", OUTPUT, cmd)
    seconds, _ = timed(lambda: dvc(repo, env, "repro", "-q"))
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "bench"], repo, env)
    return seconds


def noop_times(repo: Path, env: dict[str, str], repeat: int, where: str) -> dict[str, list[float]]:
    """`dvc status` and `dvc repro` with nothing to do; fails if repro runs anything."""
    status, repro = [], []
    for _ in range(repeat):
        status.append(timed(lambda: dvc(repo, env, "status"))[0])
        seconds, out = timed(lambda: dvc(repo, env, "repro"))
        if "Running stage" in out:
            raise RuntimeError(f"repro in {repo} was not a no-op:\n{out}")
        repro.append(seconds)
    return {f"dvc status, {where}": status, f"dvc repro, {where}": repro}


def empty_prefix(s3: Any, prefix: str) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=BUCKET, Key=obj["Key"])


def one_round(repos: tuple[Path, Path], env: dict[str, str], s3: Any, scratch: Path, log: Path) -> dict:
    """Each transfer once, DVC's from an empty remote prefix and an empty clone cache:
    {name: (seconds, server 5xx answers)}."""
    origin, clone = repos
    key, steps = f"plain/{OUTPUT}", {}

    def step(name: str, fn: Callable[[], Any]) -> None:
        errors = server_errors(log)
        seconds, _ = timed(fn)
        steps[name] = (seconds, server_errors(log) - errors)

    empty_prefix(s3, "dvc/")
    step(DVC_PUSH, lambda: dvc(origin, env, "push", "-q"))
    for name, config in UPLOADS.items():
        step(name, lambda c=config: s3.upload_file(str(origin / OUTPUT), BUCKET, key, Config=c))
    shutil.rmtree(clone / ".dvc" / "cache", ignore_errors=True)
    (clone / OUTPUT).unlink(missing_ok=True)
    step(DVC_PULL, lambda: dvc(clone, env, "pull", "-q"))
    for name, config in DOWNLOADS.items():
        scratch.unlink(missing_ok=True)
        step(name, lambda c=config: s3.download_file(BUCKET, key, str(scratch), Config=c))
    return steps


def measure(work: Path, env: dict[str, str], endpoint: str, s3: Any, args: argparse.Namespace) -> dict:
    """Every measurement, `args.repeat` times each; checks every copy against the original."""
    origin, clone, scratch, log = work / "origin", work / "clone", work / "download.bin", args.server_log
    cache_type = dvc(REPO, env, "config", "cache.type").strip()  # the one in our .dvc/config
    times = {"dvc --version (process start, for scale)": [timed(lambda: dvc(REPO, env, "--version"))[0]]}
    times["dvc repro (write, hash, cache)"] = [make_repo(origin, env, args.size_mib * MIB, cache_type)]
    use_bucket(origin, env, endpoint)
    reference = sha256(origin / OUTPUT)
    times |= noop_times(origin, env, args.repeat, "origin")
    sh(["git", "clone", "-q", str(origin), str(clone)], work, env)
    use_bucket(clone, env, endpoint)
    errors: dict[str, int] = {}
    for _ in range(args.repeat):
        for name, (seconds, failed) in one_round((origin, clone), env, s3, scratch, log).items():
            times.setdefault(name, []).append(seconds)
            errors[name] = errors.get(name, 0) + failed
        for copy in (clone / OUTPUT, scratch):  # scratch: the last boto3 download
            if sha256(copy) != reference:
                raise RuntimeError(f"{copy} differs from the pushed output")
    objects = [p for p in (clone / ".dvc" / "cache").rglob("*") if p.is_file()]
    cached = max(objects, key=lambda p: p.stat().st_size)
    hardlinked = (clone / OUTPUT).stat().st_ino == cached.stat().st_ino
    times |= noop_times(clone, env, args.repeat, "fresh clone after pull")
    return {"times": times, "errors": errors, "cache_type": cache_type, "hardlinked": hardlinked}


def device() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    return f"{model}, {os.cpu_count()} cores, {mem_kb / 2**20:.0f} GiB RAM, {platform.platform()}"


def report(args: argparse.Namespace, result: dict, context: dict[str, str]) -> str:
    times, errors = result["times"], result["errors"]
    med = {k: statistics.median(v) for k, v in times.items()}
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("dvc", "dvc-s3", "s3fs", "boto3", "moto"))
    mib = args.size_mib
    lines = [
        "# Remote transfer benchmark",
        "",
        f"- Command: `{context['command']}` (repo root, venv active)",
        f"- Date (`date -u` at start): {context['date']}",
        f"- Device: {device()}",
        f"- Work dir filesystem: {context['fs']}; `cache.type` {result['cache_type']}"
        f" (pulled output hardlinked to its cache object: {'yes' if result['hardlinked'] else 'no'})",
        f"- Load average (1/5/15 min) at start and end: {context['load_start']} / {context['load_end']}"
        " (shared machine: other jobs may have run meanwhile)",
        f"- Python {platform.python_version()}, {versions}",
        f"- Payload: one {mib} MiB file of random bytes, the output of a one-stage DVC pipeline. S3: moto",
        "  server on 127.0.0.1 in a child process (objects in RAM, no auth).",
        f"- Each time: median of {args.repeat} runs, all in this one process (samples below). 5xx: HTTP",
        "  errors the server answered in that step, all runs together (clients retry; time included).",
        "",
        "## DVC vs plain boto3: same file, same server, same run",
        "",
        "| direction | command | s | MiB/s | 5xx | DVC / this |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for direction, ours, plain in (("upload", DVC_PUSH, UPLOADS), ("download", DVC_PULL, DOWNLOADS)):
        for name in (ours, *plain):
            ratio = "" if name == ours else f"**{med[ours] / med[name]:.2f}x**"
            speed = f"{med[name]:.1f} | {mib / med[name]:.0f}"
            lines.append(f"| {direction} | `{name}` | {speed} | {errors[name]} | {ratio} |")
    lines += ["", *NOTES]
    lines += ["", f"## No-op commands with the {mib} MiB output present (goal <= {NOOP_GOAL_S:.0f} s)", ""]
    lines += ["| command | s | goal met |", "|---|---:|---|"]
    for name, value in med.items():
        if name.startswith(("dvc status,", "dvc repro,")):
            lines.append(f"| `{name}` | {value:.2f} | {'yes' if value <= NOOP_GOAL_S else 'NO'} |")
    lines += ["", "## Every sample (s)", ""]
    lines += [f"- {name}: {', '.join(f'{v:.2f}' for v in values)}" for name, values in times.items()]
    return "\n".join(lines) + "\n"


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="payload size; moto holds it in RAM")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median reported)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "remote_transfer.md")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="parent of the temp repos (default TMPDIR)"
    )
    args = parser.parse_args()
    context = {
        "command": shlex.join(["python", *sys.argv]),
        "date": subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip(),
        "load_start": load(),
    }
    spawn = mp.get_context("spawn")  # a clean child: no threads or sockets of ours
    with tempfile.TemporaryDirectory(prefix="sam3ft-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        args.server_log = work / "moto.log"
        args.server_log.touch()
        parent, child = spawn.Pipe()
        server = spawn.Process(target=serve_moto, args=(child, str(args.server_log)), daemon=True)
        server.start()
        try:
            endpoint = f"http://127.0.0.1:{parent.recv()}"
            s3 = boto3.client(
                "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID,
                aws_secret_access_key=SECRET,
            )  # fmt: skip
            s3.create_bucket(Bucket=BUCKET)
            df = subprocess.run(["df", "-T", str(work)], capture_output=True, text=True, check=True)
            context["fs"] = " on ".join(df.stdout.splitlines()[1].split()[1::-1])
            result = measure(work, clean_env(work), endpoint, s3, args)
        finally:
            parent.send("stop")
            server.join(timeout=30)
    context["load_end"] = load()
    text = report(args, result, context)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
