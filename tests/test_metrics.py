"""COCO metrics against hand-computed cases."""

from __future__ import annotations

import json

import pytest

from sam3ft.metrics.coco import STAT_NAMES, coco_box_metrics


@pytest.fixture
def gt_path(tmp_path):
    gt = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 100},
            {"id": 2, "file_name": "b.jpg", "width": 100, "height": 100},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [5, 5, 60, 60], "area": 3600, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "fuse neutrals"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def test_perfect_predictions_score_one(gt_path):
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 40], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [5, 5, 60, 60], "score": 0.8},
    ]
    m = coco_box_metrics(gt_path, results)
    assert m["AP"] == 1.0 and m["AP50"] == 1.0 and m["AP75"] == 1.0 and m["AR@100"] == 1.0
    assert m["AP_small"] == -1.0  # no small objects in this ground truth


def test_no_predictions_score_zero(gt_path):
    assert coco_box_metrics(gt_path, []) == {name: 0.0 for name in STAT_NAMES}


def test_one_of_two_found(gt_path):
    results = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 40], "score": 0.9}]
    m = coco_box_metrics(gt_path, results)
    assert m["AR@100"] == 0.5
    assert m["AP50"] == pytest.approx(51 / 101, abs=1e-6)  # 101-point interpolation: P=1 up to R=0.5


def test_iou_between_thresholds(gt_path):
    # IoU 0.6 with the first box: a hit at IoU 0.5, a false positive at 0.75. At 0.75 the
    # ranking is FP (0.9) then TP (0.8): precision 0.5 for recall <= 0.5, so AP75 = 0.5 * 51/101.
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 24], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [5, 5, 60, 60], "score": 0.8},
    ]
    m = coco_box_metrics(gt_path, results)
    assert m["AP50"] == 1.0
    assert m["AP75"] == pytest.approx(0.5 * 51 / 101, abs=1e-6)
