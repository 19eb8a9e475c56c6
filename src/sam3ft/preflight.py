"""Checks of a run's params against each other and this machine, cheap enough to run before any
stage (the `check` stage), again where the train stage starts, and in `sam3ft doctor`.

Two kinds: those that raise `ConfigError` (a run that cannot start), and the disk and VRAM
comparisons that return a `Check` (doctor reports them; the train stage refuses a FAIL).
torch is imported only inside the functions that need it, so a params error is reported before
that import. Nothing here imports `sam3ft.train` (the check stage does not depend on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from sam3ft import params as params_module
from sam3ft.errors import ConfigError
from sam3ft.model.spec import ModelSpec, load_preset

Status = Literal["OK", "WARN", "FAIL"]
GB = 1e9  # decimal gigabytes, as df -H and nvidia-smi's GB show them
# Presets with more parameters than this train on the CPU only when trainer.allow_cpu says so.
CPU_PRESET_PARAMS = 100e6


@dataclass(frozen=True)
class PresetFacts:
    """What is known about a model preset without building it (sam3 is too big to build here)."""

    params: float
    """Parameter count."""


PRESETS = {
    "sam3": PresetFacts(840e6),
    "tiny": PresetFacts(4.3e6),
}


def preset_params(name: str) -> float | None:
    """The preset's parameter count, where known."""
    facts = PRESETS.get(name)
    return facts.params if facts else None


def check_preset(model: params_module.Model, trainer: params_module.Trainer) -> None:
    """The preset file exists and trainer.resolution is the size it is built for (RoPE tables)."""
    check_resolution(trainer, load_preset(model.preset))


def check_resolution(trainer: params_module.Trainer, spec: ModelSpec) -> None:
    """trainer.resolution is the image size `spec` is built for: its RoPE tables are fixed at it."""
    if spec.image_size != trainer.resolution:
        raise ConfigError(
            f"trainer.resolution={trainer.resolution} but preset {spec.name!r} is "
            f"built for {spec.image_size} px",
            fix=f"set trainer.resolution: {spec.image_size}",
            key="trainer.resolution",
        )


visible_gpus = params_module.visible_gpus  # CUDA devices here (what trainer.num_gpus: auto counts)


def check_devices(
    model: params_module.Model,
    trainer: params_module.Trainer,
    launcher: params_module.Launcher,
    preset_params: float | None,
    gpus: int,
) -> None:
    """A GPU count this machine can run (SLURM jobs get theirs from the cluster), and no GPU-sized
    preset on the CPU unless trainer.allow_cpu asks for it. `gpus`: CUDA devices visible here."""
    if trainer.num_nodes > 1 and launcher.kind != "slurm":
        raise ConfigError(
            f"trainer.num_nodes={trainer.num_nodes} needs launcher.kind: slurm",
            fix="set launcher.kind: slurm (and its partition), or num_nodes: 1",
            key="trainer.num_nodes",
        )
    if launcher.kind == "local" and trainer.num_gpus > gpus:
        raise ConfigError(
            f"trainer.num_gpus={trainer.num_gpus} but this machine has {gpus} CUDA device(s)",
            fix=f"set trainer.num_gpus to at most {gpus} (0 = CPU), or use launcher.kind: slurm",
            key="trainer.num_gpus",
        )
    big = preset_params is not None and preset_params > CPU_PRESET_PARAMS
    if big and trainer.num_gpus == 0 and not trainer.allow_cpu:
        size = f"{preset_params / 1e6:.0f} M parameters" if preset_params else "a GPU-sized model"
        where = (
            f"this machine has {gpus} CUDA device(s): set trainer.num_gpus: 1"
            if gpus
            else "this machine has no CUDA device: run it on a machine with an NVIDIA GPU "
            "(trainer.num_gpus: 1), or go back to model.preset: tiny"
        )
        raise ConfigError(
            f"model.preset={model.preset!r} ({size}) with trainer.num_gpus=0 would train "
            "on the CPU, hours per step",
            fix=f"{where}; to train on the CPU anyway set trainer.allow_cpu: true",
            key="model.preset",
        )


def updates_per_epoch(trainer: params_module.Trainer, train_images: int) -> int:
    """Optimizer steps in one process's epoch: each process gets 1/world of the images
    (DistributedSampler), and the loader drops a last batch short of `batch_size` and the batches
    short of a whole accumulation."""
    return train_images // trainer.world_size // (trainer.batch_size * trainer.grad_accum)


def check_steps(trainer: params_module.Trainer, train_images: int, annotations: Path) -> None:
    """Refuse a run whose epochs would hold no optimizer step (`updates_per_epoch`): it would
    finish "successfully" with the model as it started and its metrics."""
    if updates_per_epoch(trainer, train_images) >= 1:
        return
    world, accum = trainer.world_size, trainer.grad_accum
    per_process = train_images // world
    if per_process == 0:
        fix = f"train on at most {train_images} process(es) (trainer.num_gpus x num_nodes), or add images"
    elif per_process // accum >= 1:
        fix = f"set trainer.batch_size: {per_process // accum} or less (or lower trainer.grad_accum)"
    else:
        fix = f"set trainer.grad_accum: 1 and trainer.batch_size: {per_process} or less"
    raise ConfigError(
        f"trainer.batch_size={trainer.batch_size} x trainer.grad_accum={accum} = "
        f"{trainer.batch_size * accum} images per optimizer step per process, but "
        f"{annotations} has {train_images} training image(s), {per_process} for each of "
        f"{world} process(es): every epoch would train no step",
        fix=fix,
        key="trainer.batch_size",
    )


@dataclass(frozen=True)
class Check:
    """One report line: status, what was checked, what was found, and for problems how to fix it."""

    status: Status
    name: str
    detail: str
    fix: str = ""


def installed_version(name: str) -> str | None:
    """The installed distribution's version, None if it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cuda_memory_gb() -> tuple[float, float] | None:
    """(free, total) GB of the current CUDA device, None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return free / GB, total / GB


def check_vram(estimate_gb: float, how: str, free_gb: float | None, total_gb: float | None) -> Check:
    """Compare the estimate with the GPU's memory: FAIL if it can never fit, WARN if not free now."""
    detail = f"estimated peak ~{estimate_gb:.2f} GB ({how})"
    if free_gb is None or total_gb is None:
        return Check("OK", "vram", f"{detail}; no CUDA device in use to compare with")
    detail += f"; GPU has {free_gb:.1f} of {total_gb:.1f} GB free"
    if estimate_gb > total_gb:
        fix = "lower trainer.batch_size (raise grad_accum to keep the effective batch), set trainer.amp: true"
        return Check("FAIL", "vram", detail, fix + ", or use a GPU with more memory")
    if estimate_gb > free_gb:
        return Check("WARN", "vram", detail, "free GPU memory (see nvidia-smi) or lower trainer.batch_size")
    return Check("OK", "vram", detail)


def disk_needed_gb(
    n_params: float,
    trainer: params_module.Trainer,
    export: params_module.Export,
    n_trained: float | None = None,
) -> float:
    """GB that `dvc repro` adds to the repository's filesystem for this preset and schedule.

    checkpoint = the weights (4 B/param, 2 B with trainer.weight_dtype bfloat16) + the optimizer's state
             (AdamW's two moments: 8 B per trainable param, 4 B for adamw_bf16*; grads are not
             saved). Stock's 12 B/param predicts the measured 10.0 GB for sam3 (840 M) and 50.6 MB
             for tiny (4.3 M).
    train  = checkpoint x (1 + extras) in paths.scratch: the trainer's checkpoint.pt, plus one
             checkpoint_<epoch>.pt kept every trainer.checkpoint_freq epochs, i.e. max_epochs // freq
             extras (sam3/train/trainer.py:348 saves when (epoch + 1) % save_freq == 0), plus best.pt
             when trainer.select is a metric
           + checkpoint in paths.train (the normalised copy the train stage writes)
           + checkpoint in .dvc/cache (DVC's copy of that output; reflinks or hardlinks would save it).
    export = model weights at export.dtype (4 or 2 B/param) x 2: paths.export and its .dvc/cache copy.
    Datasets, logs and plots are small next to these and not counted; a cache.dir on another disk is
    not considered. `n_trained`: trainable parameters (None: all, an upper bound).
    """
    weights = (4 if export.dtype == "float32" else 2) * n_params
    return train_checkpoints_gb(n_params, trainer, n_trained) + 2 * weights / GB


def weights_and_states_bytes(trainer: params_module.Trainer, n_params: float, n_trained: float) -> float:
    """Bytes of the weights (all `n_params`, at trainer.weight_dtype) and of the optimizer's state
    (per trainable parameter): what a checkpoint holds, and what training keeps in memory besides
    gradients and activations."""
    weight_bytes = params_module.WEIGHT_BYTES[getattr(trainer, "weight_dtype", "float32")]
    state_bytes = params_module.STATE_BYTES[getattr(trainer, "optimizer", "adamw")]
    return weight_bytes * n_params + state_bytes * n_trained


def train_checkpoints_gb(
    n_params: float, trainer: params_module.Trainer, n_trained: float | None = None
) -> float:
    """GB of trainer checkpoints the train stage leaves: the train part of disk_needed_gb."""
    extras = trainer.max_epochs // trainer.checkpoint_freq if trainer.checkpoint_freq > 0 else 0
    extras += trainer.select != "last"  # best.pt, once checkpoint.pt has moved past the best epoch
    checkpoint = weights_and_states_bytes(trainer, n_params, n_params if n_trained is None else n_trained)
    return (checkpoint * (1 + extras) + checkpoint + checkpoint) / GB


def check_disk(needed_gb: float, free_gb: float, where: Path) -> Check:
    """FAIL if the filesystem holding the repository has less free space than the run writes."""
    detail = f"{free_gb:.1f} GB free on {where}, the run writes ~{needed_gb:.2f} GB"
    if free_gb < needed_gb:
        fix = (
            f"free at least {needed_gb - free_gb:.1f} GB (`dvc gc -w` drops cache entries the workspace "
            "does not use), or keep fewer checkpoints (trainer.checkpoint_freq: 0 keeps the latest only)"
        )
        return Check("FAIL", "disk", detail, fix)
    return Check("OK", "disk", detail)
