"""Per-epoch train loss and validation AP from the trainer's stats files into dvclive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dvclive import Live

TRAIN_LOSS_PREFIX = "Losses/train_all_"


def train_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """`train/loss` plus each weighted loss component of one epoch."""
    out = {"train/loss": float(stats["Losses/train_all_loss"])}
    for key, value in stats.items():
        if key.startswith(TRAIN_LOSS_PREFIX) and key not in (
            "Losses/train_all_loss",
            "Losses/train_all_core_loss",
        ):
            out[f"train/{key[len(TRAIN_LOSS_PREFIX) :]}"] = float(value)
    return out


def _metric_name(trainer_name: str) -> str:
    """sam3's `AP_50`, `AR_maxDets@10` -> our `AP50`, `AR@10` (as in the evaluate stage)."""
    return (
        trainer_name.replace("AP_50", "AP50")
        .replace("AP_75", "AP75")
        .replace("maxDets", "")
        .replace("AR_@", "AR@")
    )


def val_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """COCO box metrics the trainer's validation computed, e.g. `val/AP`, `val/AP50`."""
    out = {}
    for key, value in stats.items():
        if "/coco_eval_bbox_" in key:
            out["val/" + _metric_name(key.rsplit("coco_eval_bbox_", 1)[1])] = float(value)
    return out


def log_to_dvclive(
    directory: Path, train_stats: list[dict[str, Any]], val_stats: list[dict[str, Any]]
) -> None:
    """One dvclive step per epoch; no timestamps, so equal runs write equal files."""
    val_by_epoch = {int(s["Trainer/epoch"]): s for s in val_stats}
    with Live(str(directory), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for stats in train_stats:
            epoch = int(stats["Trainer/epoch"])
            live.step = epoch
            metrics = train_metrics(stats)
            if epoch in val_by_epoch:
                metrics.update(val_metrics(val_by_epoch[epoch]))
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.log_metric("epoch", epoch, plot=False)
            live.next_step()
