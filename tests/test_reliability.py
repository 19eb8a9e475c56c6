"""Crashes and full disks: nothing half-written is ever visible, and errors say what to do."""

from __future__ import annotations

import errno
import json
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from conftest import checkout_copy, write_params
from sam3ft.errors import Sam3ftError
from sam3ft.io import atomic_dir
from sam3ft.train.trainer import Trainer


def test_stage_output_survives_a_kill_and_the_next_run_cleans_up(tmp_path):
    """Every stage writes through atomic_dir: SIGKILL mid-write leaves the previous output whole."""
    out = tmp_path / "artifacts" / "export"
    with atomic_dir(out) as d:
        (d / "model.safetensors").write_bytes(b"old, complete")
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from sam3ft.io import atomic_dir
        with atomic_dir(Path({str(out)!r})) as d:
            (d / "model.safetensors").write_bytes(b"half")
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "model.safetensors").read_bytes() == b"old, complete"
    assert len(list(out.parent.glob(".export.tmp-*"))) == 1  # the killed writer's leftovers
    with atomic_dir(out) as d:
        (d / "model.safetensors").write_bytes(b"new")
    assert (out / "model.safetensors").read_bytes() == b"new"
    assert list(out.parent.glob(".export.*")) == []


def test_an_error_inside_leaves_the_previous_output(tmp_path):
    out = tmp_path / "eval"
    with atomic_dir(out) as d:
        (d / "metrics.json").write_text("{}")
    with pytest.raises(RuntimeError), atomic_dir(out) as d:
        (d / "metrics.json").write_text('{"half":')
        raise RuntimeError("boom")
    assert (out / "metrics.json").read_text() == "{}"
    assert list(tmp_path.glob(".eval.*")) == []


def test_full_disk_at_checkpoint_time_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Our Trainer's _save_checkpoint (the one the pipeline runs), the disk filling up half-way
    through torch.save."""
    path = tmp_path / "checkpoint.pt"
    object.__new__(Trainer)._save_checkpoint({"model": {"w": torch.ones(4)}}, str(path))
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    big = {"model": {"w": torch.zeros(250_000_000, dtype=torch.uint8)}, "optimizer": {}}
    with pytest.raises(
        Sam3ftError, match=r"needs ~0\.25 GB, [\d.]+ GB free; the previous checkpoint is intact"
    ):
        object.__new__(Trainer)._save_checkpoint(big, str(path))
    assert path.read_bytes() == before
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def test_other_write_errors_are_not_disguised(tmp_path, monkeypatch):
    def denied(obj, f, *args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(torch, "save", denied)
    with pytest.raises(OSError, match="Permission denied"):
        object.__new__(Trainer)._save_checkpoint({"w": torch.ones(1)}, str(tmp_path / "c.pt"))
    assert not (tmp_path / "c.pt.tmp").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 80 MB tmpfs: room for one tiny-model checkpoint (51 MB with AdamW), not for its successor
    beside it. Mounting needs root, as CI runs."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.slow
def test_train_stage_on_a_full_disk_explains_and_resumes_after_space_is_freed(tmp_path, small_disk):
    """The real pipeline: `dvc repro train` with the trainer's scratch folder on a disk that fills up
    at the second epoch's checkpoint. One message with the space needed, the first checkpoint
    intact, no temporary file; once the disk is larger, `dvc repro train` resumes and finishes."""
    repo = tmp_path / "repo"
    env = checkout_copy(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["paths"]["scratch"] = str(small_disk)
    params["trainer"]["max_epochs"] = 3
    write_params(repo / "params.yaml", params)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "pull", "-q", "data.dvc"], cwd=repo, env=env, check=True)
    failed = subprocess.run([*dvc, "repro", "train"], cwd=repo, env=env, capture_output=True, text=True)
    assert failed.returncode != 0
    assert re.search(
        r"\[train\] error: disk full while writing \S+checkpoint\.pt: it needs ~0\.05 GB, [\d.]+ GB free; "
        r"the previous checkpoint is intact\s+fix: free at least [\d.]+ GB",
        failed.stderr,
    ), failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    checkpoints = small_disk / "train" / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert "checkpoint.pt" in names and not [n for n in names if n.endswith(".tmp")], names
    assert torch.load(checkpoints / "checkpoint.pt", weights_only=True)["epoch"] == 1
    subprocess.run(["mount", "-o", "remount,size=300m", str(small_disk)], check=True)
    resumed = subprocess.run([*dvc, "repro", "train"], cwd=repo, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr, resumed.stderr[-4000:]
    stats = json.loads((repo / "artifacts/train/run/train_stats.json").read_text())
    assert [s["Trainer/epoch"] for s in stats] == [0, 1, 2]


def test_dvc_gitignore_in_the_output_folder_survives(tmp_path):
    """DVC lists a stage's outputs in a .gitignore inside their folder: swapping must keep it."""
    out = tmp_path / "train"
    with atomic_dir(out) as d:
        (d / "checkpoint.pt").write_bytes(b"1")
    (out / ".gitignore").write_text("/checkpoint.pt\n/run\n")
    with atomic_dir(out) as d:
        (d / "checkpoint.pt").write_bytes(b"2")
    assert (out / ".gitignore").read_text() == "/checkpoint.pt\n/run\n"
    assert (out / "checkpoint.pt").read_bytes() == b"2"
