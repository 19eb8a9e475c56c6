"""Checks of a run's params against each other and this machine, cheap enough to run before any
stage (the `check` stage), again where the train stage starts, and in `sam3ft doctor`.

torch is imported only inside the functions that need it, so a params error is reported before
that import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sam3ft import params as params_module
from sam3ft.errors import ConfigError
from sam3ft.model.spec import load_preset

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
    spec = load_preset(model.preset)
    if spec.image_size != trainer.resolution:
        raise ConfigError(
            f"trainer.resolution={trainer.resolution} but preset {model.preset!r} is "
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
