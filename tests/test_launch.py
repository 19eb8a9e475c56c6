"""Launchers: the GPU count is checked before anything starts, SLURM jobs are built with the right
fields, and the submitit path really trains (submitit's local executor stands in for a cluster)."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, write_params
from sam3ft import params, preflight
from sam3ft.errors import ConfigError
from sam3ft.stages import fetch, prepare, train
from sam3ft.train import run
from sam3ft.train.launch import slurm_parameters


def launcher(**changes):
    base = dict(
        kind="slurm",
        partition="gpu",
        account="vision",
        qos="high",
        timeout_min=600,
        cpus_per_task=10,
        mem_gb=None,
    )
    return params.Launcher(**{**base, **changes})


def test_slurm_job_fields():
    assert slurm_parameters(launcher(), num_gpus=4, num_nodes=2, name="sam3ft-train") == {
        "name": "sam3ft-train",
        "timeout_min": 600,
        "nodes": 2,
        "gpus_per_node": 4,
        "tasks_per_node": 4,
        "cpus_per_task": 10,
        "slurm_partition": "gpu",
        "slurm_additional_parameters": {"account": "vision", "qos": "high"},
    }
    cpu = slurm_parameters(launcher(account=None, qos=None, mem_gb=64), num_gpus=0, num_nodes=1, name="x")
    assert cpu["tasks_per_node"] == 1 and cpu["mem_gb"] == 64 and "slurm_additional_parameters" not in cpu


def test_gpu_count_is_checked_before_anything_starts(shipped_params, tmp_path):
    gpus = torch.cuda.device_count()
    shipped_params["trainer"]["num_gpus"] = gpus + 1
    loaded = params.load(train.SECTIONS, write_params(tmp_path / "p.yaml", shipped_params))
    with pytest.raises(ConfigError, match=r"this machine has \d+ CUDA device"):
        preflight.check_devices(loaded.model, loaded.trainer, loaded.launcher, 4e6, gpus)
    shipped_params["trainer"].update(num_gpus=1, num_nodes=2)
    loaded = params.load(train.SECTIONS, write_params(tmp_path / "p.yaml", shipped_params))
    with pytest.raises(ConfigError, match=r"needs launcher\.kind: slurm"):
        preflight.check_devices(loaded.model, loaded.trainer, loaded.launcher, 4e6, gpus)


def test_effective_batch_is_recorded():
    trainer = SimpleNamespace(num_nodes=2, num_gpus=4, world_size=8, batch_size=2, grad_accum=3)
    record = train.launch_record(trainer, SimpleNamespace(kind="slurm"))
    assert record["effective_batch"] == 48 and record["world_size"] == 8
    assert record["lr_scaling"].startswith("none")


def test_rendezvous_port_comes_from_its_range_and_skips_a_bound_port(monkeypatch):
    """CI once failed with EADDRINUSE: the job's port (then chosen from the process id, inside the
    kernel's ephemeral range) was in use by another process."""
    assert all(run.free_port() in run.RENDEZVOUS_PORTS for _ in range(20))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        for offset in range(100, 200):  # a port of the range nobody holds, to hold it
            try:
                taken.bind(("", run.RENDEZVOUS_PORTS[offset]))
                break
            except OSError:
                continue
        else:
            pytest.fail("100 ports of the range are all bound")
        taken.listen()
        monkeypatch.setattr(run.random, "SystemRandom", lambda: SimpleNamespace(randrange=lambda n: offset))
        assert run.free_port() > run.RENDEZVOUS_PORTS[offset]


@pytest.mark.slow
def test_submitit_job_trains(shipped_params, tmp_path):
    """launcher.kind: slurm through submitit; without SLURM here its local executor runs the job."""
    for key in ("base", "prepared", "train", "eval", "export", "scratch"):
        shipped_params["paths"][key] = str(tmp_path / key)
    shipped_params["paths"]["data"] = str(REPO / "data")
    # a SLURM job states its GPUs per node (`auto` would count this machine's); 0: CPU tasks
    shipped_params["trainer"].update(max_epochs=1, num_gpus=0)
    shipped_params["launcher"]["kind"] = "slurm"
    path = write_params(tmp_path / "params.yaml", shipped_params)
    fetch.run(params.load(fetch.SECTIONS, path))
    prepare.run(params.load(prepare.SECTIONS, path))
    train.run(params.load(train.SECTIONS, path))
    stats = json.loads((tmp_path / "train/run/train_stats.json").read_text())
    assert [s["Trainer/epoch"] for s in stats] == [0]
    assert json.loads((tmp_path / "train/run/launch.json").read_text())["launcher"] == "slurm"
    assert list((tmp_path / "scratch/train/submitit").glob("*_result.pkl"))  # submitit ran the job
    # the task's INFO lines (sam3's and ours) reach its log, tagged with the rank
    (task_log,) = (tmp_path / "scratch/train/submitit").glob("*_0_log.err")
    assert "[train rank 0] INFO Setting up torch.distributed" in task_log.read_text()


@pytest.mark.parametrize(
    ("world", "batch", "accum", "fix"),
    [
        (1, 30, 1, "set trainer.batch_size: 24 or less"),
        (1, 6, 8, "set trainer.batch_size: 3 or less (or lower trainer.grad_accum)"),
        (1, 1, 30, "set trainer.grad_accum: 1 and trainer.batch_size: 24 or less"),
        (32, 1, 1, "train on at most 24 process(es)"),
    ],
)
def test_a_run_without_a_step_is_refused(tmp_path, world, batch, accum, fix):
    """24 training images: each case would train no optimizer step in any epoch."""
    trainer = SimpleNamespace(world_size=world, batch_size=batch, grad_accum=accum)
    with pytest.raises(ConfigError) as refused:
        preflight.check_steps(trainer, 24, tmp_path / "train" / "_annotations.coco.json")
    message = str(refused.value)
    assert f"trainer.batch_size={batch} x trainer.grad_accum={accum}" in message
    assert str(tmp_path / "train" / "_annotations.coco.json") in message
    assert refused.value.fix.startswith(fix)


def test_a_run_with_one_step_per_epoch_passes(tmp_path):
    for world, batch, accum in ((1, 24, 1), (1, 3, 8), (2, 6, 2), (24, 1, 1)):
        preflight.check_steps(
            SimpleNamespace(world_size=world, batch_size=batch, grad_accum=accum), 24, tmp_path
        )


def test_train_stage_refuses_before_writing_anything(shipped_params, tmp_path):
    """The check runs in the stage before any config, scratch or output exists."""
    for key in ("base", "prepared", "train", "eval", "export", "scratch"):
        shipped_params["paths"][key] = str(tmp_path / key)
    shipped_params["paths"]["data"] = str(REPO / "data")
    shipped_params["trainer"].update(batch_size=30)
    path = write_params(tmp_path / "params.yaml", shipped_params)
    fetch.run(params.load(fetch.SECTIONS, path))
    prepare.run(params.load(prepare.SECTIONS, path))
    with pytest.raises(ConfigError, match=r"has 24 training image\(s\).*every epoch would train no step"):
        train.run(params.load(train.SECTIONS, path))
    assert not (tmp_path / "train").exists() and not (tmp_path / "scratch").exists()
