"""COCO box and mask metrics with pycocotools, named as people read them (AP, AP50, AR@100, ...)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# Order of COCOeval.stats for iouType "bbox" and "segm".
STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR@1",
    "AR@10",
    "AR@100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


def _evaluate(gt_path: Path, results: list[dict[str, Any]], iou_type: str = "bbox") -> COCOeval | None:
    """A finished COCOeval, or None when there is nothing to evaluate (no detections)."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO(str(gt_path))
        if not results:  # pycocotools refuses an empty result list
            return None
        # loadRes writes into the records (id, area, a box polygon as `segmentation`): give it copies
        evaluator = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def coco_box_metrics(gt_path: Path, results: list[dict[str, Any]]) -> dict[str, float]:
    """Metrics of `results` (COCO results records, bbox xywh) against the annotations file.

    No detections at all scores 0 everywhere. -1 means the split has no ground truth of that size
    (or none at all), as pycocotools reports it.
    """
    evaluator = _evaluate(gt_path, results)
    if evaluator is None:
        return {name: 0.0 for name in STAT_NAMES}
    return {name: round(float(v), 6) for name, v in zip(STAT_NAMES, evaluator.stats, strict=True)}


def coco_mask_metrics(gt_path: Path, results: list[dict[str, Any]]) -> dict[str, float]:
    """Mask metrics (iouType "segm") of results carrying `segmentation` RLEs, against the
    annotations' polygons/RLEs; same names and conventions as `coco_box_metrics`."""
    # without `bbox`, pycocotools' loadRes takes each result's area from its mask (the bbox branch
    # would use the box area, putting masks in the wrong small/medium/large bucket)
    masks = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    evaluator = _evaluate(gt_path, masks, iou_type="segm")
    if evaluator is None:
        return {name: 0.0 for name in STAT_NAMES}
    return {name: round(float(v), 6) for name, v in zip(STAT_NAMES, evaluator.stats, strict=True)}


def has_masks(coco: dict[str, Any]) -> bool:
    """Whether every annotation carries a mask (polygons or RLE): mask metrics need it."""
    return bool(coco["annotations"]) and all(a.get("segmentation") for a in coco["annotations"])


def pr_curve(gt_path: Path, results: list[dict[str, Any]], iou: float = 0.5) -> list[dict[str, float]]:
    """Precision at COCO's 101 recall points, at one IoU threshold, mean over categories.

    Points where precision is undefined (recall never reached) are left out.
    """
    evaluator = _evaluate(gt_path, results)
    if evaluator is None:
        return []
    t = int(np.argmin(np.abs(evaluator.params.iouThrs - iou)))
    # precision: (T iou, R recall, K class, A area, M maxdets); area "all", the largest maxdets
    precision = evaluator.eval["precision"][t, :, :, 0, -1]
    rows = []
    for r, recall in enumerate(evaluator.params.recThrs):
        valid = precision[r][precision[r] > -1]
        if valid.size:
            rows.append({"recall": round(float(recall), 4), "precision": round(float(valid.mean()), 6)})
    return rows
