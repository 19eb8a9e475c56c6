"""COCO box and mask metrics against hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sam3ft.metrics.coco import STAT_NAMES, coco_box_metrics, coco_mask_metrics, has_masks


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


def rle(mask: np.ndarray) -> dict:
    """A bool (H, W) mask as the COCO RLE our predictions carry (counts as text)."""
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode()}


@pytest.fixture
def mask_gt_path(tmp_path):
    """One 100x100 image, one object: a polygon (the Roboflow form) and a 20x40 RLE square."""
    square = np.zeros((100, 100), bool)
    square[60:80, 10:50] = True
    gt = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 10, 40, 20],
                "area": 800,
                "iscrowd": 0,
                "segmentation": [[10, 10, 50, 10, 50, 30, 10, 30]],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 60, 40, 20],
                "area": 800,
                "iscrowd": 0,
                "segmentation": rle(square),
            },
        ],
        "categories": [{"id": 1, "name": "fuse neutrals"}],
    }
    path = tmp_path / "gt_masks.json"
    path.write_text(json.dumps(gt))
    return path, square


def polygon_mask(polygon: list[float]) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], 100, 100))).astype(bool)


def test_perfect_masks_score_one(mask_gt_path):
    path, square = mask_gt_path
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.9,
         "segmentation": rle(polygon_mask([10, 10, 50, 10, 50, 30, 10, 30]))},
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.8, "segmentation": rle(square)},
    ]  # fmt: skip
    m = coco_mask_metrics(path, results)
    # the boxes are wrong on purpose: mask metrics read only the masks
    assert m["AP"] == 1.0 and m["AP50"] == 1.0 and m["AP75"] == 1.0 and m["AR@100"] == 1.0
    assert m["AP_small"] == 1.0 and m["AP_medium"] == -1.0  # 800 px: small by COCO's mask area
    assert coco_box_metrics(path, results)["AP"] == 0.0


def test_half_mask_hits_only_at_iou_half(mask_gt_path):
    """Predicting the left half of the square (IoU exactly 0.5) and nothing else: a hit at IoU 0.50
    only. One of two objects found at P=1: AP50 = 51/101; the 9 stricter thresholds give 0."""
    path, square = mask_gt_path
    half = square.copy()
    half[:, 30:] = False
    m = coco_mask_metrics(path, [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": rle(half)}])
    assert m["AP50"] == pytest.approx(51 / 101, abs=1e-6)
    assert m["AP75"] == 0.0
    assert m["AP"] == pytest.approx(51 / 101 / 10, abs=1e-6)


def test_has_masks_needs_every_annotation(mask_gt_path):
    path, _ = mask_gt_path
    coco = json.loads(path.read_text())
    assert has_masks(coco)
    del coco["annotations"][0]["segmentation"]
    assert not has_masks(coco)
    assert not has_masks({"annotations": []})


def test_specificity_is_undefined_without_negative_images():
    """A split whose every image has ground truth has no negatives: specificity is None, not 0.0."""
    from sam3ft.metrics.image_level import confusion

    c = confusion({1: True, 2: True}, {1: 0.9, 2: 0.1}, threshold=0.5)
    assert (c.tp, c.fn, c.fp, c.tn) == (1, 1, 0, 0)
    assert c.specificity is None and c.summary()["specificity"] is None
    assert c.precision == 1.0 and c.recall == 0.5
