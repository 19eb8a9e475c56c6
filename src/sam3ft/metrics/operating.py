"""The operating score threshold chosen from a split's detections (`evaluate.threshold: auto`).

Each detection (COCO results, boxes xywh) is matched greedily, best score first, to an unmatched
ground-truth box of its image and category with IoU >= 0.5. Matching in score order makes the
matches above any threshold the same as matching only the detections above it, so one pass gives
true and false positives at every candidate threshold. The chosen threshold maximises detection F1
(what a pre-label or an HTTP answer is judged by: each box right or wrong); ties go to the higher
threshold, which keeps fewer boxes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

IOU = 0.5


def _iou(a: list[float], b: list[float]) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    w = min(ax2, bx2) - max(a[0], b[0])
    h = min(ay2, by2) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def matched_scores(
    coco: dict[str, Any], results: list[dict[str, Any]]
) -> tuple[list[tuple[float, bool]], int]:
    """(score, is a true positive) per detection, and the number of ground-truth boxes."""
    truth: dict[tuple[int, int], list[list[float]]] = defaultdict(list)
    for ann in coco["annotations"]:
        truth[(ann["image_id"], ann["category_id"])].append(ann["bbox"])
    taken: dict[tuple[int, int], set[int]] = defaultdict(set)
    out = []
    for det in sorted(results, key=lambda r: -r["score"]):
        key = (det["image_id"], det["category_id"])
        free = [(i, _iou(det["bbox"], box)) for i, box in enumerate(truth[key]) if i not in taken[key]]
        best = max(free, key=lambda t: t[1], default=(None, 0.0))
        if best[0] is not None and best[1] >= IOU:
            taken[key].add(best[0])
        out.append((det["score"], best[0] is not None and best[1] >= IOU))
    return out, len(coco["annotations"])


def detection_f1(scored: list[tuple[float, bool]], n_truth: int, threshold: float) -> float:
    tp = sum(1 for s, ok in scored if s >= threshold and ok)
    fp = sum(1 for s, ok in scored if s >= threshold and not ok)
    denominator = 2 * tp + fp + (n_truth - tp)
    return 2 * tp / denominator if denominator else 0.0


def best_threshold(coco: dict[str, Any], results: list[dict[str, Any]], candidates: Iterable[float]) -> float:
    """The candidate with the highest detection F1 on this split (ties: the highest candidate)."""
    scored, n_truth = matched_scores(coco, results)
    return max(candidates, key=lambda t: (round(detection_f1(scored, n_truth, t), 12), t))
