"""train: run sam3's Trainer on the prepared dataset; outputs the checkpoint, run record, dvclive.

Outputs (paths.train): checkpoint.pt (sam3's trainer format; the epoch trainer.select chose), run/
(resolved trainer config, params, dataset hash, package versions, the trainer's per-epoch stats,
selection.json: which epoch and why), dvclive/ (metrics and plots).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig

from sam3ft import params as params_module
from sam3ft.compile_cache import use_persistent_cache
from sam3ft.console import stdout_to
from sam3ft.data.coco import check_objects_per_image
from sam3ft.errors import ConfigError, DatasetError
from sam3ft.io import atomic_dir, sha256_tree, write_json
from sam3ft.layout import ANNOTATIONS_FILE, CHECKPOINT, MANIFEST, SPEC_FILE, VOCAB_NAME
from sam3ft.model.spec import ModelSpec, load_spec_file
from sam3ft.preflight import (
    GB,
    check_devices,
    check_disk,
    check_resolution,
    check_steps,
    check_vram,
    cuda_memory_gb,
    installed_version,
    preset_params,
    train_checkpoints_gb,
    updates_per_epoch,
    visible_gpus,
)
from sam3ft.stages import pin_threads
from sam3ft.train.compose import CONFIG_NAME, compose_trainer_config, resolved_yaml
from sam3ft.train.launch import launch_local, launch_slurm
from sam3ft.train.logging import STEPS_FILE, log_steps_to_dvclive, log_to_dvclive, read_steps
from sam3ft.train.memory import param_sizes, training_peak_gb
from sam3ft.train.model import trained_groups
from sam3ft.train.run import STATS_FILES, normalise_checkpoint, prepare_scratch, read_stats
from sam3ft.train.select import BEST_CHECKPOINT, TIES, metric_curve, select_epoch

log = logging.getLogger(__name__)
SECTIONS = ["paths", "base", "model", "trainer", "augment", "launcher"]
MASKS_CONFIG = "sam3ft_masks"  # configs/train/: sam3ft.yaml plus mask losses, for trainer.segmentation
PACKAGES = ("sam3ft", "sam3", "torch", "torchvision", "hydra-core", "dvc", "dvclive", "pycocotools")


def load_base(base_dir: Path, preset: str) -> tuple[dict[str, Any], ModelSpec]:
    """fetch's manifest and model spec, checked against params (a stale fetch is an error)."""
    manifest = json.loads((base_dir / MANIFEST).read_text())
    if manifest["preset"] != preset:
        raise ConfigError(
            f"{base_dir / MANIFEST}: fetched preset {manifest['preset']!r} but model.preset is {preset!r}",
            fix="run `dvc repro` (fetch re-runs)",
        )
    return manifest, load_spec_file(base_dir / manifest["spec_file"])


def trainer_knobs(
    p: params_module.Params,
    spec: ModelSpec,
    manifest: dict[str, Any],
    base_dir: Path,
    data_dir: Path,
    out_dir: Path,
    train_images: int,
) -> dict[str, Any]:
    """Everything configs/train/sam3ft.yaml declares under `knobs`, from params and the spec."""
    trainer = p.trainer
    check_resolution(trainer, spec)  # against the fetched spec, which a stale fetch may not match
    on_gpu = trainer.accelerator == "cuda"
    weights = manifest["weights"]
    consumed_elsewhere = ("num_gpus", "num_nodes", "recipe", "allow_cpu")  # launcher; with_recipe; preflight
    return {
        **{k: v for k, v in dataclasses.asdict(trainer).items() if k not in consumed_elsewhere},
        "accelerator": trainer.accelerator,
        # relative to the repository root (DVC runs stages there): the recorded config stays the
        # same wherever the repo is cloned, so its hash in dvc.lock does too
        "data_dir": data_dir.as_posix(),
        "out_dir": out_dir.as_posix(),
        "bpe_path": (base_dir / VOCAB_NAME).as_posix(),
        "model_spec": (base_dir / SPEC_FILE).as_posix(),
        "seed": p.base.seed,
        "num_queries": spec.num_queries,
        "pin_memory": on_gpu,
        "loss_device": trainer.accelerator,
        "init_weights": (base_dir / weights["file"]).as_posix() if "file" in weights else None,
        "min_loaded": manifest["min_loaded"],
        # the "masks" group (mask head, neck levels feeding only it) trains exactly with segmentation
        "trainable": trained_groups(trainer.trainable, trainer.segmentation),
        "telemetry_dir": (out_dir / "telemetry").as_posix(),
        # the trainer counts forward passes (micro-batches) as steps
        "world_size": trainer.world_size,
        # rank 0's forward passes: each rank gets 1/world of the images (DistributedSampler)
        "total_steps": trainer.max_epochs * updates_per_epoch(trainer, train_images) * trainer.grad_accum,
        **{f"augment_{k}": v for k, v in dataclasses.asdict(p.augment).items()},
    }


def config_name(segmentation: bool) -> str:
    """The trainer config to compose: the box-only one, or the one adding mask losses."""
    return MASKS_CONFIG if segmentation else CONFIG_NAME


def check_masks(split_dir: Path) -> None:
    """Refuse mask training on a split with annotations lacking masks (prepare drops empty ones).

    sam3 would train such objects' boxes and silently skip their masks (`is_valid_mask`); a partly
    masked dataset is far more often an export mistake than intent, so we stop and say which ones.
    """
    path = split_dir / ANNOTATIONS_FILE
    missing = [a["id"] for a in json.loads(path.read_text())["annotations"] if not a.get("segmentation")]
    if missing:
        raise DatasetError(
            f"{path}: {len(missing)} annotation(s) have no 'segmentation' (polygons or RLE), e.g. ids "
            f"{missing[:5]}; trainer.segmentation: true needs a mask for every training object",
            fix="export the dataset with masks (Roboflow: instance segmentation, COCO JSON), "
            "or set trainer.segmentation: false to train boxes only",
        )


def versions() -> dict[str, str]:
    """The installed version of each of PACKAGES, recorded with the run."""
    return {name: installed_version(name) or "not installed" for name in PACKAGES}


def launch(
    cfg: DictConfig, trainer: params_module.Trainer, launcher: params_module.Launcher, scratch: Path
) -> None:
    """This machine (one process per GPU) or a SLURM job; both run sam3's trainer unchanged."""
    if launcher.kind == "slurm":
        launch_slurm(cfg, launcher, trainer.num_gpus, trainer.num_nodes, scratch / "submitit")
    else:
        launch_local(cfg, trainer.num_gpus)


def launch_record(trainer: params_module.Trainer, launcher: params_module.Launcher) -> dict[str, Any]:
    """How the run was spread, and what that does to the batch (no automatic lr rescaling)."""
    return {
        "launcher": launcher.kind,
        "num_nodes": trainer.num_nodes,
        "num_gpus": trainer.num_gpus,
        "world_size": trainer.world_size,
        "effective_batch": trainer.batch_size * trainer.grad_accum * trainer.world_size,
        "per_process_batch": trainer.batch_size,
        "grad_accum": trainer.grad_accum,
        "lr_scaling": "none: trainer.lr_scale applies as set; scale it yourself when the effective "
        "batch changes (linear rule: lr_scale x new/old effective batch)",
    }


def count_images(split_dir: Path) -> int:
    return len(json.loads((split_dir / ANNOTATIONS_FILE).read_text())["images"])


def preflight(spec: ModelSpec, trainer: params_module.Trainer, root: Path, vocab: Path) -> None:
    """Refuse, with numbers, a run that cannot fit the disk (or, on CUDA, the GPU) before it starts."""
    n_params, n_trained, largest = param_sizes(
        spec, vocab, trained_groups(trainer.trainable, trainer.segmentation), trainer.lora_rank
    )
    needed = train_checkpoints_gb(
        n_params, trainer, n_trained
    )  # scratch checkpoint(s), tracked copy, DVC cache
    existing = next(d for d in (root, *root.parents) if d.exists())  # outputs may not exist yet
    check = check_disk(needed, shutil.disk_usage(existing).free / GB, existing)
    if check.status == "FAIL":
        raise ConfigError(f"not enough disk: {check.detail}", fix=check.fix)
    if trainer.accelerator == "cuda":
        estimate, how = training_peak_gb(spec, n_params, n_trained, trainer, largest)
        memory = cuda_memory_gb()
        vram = check_vram(estimate, how, *(memory or (None, None)))
        if vram.status == "FAIL":
            raise ConfigError(f"not enough GPU memory: {vram.detail}", fix=vram.fix)


def selection_record(
    trainer: params_module.Trainer,
    train_stats: list[dict[str, Any]],
    val_stats: list[dict[str, Any]],
    logs: Path,
) -> dict[str, Any]:
    """Which epoch's checkpoint is tracked and why, checked against the epochs the trainer logged:
    all of max_epochs, or fewer after an early stop. `epoch` is 0-based, as dvclive's step."""
    trained = len(train_stats)
    record: dict[str, Any] = {"select": trainer.select, "max_epochs": trainer.max_epochs}
    if trainer.select == "last":
        expected = trainer.max_epochs
        record.update(epoch=trained - 1, metric=None, value=None)
    else:
        chosen = select_epoch(metric_curve(val_stats, trainer.select), trainer.min_delta, trainer.patience)
        expected = chosen.last_epoch + 1 if chosen.stop else trainer.max_epochs
        record.update(
            epoch=chosen.epoch,
            metric=f"val/{trainer.select}",
            value=chosen.value,
            ties=TIES,
            min_delta=trainer.min_delta,
            patience=trainer.patience,
        )
    if trained != expected:
        raise RuntimeError(f"trainer logged {trained} epochs, expected {expected}; see {logs / 'log.txt'}")
    record.update(
        epochs_trained=trained,
        stopped_early=trained < trainer.max_epochs,
        weights="ema" if trainer.ema_decay > 0 else "regular",  # what was validated and is tracked
        ema_decay=trainer.ema_decay,
    )
    return record


def tracked_checkpoint(checkpoints: Path, selection: dict[str, Any]) -> Path:
    """The scratch checkpoint of the selected epoch (best.pt, or the latest for `last`)."""
    path = checkpoints / (CHECKPOINT if selection["select"] == "last" else BEST_CHECKPOINT)
    held = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    if held != selection["epoch"] + 1:  # the trainer counts epochs done
        raise RuntimeError(
            f"{path} holds the weights after epoch {held - 1}, but the validation logs select epoch "
            f"{selection['epoch']}; delete {checkpoints.parent} and run the train stage again"
        )
    return path


def run(p: params_module.Params) -> None:
    paths, base, trainer = p.paths, p.base, p.trainer
    pin_threads(base.threads)
    base_dir, data_dir = Path(paths.base), Path(paths.prepared)
    manifest, spec = load_base(base_dir, p.model.preset)
    spec = spec.with_mask_head(trainer.segmentation)  # the architecture that trains
    check_devices(p.model, trainer, p.launcher, preset_params(p.model.preset), visible_gpus())
    if trainer.segmentation:
        check_masks(data_dir / "train")
    train_json = data_dir / "train" / ANNOTATIONS_FILE
    train_coco = json.loads(train_json.read_text())
    train_images = len(train_coco["images"])
    check_steps(trainer, train_images, train_json)
    for warning in check_objects_per_image(train_coco, trainer.max_ann_per_img, train_json):
        log.warning(warning)  # such an image never trains
    scratch = Path(paths.scratch) / "train"
    knobs = trainer_knobs(p, spec, manifest, base_dir, data_dir, scratch, train_images)
    cfg = compose_trainer_config(knobs, name=config_name(trainer.segmentation))
    preflight(spec, trainer, Path(paths.train).resolve().parent, base_dir / VOCAB_NAME)
    fingerprint: dict[str, Any] = {
        "trainer_config": resolved_yaml(cfg),
        "base": sha256_tree(base_dir),
        "data": sha256_tree(data_dir),
        "versions": versions(),
    }
    if prepare_scratch(scratch, fingerprint):
        log.info("resuming from %s (same params, data and code)", scratch / "checkpoints")
    if trainer.compile_model or trainer.compile_trunk or trainer.compile_layers:
        log.info(
            "torch.compile's cache (a second run loads its graphs from there): %s", use_persistent_cache()
        )
    with stdout_to(scratch / "logs" / "stdout.txt"):  # sam3's prints; its log lines are in log.txt
        launch(cfg, trainer, p.launcher, scratch)
    logs = scratch / "logs"
    train_stats, val_stats = (read_stats(logs, name) for name in STATS_FILES)
    selection = selection_record(trainer, train_stats, val_stats, logs)
    source = tracked_checkpoint(scratch / "checkpoints", selection)
    with atomic_dir(Path(paths.train)) as out:
        normalise_checkpoint(source, out / CHECKPOINT, ema=trainer.ema_decay > 0)
        record = out / "run"
        record.mkdir()
        write_json(record / "selection.json", selection)
        (record / "trainer_config.yaml").write_text(fingerprint["trainer_config"])
        (record / "params.yaml").write_text(yaml.safe_dump(p.to_dict(), sort_keys=True))
        write_json(record / "dataset.json", {"prepared_sha256": fingerprint["data"], "path": str(data_dir)})
        write_json(record / "versions.json", fingerprint["versions"])
        write_json(record / "launch.json", launch_record(trainer, p.launcher))
        write_json(record / "base_manifest.json", manifest)
        for name, stats in zip(STATS_FILES, (train_stats, val_stats), strict=True):
            write_json(record / name, stats)
        log_to_dvclive(out / "dvclive", train_stats, val_stats)
        log_steps_to_dvclive(out / "dvclive-steps", read_steps(logs / STEPS_FILE))
    # the tracked copy is complete: drop the scratch checkpoints (GBs for sam3), keep logs/telemetry
    shutil.rmtree(scratch / "checkpoints", ignore_errors=True)
    log.info(
        "trained %d epochs%s; tracking epoch %d (%s) -> %s",
        len(train_stats),
        " (stopped early)" if selection["stopped_early"] else "",
        selection["epoch"],
        "last" if selection["metric"] is None else f"best {trainer.select} {selection['value']:.4f}",
        paths.train,
    )


def main() -> None:
    from sam3ft.stages import stage_main

    stage_main("train", SECTIONS, run)


if __name__ == "__main__":
    main()
