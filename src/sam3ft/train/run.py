"""Run sam3's own Trainer in this process (single rank), as `sam3.train.train.single_proc_run` does."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sam3ft import compat
from sam3ft.model.lora import has_lora, merge_state_dict
from sam3ft.train.ema import EMA_KEY

STATS_FILES = ("train_stats.json", "val_stats.json")


# Below Linux's default ephemeral range (32768-60999), from which the kernel hands out ports for
# outgoing connections and bind(port 0): a port taken from there can go to another process between
# the choice and the moment the listener binds it.
RENDEZVOUS_PORTS = range(20_000, 32_768)


def free_port() -> int:
    """A TCP port for a process group's rendezvous: not bound on this machine now, searched from a
    random start in RENDEZVOUS_PORTS so that concurrent runs rarely try the same one."""
    span = len(RENDEZVOUS_PORTS)
    start = random.SystemRandom().randrange(span)  # leaves the seeded generators alone
    for step in range(span):
        port = RENDEZVOUS_PORTS[(start + step) % span]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free TCP port in {RENDEZVOUS_PORTS.start}-{RENDEZVOUS_PORTS.stop - 1}")


def setup_process(
    rank: int = 0, local_rank: int = 0, world_size: int = 1, master: tuple[str, int] | None = None
) -> None:
    """Make this process one rank of a process group (rank 0 of 1 on loopback by default) with
    sam3's workarounds (sam3ft.compat) and config resolvers installed: what instantiating
    `cfg.trainer` needs. `run_trainer` calls it; so does bench/gpu_recipes.py, which drives the
    trainer's epochs itself."""
    from sam3.train.utils.train_utils import register_omegaconf_resolvers

    compat.apply()
    if not OmegaConf.has_resolver("times"):
        register_omegaconf_resolvers()
    host, port = master or ("127.0.0.1", free_port())
    os.environ.update(
        MASTER_ADDR=host,
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
    )


def run_trainer(
    cfg: DictConfig,
    rank: int = 0,
    local_rank: int = 0,
    world_size: int = 1,
    master: tuple[str, int] | None = None,
) -> None:
    """Instantiate `cfg.trainer` and run it as one rank of a process group (`setup_process`), the
    way sam3/train/train.py's single_proc_run does."""
    setup_process(rank, local_rank, world_size, master)
    # sam3 scripts some loss helpers (sam3/model/box_ops.py:145 and 172, sam3/train/loss/loss_fns.py:199).
    # TorchScript's executor optimizes a scripted function after its first calls in a process, and
    # the optimized graph's backward rounds differently; so a resumed process, unoptimized at first,
    # drifted from the unbroken run by float rounding (tests/test_train.py). On the CPU, where a run
    # can be exact, they run unoptimized in every step; the GPU step is not deterministic anyway.
    try:
        trainer = instantiate(cfg.trainer, _recursive_=False)
        with torch.jit.optimized_execution(cfg.trainer.accelerator != "cpu"):
            trainer.run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def read_stats(log_dir: Path, name: str) -> list[dict[str, Any]]:
    """The trainer's JSON-lines stats, one per epoch ([] if none). An epoch logged twice (killed after
    its stats line but before its checkpoint, then redone on resume) keeps its last line.
    `Trainer/where` (progress fraction) is dropped: a resumed run re-validates its last epoch with
    0.0 there, which would make equal runs record different files."""
    path = log_dir / name
    if not path.is_file():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            # progress bookkeeping, not a result: a resumed run re-validates its last epoch with 0.0 here
            row.pop("Trainer/where", None)
            by_epoch[int(row["Trainer/epoch"])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


FINGERPRINT = "fingerprint.json"


def prepare_scratch(scratch: Path, fingerprint: dict[str, Any]) -> bool:
    """Keep `scratch` to resume only if it was started by this exact run; else start it afresh.

    The trainer resumes from whatever checkpoint.pt it finds, so a checkpoint left by another
    config must never survive. Returns True when resuming.
    """
    stamp = scratch / FINGERPRINT
    if stamp.is_file() and json.loads(stamp.read_text()) == fingerprint:
        return (scratch / "checkpoints" / "checkpoint.pt").is_file()
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    stamp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
    return False


def normalise_checkpoint(src: Path, dst: Path, ema: bool = False) -> None:
    """Copy the trainer checkpoint with its wall-clock field zeroed and its best-meter bookkeeping
    dropped, so equal runs hash equal.

    LoRA adapters are merged into the weights they adapt. `time_elapsed` only feeds the trainer's ETA
    display. `best_meter_values` is sam3's record of the best validation so far, saved before that
    epoch's validation runs: a run killed after the save and resumed misses one update, so the same
    params gave two checkpoints (seen in tests/test_train.py's kill-and-resume test); it only serves
    `save_best_meters`, which we leave off, and the scratch checkpoint a resume reads keeps it.
    With `ema`, the averaged weights the trainer validated become "model" (the raw ones, and the
    EMA bookkeeping that only a resume reads, are dropped; "model_weights" says "ema").
    Everything else is kept bit for bit.
    `dst` lies in the stage's temporary output folder (atomic_dir), so a plain save is atomic enough.
    """
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["time_elapsed"] = 0.0
    ckpt.pop("best_meter_values", None)
    saved_ema = ckpt.pop(EMA_KEY, None)
    if ema:
        if saved_ema is None:
            raise RuntimeError(f"{src} has no EMA weights although trainer.ema_decay is on")
        ckpt["model"] = saved_ema["state"]
        ckpt["model_weights"] = "ema"
    if has_lora(ckpt["model"]):  # fold adapters in: evaluate and export see sam3's own key layout
        ckpt["model"] = merge_state_dict(ckpt["model"])
        ckpt["lora_merged"] = True
    torch.save(ckpt, dst)
