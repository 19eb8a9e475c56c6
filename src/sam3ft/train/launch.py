"""Start sam3's trainer on this machine (one process per GPU) or on a SLURM cluster (submitit).

No launcher of our own: local runs use torch.multiprocessing as sam3/train/train.py does, clusters
use submitit as upstream does. Every process runs `run_trainer` on the same composed config; sam3's
trainer then writes checkpoints and logs on rank 0 only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from sam3ft.params import Launcher
from sam3ft.train.run import free_port, run_trainer


def _config(text: str) -> DictConfig:
    cfg = OmegaConf.create(text)
    assert isinstance(cfg, DictConfig)
    return cfg


def _log_as_rank(rank: int) -> None:
    """INFO lines of this process (sam3's and ours) to stderr, tagged with its rank: a spawned worker
    or a SLURM task starts without the stage's log handlers."""
    logging.basicConfig(level=logging.INFO, format=f"[train rank {rank}] %(levelname)s %(message)s")


def _local_worker(local_rank: int, cfg_yaml: str, port: int, world_size: int) -> None:
    _log_as_rank(local_rank)
    run_trainer(_config(cfg_yaml), local_rank, local_rank, world_size, ("127.0.0.1", port))


def launch_local(cfg: DictConfig, num_gpus: int) -> None:
    """In this process for CPU or one GPU; else one spawned process per GPU (NCCL on loopback)."""
    if num_gpus <= 1:
        run_trainer(cfg)
        return
    cfg_yaml = OmegaConf.to_yaml(cfg)  # plain text crosses the spawn boundary
    mp.start_processes(
        _local_worker, args=(cfg_yaml, free_port(), num_gpus), nprocs=num_gpus, start_method="spawn"
    )


def slurm_parameters(launcher: Launcher, num_gpus: int, num_nodes: int, name: str) -> dict[str, Any]:
    """submitit executor parameters: one task per GPU on each node, as upstream's train.py sets them."""
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": launcher.timeout_min,
        "nodes": num_nodes,
        "gpus_per_node": num_gpus,
        "tasks_per_node": max(num_gpus, 1),  # one task per GPU; one CPU task without GPUs
        "cpus_per_task": launcher.cpus_per_task,
        "slurm_partition": launcher.partition,
    }
    extra = {k: getattr(launcher, k) for k in ("account", "qos") if getattr(launcher, k)}
    if extra:
        params["slurm_additional_parameters"] = extra
    if launcher.mem_gb is not None:
        params["mem_gb"] = launcher.mem_gb
    return params


class SlurmJob:
    """What each SLURM task runs: its rank comes from submitit's job environment."""

    def __init__(self, cfg_yaml: str, port: int) -> None:
        self.cfg_yaml, self.port = cfg_yaml, port

    def __call__(self) -> None:
        import submitit

        env = submitit.JobEnvironment()
        _log_as_rank(env.global_rank)
        run_trainer(
            _config(self.cfg_yaml),
            env.global_rank,
            env.local_rank,
            env.num_tasks,
            (env.hostnames[0], self.port),
        )


def launch_slurm(
    cfg: DictConfig, launcher: Launcher, num_gpus: int, num_nodes: int, folder: Path, executor: Any = None
) -> Any:
    """Submit the training job and wait for it (the DVC stage ends when training does)."""
    import submitit

    executor = executor or submitit.AutoExecutor(folder=str(folder))
    executor.update_parameters(**slurm_parameters(launcher, num_gpus, num_nodes, "sam3ft-train"))
    # every task must know rank 0's port without talking to the others: it is chosen here, free on
    # the submitting host (the first node for the local executor and single-node interactive jobs)
    job = executor.submit(SlurmJob(OmegaConf.to_yaml(cfg), free_port()))
    return job.result()
