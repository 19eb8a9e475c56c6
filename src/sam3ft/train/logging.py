"""Per-epoch train loss and validation AP from the trainer's stats files into dvclive."""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sam3ft.live import open_live

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
    with open_live(directory) as live:
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


STEPS_FILE = "steps.jsonl"  # deterministic per-step scalars (losses, lr), one JSON object per line
_LOSS = "Step_Losses/Losses/train_all_loss"


PER_STEP = ("Step_", "Optim/")  # prefixes of the names sam3's trainer logs at every step


class StepLogger:
    """The trainer's per-step logger (`logging.tensorboard_writer`): TensorBoard as upstream, but
    the per-step scalars of every `tensorboard_every`-th step only, plus

    - `steps.jsonl`: loss, each loss component and lr per param group, at every optimizer step;
      deterministic, turned into tracked dvclive plots after training (last value per step wins, so
      steps redone after a resume leave no duplicates); written once per step;
    - a live, untracked dvclive folder with the machine-dependent figures (images/s, peak memory,
      step time), kept out of tracked outputs so that equal params give byte-equal outputs;
    - a progress bar with ETA on stderr.

    A SAM3 step logs ~190 scalars (36 loss terms, lr and weight decay of 73 param groups). Each
    costs TensorBoard host time in the training process (a protobuf, and a pure-Python CRC in its
    writer thread, holding the GIL) while the GPU waits, hence `tensorboard_every`.
    """

    def __init__(
        self,
        log_dir: str,
        steps_file: str,
        telemetry_dir: str,
        images_per_step: int,
        total_steps: int,
        tensorboard_every: int = 1,
        **tensorboard: Any,
    ) -> None:
        from sam3.train.utils.logger import make_tensorboard_logger

        self.tb = make_tensorboard_logger(log_dir=log_dir, **tensorboard)  # writes on rank 0 only
        self.tensorboard_every = tensorboard_every
        self.rank0 = os.environ.get("RANK", "0") == "0"
        if not self.rank0:  # other ranks train; only rank 0 writes files (as sam3's trainer does)
            return
        Path(steps_file).parent.mkdir(parents=True, exist_ok=True)
        self.steps = open(steps_file, "a")  # noqa: SIM115 - open for the whole run
        self.pending: list[str] = []  # this step's steps.jsonl lines
        atexit.register(self.flush_steps)  # a step that stopped training before its end
        self.telemetry = open_live(telemetry_dir, resume=True)
        self.images_per_step = images_per_step
        self.bar = tqdm(total=total_steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)

    def log_dict(self, payload: dict[str, Any], step: int) -> None:
        self.tb.log_dict(payload, step)

    def log_hparams(self, hparams: dict[str, Any], meters: dict[str, Any]) -> None:
        self.tb.log_hparams(hparams, meters)

    def log(self, name: str, data: Any, step: int) -> None:
        if step % self.tensorboard_every == 0 or not name.startswith(PER_STEP):
            self.tb.log(name, data, step)
        if not self.rank0:
            return
        value = float(data.detach()) if hasattr(data, "detach") else float(data)
        if name.startswith(_LOSS) or (name.startswith("Optim/") and name.endswith("/lr")):
            self.pending.append(json.dumps({"step": step, "name": _step_name(name), "value": value}) + "\n")
        if name == _LOSS:
            self.bar.n = step + 1
            self.bar.set_postfix(loss=f"{value:.3g}", refresh=False)
            self.bar.refresh()
        elif name == "Step_Stats/train/Batch Time" and value > 0:
            self.telemetry.step = step
            self.telemetry.log_metric("train/images_per_s", self.images_per_step / value)
            self.telemetry.log_metric("train/step_s", value)
        elif name == "Step_Stats/train/Mem (GB)":  # after the step's losses and lr (sam3's train_epoch)
            self.telemetry.step = step
            self.telemetry.log_metric("train/peak_mem_gb", value)
            self.telemetry.next_step()
            self.flush_steps()

    def flush_steps(self) -> None:
        """This step's steps.jsonl lines to disk (one write, one flush)."""
        if self.pending:
            self.steps.write("".join(self.pending))
            self.steps.flush()
            self.pending.clear()


def _step_name(name: str) -> str:
    """`Step_Losses/Losses/train_all_loss/loss_bbox` -> `loss_bbox`; `Optim/1_/lr` -> `lr_group1`."""
    if name == _LOSS:
        return "loss"
    if name.startswith(_LOSS + "/"):
        return name[len(_LOSS) + 1 :]
    _, group, option = name.split("/")
    return f"{option}_group{group.rstrip('_') or 0}"


def make_step_logger(**kwargs: Any) -> StepLogger:
    """Hydra target for `trainer.logging.tensorboard_writer`."""
    return StepLogger(**kwargs)


def read_steps(path: Path) -> dict[int, dict[str, float]]:
    """steps.jsonl as {step: {name: value}}, later lines overriding earlier (resumed runs)."""
    steps: dict[int, dict[str, float]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                steps.setdefault(int(row["step"]), {})[row["name"]] = row["value"]
    return dict(sorted(steps.items()))


def log_steps_to_dvclive(directory: Path, steps: dict[int, dict[str, float]]) -> None:
    """Per-step loss, loss components and learning rates as dvclive plots (x = optimizer step)."""
    with open_live(directory) as live:
        for step, values in steps.items():
            live.step = step
            for name, value in sorted(values.items()):
                live.log_metric(f"step/{name}", value)
