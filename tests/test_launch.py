"""Launchers: the GPU count is checked before anything starts, SLURM jobs are built with the right
fields, and the submitit path really trains (submitit's local executor stands in for a cluster)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, write_params
from sam3ft import params
from sam3ft.errors import ConfigError
from sam3ft.stages import fetch, prepare, train
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
    shipped_params["trainer"]["num_gpus"] = torch.cuda.device_count() + 1
    loaded = params.load(train.SECTIONS, write_params(tmp_path / "p.yaml", shipped_params))
    with pytest.raises(ConfigError, match=r"this machine has \d+ CUDA device"):
        train.check_devices(loaded["trainer"], loaded["launcher"])
    shipped_params["trainer"].update(num_gpus=1, num_nodes=2)
    loaded = params.load(train.SECTIONS, write_params(tmp_path / "p.yaml", shipped_params))
    with pytest.raises(ConfigError, match=r"needs launcher\.kind: slurm"):
        train.check_devices(loaded["trainer"], loaded["launcher"])


def test_effective_batch_is_recorded():
    trainer = SimpleNamespace(num_nodes=2, num_gpus=4, world_size=8, batch_size=2, grad_accum=3)
    record = train.launch_record(trainer, SimpleNamespace(kind="slurm"))
    assert record["effective_batch"] == 48 and record["world_size"] == 8
    assert record["lr_scaling"].startswith("none")


@pytest.mark.slow
def test_submitit_job_trains(shipped_params, tmp_path):
    """launcher.kind: slurm through submitit; without SLURM here its local executor runs the job."""
    for key in ("base", "prepared", "train", "eval", "export", "scratch"):
        shipped_params["paths"][key] = str(tmp_path / key)
    shipped_params["paths"]["data"] = str(REPO / "data")
    shipped_params["trainer"]["max_epochs"] = 1
    shipped_params["launcher"]["kind"] = "slurm"
    path = write_params(tmp_path / "params.yaml", shipped_params)
    fetch.run(params.load(fetch.SECTIONS, path))
    prepare.run(params.load(prepare.SECTIONS, path))
    train.run(params.load(train.SECTIONS, path))
    stats = json.loads((tmp_path / "train/run/train_stats.json").read_text())
    assert [s["Trainer/epoch"] for s in stats] == [0]
    assert json.loads((tmp_path / "train/run/launch.json").read_text())["launcher"] == "slurm"
    assert list((tmp_path / "scratch/train/submitit").glob("*_result.pkl"))  # submitit ran the job
