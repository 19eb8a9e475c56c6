"""COCO box metrics with pycocotools, named as people read them (AP, AP50, AR@100, ...)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# Order of COCOeval.stats for iouType="bbox".
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


def coco_box_metrics(gt_path: Path, results: list[dict[str, Any]]) -> dict[str, float]:
    """Metrics of `results` (COCO results records, bbox xywh) against the annotations file.

    No detections at all scores 0 everywhere (pycocotools refuses an empty result list).
    -1 means the split has no ground truth of that size, as pycocotools reports it.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO(str(gt_path))
        if not results:
            return {name: 0.0 for name in STAT_NAMES}
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: round(float(v), 6) for name, v in zip(STAT_NAMES, evaluator.stats, strict=True)}
