"""Image-level detection: does an image contain the object at all? (the pilot's confusion matrix)

An image is actually positive when it has at least one ground-truth box, predicted positive when at
least one detection scores >= the threshold. Precision, recall and F1 of 0/0 are reported as 0.0;
specificity without any negative image is undefined and reported as None (null in metrics.json).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Confusion:
    """Counts of images at one score threshold."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float | None:
        """Share of negative images called negative; None where the split has none."""
        return _ratio(self.tn, self.tn + self.fp) if self.tn + self.fp else None

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    def summary(self) -> dict[str, float | int | None]:
        return {
            **asdict(self),
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "specificity": self.specificity,
        }


def _ratio(num: int, den: int) -> float:
    return round(num / den, 6) if den else 0.0


def confusion(positive: Mapping[int, bool], best_score: Mapping[int, float], threshold: float) -> Confusion:
    """`positive`: image id -> has ground truth; `best_score`: image id -> top detection score."""
    tp = fp = fn = tn = 0
    for image_id, actual in positive.items():
        predicted = best_score.get(image_id, 0.0) >= threshold
        tp += actual and predicted
        fn += actual and not predicted
        fp += predicted and not actual
        tn += not actual and not predicted
    return Confusion(tp, fp, fn, tn)


def best_scores(results: Iterable[Mapping[str, float]]) -> dict[int, float]:
    """Top detection score per image id from COCO results records."""
    best: dict[int, float] = {}
    for r in results:
        image_id = int(r["image_id"])
        best[image_id] = max(best.get(image_id, 0.0), float(r["score"]))
    return best


def threshold_sweep(
    positive: Mapping[int, bool], best_score: Mapping[int, float], thresholds: Iterable[float]
) -> list[dict[str, float]]:
    """Precision, recall and F1 at each threshold (rows for a DVC plot)."""
    rows = []
    for t in thresholds:
        c = confusion(positive, best_score, t)
        rows.append({"threshold": round(t, 4), "precision": c.precision, "recall": c.recall, "f1": c.f1})
    return rows


def confusion_rows(
    positive: Mapping[int, bool], best_score: Mapping[int, float], threshold: float
) -> list[dict[str, str]]:
    """One row per image, for DVC's confusion-matrix template."""
    label = {True: "object", False: "no object"}
    return [
        {"actual": label[actual], "predicted": label[best_score.get(image_id, 0.0) >= threshold]}
        for image_id, actual in sorted(positive.items())
    ]
