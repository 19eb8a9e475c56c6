"""Best epoch and early stopping from the validation curve the trainer logs (val_stats.json).

Both the trainer (which keeps the best epoch's checkpoint and stops) and the train stage (which
records the choice) derive them from the logged curve alone, so a resumed run, whose logs survive
a kill, decides as the unbroken run did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sam3ft.train.logging import val_metrics

BEST_CHECKPOINT = "best.pt"  # beside the trainer's checkpoint.pt: the selected epoch's checkpoint
TIES = "earliest"  # an epoch is better only when it beats the best so far by more than min_delta


@dataclass(frozen=True)
class Selection:
    epoch: int  # 0-based, as `Trainer/epoch` and dvclive's step
    value: float
    last_epoch: int  # the last validated epoch
    stop: bool  # `patience` validated epochs after `epoch` without improvement


def metric_curve(val_stats: list[dict[str, Any]], metric: str) -> list[tuple[int, float]]:
    """(epoch, value) of `metric` (our name, e.g. AP50) per validated epoch, in epoch order."""
    curve = []
    for stats in val_stats:
        values = val_metrics(stats)
        if f"val/{metric}" not in values:
            epoch = stats["Trainer/epoch"]
            raise KeyError(f"validation stats of epoch {epoch} have no {metric}: {sorted(values)}")
        curve.append((int(stats["Trainer/epoch"]), values[f"val/{metric}"]))
    return sorted(curve)


def select_epoch(curve: list[tuple[int, float]], min_delta: float, patience: int) -> Selection:
    """The best epoch (improvement means more than `min_delta` above the best so far, so ties go to
    the earliest) and whether `patience` (> 0) validated epochs since then brought none."""
    if not curve:
        raise ValueError("no validated epoch to select from")
    best_epoch, best = curve[0]
    waited = 0  # validated epochs since the best one
    for epoch, value in curve[1:]:
        if value > best + min_delta:
            best_epoch, best, waited = epoch, value, 0
        else:
            waited += 1
    return Selection(best_epoch, best, curve[-1][0], patience > 0 and waited >= patience)
