"""Crashes and full disks: nothing half-written is ever visible, and errors say what to do."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from sam3ft import compat
from sam3ft.errors import Sam3ftError
from sam3ft.io import atomic_dir


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
    """sam3's own _save_checkpoint, with the disk filling up half-way through torch.save."""
    from sam3.train.trainer import Trainer

    compat.apply()
    path = tmp_path / "checkpoint.pt"
    Trainer._save_checkpoint(None, {"model": {"w": torch.ones(4)}}, str(path))
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    big = {"model": {"w": torch.zeros(250_000_000, dtype=torch.uint8)}, "optimizer": {}}
    with pytest.raises(
        Sam3ftError, match=r"needs ~0\.25 GB, [\d.]+ GB free; the previous checkpoint is intact"
    ):
        Trainer._save_checkpoint(None, big, str(path))
    assert path.read_bytes() == before
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def test_other_write_errors_are_not_disguised(tmp_path, monkeypatch):
    from sam3.train.trainer import Trainer

    compat.apply()

    def denied(obj, f, *args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(torch, "save", denied)
    with pytest.raises(OSError, match="Permission denied"):
        Trainer._save_checkpoint(None, {"w": torch.ones(1)}, str(tmp_path / "c.pt"))


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
