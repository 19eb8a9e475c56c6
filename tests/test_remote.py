"""The `storage` S3 remote against a real S3 endpoint on loopback: push, pull, share, sweep.

A moto server (objects in memory, 127.0.0.1, IAM auth on) stands in for the team bucket. Clone A
runs the pipeline once and one short experiment; every other clone gets its outputs from S3 or from
A's cache, never by training again, so the module costs one `dvc repro`, one `dvc exp run` and the
sweep. Keys live in each clone's `.dvc/config.local`; no AWS key variable reaches any dvc command.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from dvc.repo import Repo
from moto.server import ThreadedMotoServer

from conftest import closed_port, copy_worktree, run_ok
from sam3ft.io import sha256_file

pytestmark = pytest.mark.slow

BUCKET = "sam3ft-remote-test"
PREFIX = "sam3ft"
DVC = [sys.executable, "-m", "dvc"]
EXPERIMENT = "one-epoch"
CHECKPOINT = "artifacts/train/checkpoint.pt"
METRICS = "artifacts/eval/summary.json"  # the DVC metrics file (evaluate's decision metrics)
SWEEP_SECONDS = 420  # 4 queued runs (3 trained, 1 restored from the run cache) on 2 cores take ~2 min
ALLOW_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


@dataclass(frozen=True)
class S3:
    endpoint: str  # http://127.0.0.1:<port>
    key_id: str
    secret: str


def moto_api(endpoint: str, action: str, body: bytes) -> None:
    """moto's own control API (not S3): reset-auth takes the number of unauthenticated calls left."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/{action}", data=body, method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def dvc(repo: Path, env: dict[str, str], *args: str) -> str:
    """Run a dvc command that must succeed; its stdout."""
    return run_ok([*DVC, *args], repo, env).stdout


def dvc_fails(repo: Path, env: dict[str, str], *args: str) -> str:
    """Run a dvc command that must fail; its stdout and stderr."""
    result = subprocess.run([*DVC, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, f"dvc {' '.join(args)} succeeded:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def set_local(repo: Path, env: dict[str, str], **options: str) -> None:
    """`storage` options in the git-ignored .dvc/config.local, as docs/remotes.md says."""
    for option, value in options.items():
        dvc(repo, env, "remote", "modify", "--local", "storage", option, value)


def use_bucket(repo: Path, env: dict[str, str], s3: S3) -> None:
    set_local(repo, env, endpointurl=s3.endpoint, access_key_id=s3.key_id, secret_access_key=s3.secret)


def clone(hub: Path, dst: Path, env: dict[str, str]) -> Path:
    run_ok(["git", "clone", "-q", str(hub), str(dst)], dst.parent, env)
    return dst


def tracked_outputs(repo: Path) -> dict[str, bool]:
    """Every DVC output (dvc.yaml stages and .dvc files): path relative to `repo` -> kept in the cache."""
    with Repo(str(repo)) as dvc_repo:
        return {Path(o.fs_path).relative_to(repo).as_posix(): o.use_cache for o in dvc_repo.index.outs}


def files_under(repo: Path, paths: Iterable[str]) -> list[Path]:
    files: list[Path] = []
    for rel in paths:
        root = repo / rel
        files += [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return files


def output_hashes(repo: Path) -> dict[str, str]:
    """sha256 of every file of every DVC output, cached or not."""
    return {f.relative_to(repo).as_posix(): sha256_file(f) for f in files_under(repo, tracked_outputs(repo))}


def workspace_hashes(repo: Path) -> dict[str, str]:
    """sha256 of every file outside .git and .dvc/tmp (DVC's locks, logs and state db): the workspace
    plus the cache, so a half-finished download would show too."""
    skip = (repo / ".git", repo / ".dvc" / "tmp")
    return {
        p.relative_to(repo).as_posix(): sha256_file(p)
        for p in sorted(repo.rglob("*"))
        if p.is_file() and not any(p.is_relative_to(s) for s in skip)
    }


def cache_object(repo: Path, path: Path) -> Path:
    """Where DVC 3 keeps a file's content: .dvc/cache/files/md5/<2 hex>/<30 hex>."""
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    return repo / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]


def files_holding(root: Path, needle: bytes) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()
    )


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """moto on a free loopback port with one bucket and one IAM user allowed s3:*, auth enforced."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    admin = {"endpoint_url": endpoint, "region_name": "us-east-1"}
    admin |= {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="ci")
    iam.put_user_policy(UserName="ci", PolicyName="s3", PolicyDocument=json.dumps(ALLOW_S3))
    key = iam.create_access_key(UserName="ci")["AccessKey"]
    boto3.client("s3", **admin).create_bucket(Bucket=BUCKET)
    moto_api(endpoint, "reset-auth", b"0")  # from now on every request must be signed by that key
    try:
        yield S3(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        moto_api(endpoint, "reset-auth", b"inf")  # moto's auth switch is per process: restore it for
        moto_api(endpoint, "reset", b"")  # later tests, and drop our bucket and user
        server.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """No AWS_* variable but empty AWS config files (keys come from config.local only, never from
    ~/.aws or the environment), git identity set."""
    aws = tmp_path_factory.mktemp("aws")
    for name in ("config", "credentials"):
        (aws / name).touch()
    bin_dir = str(Path(sys.executable).parent)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_", "AWS_"))}
    clean.pop("OMP_NUM_THREADS", None)  # the stages pin threads themselves
    return clean | {
        "PATH": f"{bin_dir}:{clean['PATH']}",
        # Stages import sam3ft from the clone they run in (relative: queued runs use their temp dir),
        # not from the editable install, which points at this checkout's src/, edits and all.
        "PYTHONPATH": "src",
        "AWS_CONFIG_FILE": str(aws / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }


@pytest.fixture(scope="module")
def hub(tmp_path_factory, env) -> Path:
    """The team's git remote (bare)."""
    path = tmp_path_factory.mktemp("hub") / "sam3ft.git"
    run_ok(["git", "init", "-q", "--bare", "-b", "main", str(path)], path.parent, env)
    return path


@pytest.fixture(scope="module")
def origin(tmp_path_factory, s3, env, hub) -> dict:
    """Clone A: this checkout, the bucket URL committed, `dvc repro`, `dvc push`, git pushed to hub."""
    repo = tmp_path_factory.mktemp("a")
    copy_worktree(repo)
    run_ok(["git", "init", "-q", "-b", "main"], repo, env)
    dvc(repo, env, "remote", "modify", "storage", "url", f"s3://{BUCKET}/{PREFIX}")
    run_ok(["git", "add", "-A"], repo, env)
    run_ok(["git", "commit", "-qm", "clone, storage on the team bucket"], repo, env)
    use_bucket(repo, env, s3)
    dvc(repo, env, "pull", "data.dvc")
    dvc(repo, env, "repro")
    pushed = dvc(repo, env, "push")
    run_ok(["git", "add", "-A"], repo, env)  # dvc.lock, metrics: whatever repro changed
    run_ok(["git", "commit", "-qm", "repro", "--allow-empty"], repo, env)
    run_ok(["git", "remote", "add", "origin", str(hub)], repo, env)
    run_ok(["git", "push", "-q", "origin", "main"], repo, env)
    return {"repo": repo, "hashes": output_hashes(repo), "pushed": pushed}


@pytest.fixture(scope="module")
def pulled(tmp_path_factory, s3, env, hub, origin) -> Path:
    """Clone B: a fresh git clone of hub, keys in config.local, `dvc pull`."""
    repo = clone(hub, tmp_path_factory.mktemp("b") / "sam3ft", env)
    use_bucket(repo, env, s3)
    dvc(repo, env, "pull")
    return repo


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, s3, env, hub, origin) -> dict:
    """A one-epoch experiment run in A and `dvc exp push`ed; clone C `dvc exp pull`s and applies it."""
    a = origin["repo"]
    dvc(a, env, "exp", "run", "-n", EXPERIMENT, "-S", "trainer.max_epochs=1")
    hashes = output_hashes(a)
    dvc(a, env, "exp", "push", "origin", EXPERIMENT)
    c = clone(hub, tmp_path_factory.mktemp("c") / "sam3ft", env)
    use_bucket(c, env, s3)
    dvc(c, env, "exp", "pull", "origin", EXPERIMENT)
    dvc(c, env, "pull", "data.dvc")  # push: false keeps the sample out of `exp push`/`exp pull`
    dvc(c, env, "exp", "apply", EXPERIMENT)
    return {"hashes": hashes, "repo": c}


@pytest.fixture(scope="module")
def offline(tmp_path_factory, s3, env, hub, origin) -> Path:
    """Clone D with S3 unreachable (a closed port): only the bundled sample, pulled from the in-repo store."""
    repo = clone(hub, tmp_path_factory.mktemp("d") / "sam3ft", env)
    use_bucket(repo, env, s3)
    set_local(repo, env, endpointurl=f"http://127.0.0.1:{closed_port()}")
    dvc(repo, env, "pull", "data.dvc")
    return repo


def test_push_then_pull_in_a_fresh_clone_is_bit_identical(origin, pulled):
    hashes = output_hashes(pulled)
    assert hashes == origin["hashes"]
    assert CHECKPOINT in hashes and "artifacts/export/model/model.json" in hashes
    assert len(hashes) > 50  # data, prepared images, predictions, ... not just a few files
    assert "files pushed" in origin["pushed"]


def test_after_pull_status_is_clean_and_repro_reruns_nothing(origin, pulled, env):
    assert "Data and pipelines are up to date." in dvc(pulled, env, "status")
    assert "Cache and remote 'storage' are in sync." in dvc(pulled, env, "status", "--cloud")
    again = dvc(pulled, env, "repro")
    assert "Running stage" not in again and "didn't change, skipping" in again
    assert output_hashes(pulled) == origin["hashes"]
    assert not (pulled / ".work").exists()  # nothing trained here


def test_pulled_outputs_are_links_into_the_cache_not_copies(pulled, env):
    """`cache.type: reflink,hardlink,copy`: on a filesystem without reflinks (ext4 here) every cached
    output is a hardlink of its cache object, read-only, so a checkpoint takes its size once."""
    assert dvc(pulled, env, "config", "cache.type").strip() == "reflink,hardlink,copy"
    link_types = re.search(r"Cache types: (.*)", dvc(pulled, env, "doctor"))
    assert link_types, "dvc doctor printed no cache types"
    if "reflink" in link_types.group(1):
        pytest.skip("reflinks share blocks, not inodes: link counts say nothing here")
    assert "hardlink" in link_types.group(1)
    cached = [rel for rel, use_cache in tracked_outputs(pulled).items() if use_cache]
    files = files_under(pulled, cached)
    assert pulled / CHECKPOINT in files
    for path in files:
        stat, obj = path.stat(), cache_object(pulled, path)
        assert stat.st_ino == obj.stat().st_ino and stat.st_nlink >= 2, f"{path} is a copy"
        assert not stat.st_mode & 0o222, f"{path} is writable: an edit would corrupt the cache"


def test_experiment_is_shared_through_exp_push_and_pull(origin, experiment, s3, env):
    c = experiment["repo"]
    assert output_hashes(c) == experiment["hashes"]
    assert experiment["hashes"][CHECKPOINT] != origin["hashes"][CHECKPOINT]
    assert json.loads((c / "artifacts/train/run/train_stats.json").read_text())[-1]["Trainer/epoch"] == 0
    assert "Data and pipelines are up to date." in dvc(c, env, "status")
    assert not (c / ".work").exists()  # the outputs came from S3, not from training here
    digest = hashlib.md5((c / CHECKPOINT).read_bytes()).hexdigest()
    bucket = boto3.client(
        "s3", endpoint_url=s3.endpoint, region_name="us-east-1", aws_access_key_id=s3.key_id,
        aws_secret_access_key=s3.secret,
    )  # fmt: skip
    bucket.head_object(Bucket=BUCKET, Key=f"{PREFIX}/files/md5/{digest[:2]}/{digest[2:]}")


def test_bundled_sample_pulls_offline_with_s3_unreachable(offline):
    assert (offline / "data/find-fuse-neutrals-v5/train/_annotations.coco.json").is_file()
    assert not (offline / CHECKPOINT).exists()


@pytest.mark.parametrize("case", ["bad secret", "missing bucket", "closed port"])
def test_remote_errors_are_clear_and_leave_the_workspace_unchanged(case, s3, env, offline, pulled):
    """`dvc pull` into clone D (needs every pipeline output) and `dvc push` from clone B (asks the
    bucket what it holds) both fail, say why, and change no file."""
    port = closed_port()
    bad, expected = {
        "bad secret": ({"secret_access_key": "wrong" + s3.secret[5:]}, ["(403)", "Forbidden"]),
        "missing bucket": (
            {"url": f"s3://no-such-{BUCKET}/{PREFIX}"},
            ["(NoSuchBucket)", "The specified bucket does not exist"],
        ),
        "closed port": (
            {"endpointurl": f"http://127.0.0.1:{port}"},
            [f'Could not connect to the endpoint URL: "http://127.0.0.1:{port}/{BUCKET}/{PREFIX}/'],
        ),
    }[case]
    for repo, command in ((offline, "pull"), (pulled, "push")):
        local = repo / ".dvc" / "config.local"
        saved, before = local.read_text(), workspace_hashes(repo)
        try:
            set_local(repo, env, **{"endpointurl": s3.endpoint} | bad)
            message = dvc_fails(repo, env, command)
        finally:
            local.write_text(saved)
        assert all(e in message for e in expected), f"{case}: dvc {command} said:\n{message}"
        assert workspace_hashes(repo) == before


def test_remote_gc_policy_keeps_history_and_experiments(pulled, experiment, env):
    """docs/remotes.md's S3 gc, dry, from clone B once it has fetched every experiment: `--all-commits
    --all-experiments --cloud` deletes nothing; `--workspace --cloud` would delete the experiment's
    checkpoint from S3 (the command docs/remotes.md forbids)."""
    dvc(pulled, env, "exp", "pull", "origin", "--all-commits", "--no-cache")
    safe = dvc(pulled, env, "gc", "--all-commits", "--all-experiments", "--cloud", "--dry", "-f")
    assert "Removing" not in safe and "No unused cache to remove from remote." in safe
    risky = dvc(pulled, env, "gc", "--workspace", "--cloud", "--dry", "-f")
    digest = hashlib.md5((experiment["repo"] / CHECKPOINT).read_bytes()).hexdigest()
    assert f"{digest[:2]}/{digest[2:]}" in risky


def test_secret_lives_only_in_config_local(s3, env, hub, origin, pulled, experiment, offline):
    needle = s3.secret.encode()
    for repo in (origin["repo"], pulled, experiment["repo"], offline):
        assert files_holding(repo, needle) == [".dvc/config.local"], repo
    revs = run_ok(["git", "rev-list", "--all"], hub, env).stdout.split()
    assert len(revs) >= 3  # clone, repro, the experiment
    grep = subprocess.run(["git", "grep", "-F", "-e", s3.secret, *revs], cwd=hub, capture_output=True)
    assert grep.returncode == 1, grep.stdout  # 1: no match in any commit, experiments included


def test_queued_sweep_runs_four_experiments_with_metrics(tmp_path_factory, env, hub, origin, experiment):
    """`dvc exp run --queue` 2x2 grid + `dvc queue start -j 2` in clone E, which shares A's cache
    (`dvc cache dir --local`): no S3 needed, and the (1.0, 1 epoch) point comes from the run cache."""
    e = clone(hub, tmp_path_factory.mktemp("e") / "sam3ft", env)
    dvc(e, env, "cache", "dir", "--local", str(origin["repo"] / ".dvc" / "cache"))
    dvc(e, env, "checkout")
    dvc(e, env, "exp", "run", "--queue", "-S", "trainer.lr_scale=0.5,1.0", "-S", "trainer.max_epochs=1,2")
    # The workers outlive `queue start` and would hold captured pipes open until they exit.
    start = [*DVC, "queue", "start", "-j", "2"]
    subprocess.run(start, cwd=e, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    deadline = time.monotonic() + SWEEP_SECONDS
    while re.search(r"\b(Queued|Running)\b", status := dvc(e, env, "queue", "status")):
        assert time.monotonic() < deadline, f"sweep not done in {SWEEP_SECONDS} s:\n{status}"
        time.sleep(5)
    dvc(e, env, "queue", "stop")
    for _ in range(30):  # idle workers shut down by themselves; stop asks them too
        if "Worker status: 0 active, 0 idle" in dvc(e, env, "queue", "status"):
            break
        time.sleep(2)
    failed = [line.split()[1] for line in status.splitlines() if re.search(r"\bFailed\b", line)]
    logs = [
        subprocess.run([*DVC, "queue", "logs", n], cwd=e, env=env, capture_output=True, text=True)
        for n in failed
    ]
    assert not failed, status + "\n".join(r.stdout + r.stderr for r in logs)
    baseline = next(b for b in json.loads(dvc(e, env, "exp", "show", "--json")) if b["name"] == "main")
    runs = [exp["revs"][0] for exp in baseline["experiments"]]
    assert len(runs) == 4, [r["name"] for r in runs]
    grid = set()
    for exp in runs:
        assert exp["error"] is None, exp["error"]
        trainer = exp["data"]["params"]["params.yaml"]["data"]["trainer"]
        grid.add((trainer["lr_scale"], trainer["max_epochs"]))
        ap = exp["data"]["metrics"][METRICS]["data"]["valid"]["AP"]
        assert isinstance(ap, float) and 0.0 <= ap <= 1.0, (exp["name"], ap)
    assert grid == {(0.5, 1), (0.5, 2), (1.0, 1), (1.0, 2)}
