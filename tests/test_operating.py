"""evaluate.threshold: auto: the operating threshold from detection F1 on a split."""

from __future__ import annotations

import pytest

from sam3ft import params
from sam3ft.errors import ConfigError
from sam3ft.metrics.operating import best_threshold, detection_f1, matched_scores
from sam3ft.stages.evaluate import SWEEP, resolve_threshold

# two images, one object each (category 1); boxes xywh
COCO = {
    "images": [{"id": 1}, {"id": 2}],
    "annotations": [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
        {"image_id": 2, "category_id": 1, "bbox": [50, 50, 10, 10]},
    ],
}


def det(image: int, box: list[float], score: float, category: int = 1) -> dict:
    return {"image_id": image, "category_id": category, "bbox": box, "score": score}


def test_greedy_matching_by_score_counts_each_object_once():
    results = [
        det(1, [10, 10, 20, 20], 0.9),  # hit
        det(1, [11, 11, 20, 20], 0.8),  # a duplicate of the same object: false positive
        det(2, [0, 0, 5, 5], 0.7),  # misses
        det(2, [50, 50, 10, 10], 0.3, category=2),  # right place, wrong category
        det(2, [51, 50, 10, 10], 0.2),  # hit (IoU 9/11)
    ]
    scored, n_truth = matched_scores(COCO, results)
    assert n_truth == 2
    assert scored == [(0.9, True), (0.8, False), (0.7, False), (0.3, False), (0.2, True)]
    assert detection_f1(scored, n_truth, 0.85) == pytest.approx(2 / 3)  # tp 1, fp 0, fn 1
    assert detection_f1(scored, n_truth, 0.1) == pytest.approx(4 / 7)  # tp 2, fp 3, fn 0
    assert detection_f1(scored, n_truth, 0.95) == 0.0


def test_best_threshold_keeps_fewer_boxes_on_a_tie():
    results = [det(1, [10, 10, 20, 20], 0.62), det(2, [50, 50, 10, 10], 0.41), det(2, [0, 0, 5, 5], 0.12)]
    # F1 1.0 for every threshold in (0.12, 0.41]: the highest of them wins
    assert best_threshold(COCO, results, SWEEP[1:-1]) == 0.4


def test_auto_is_chosen_on_the_first_split_with_objects_and_numbers_pass_through():
    negatives = {"images": [{"id": 9}], "annotations": []}
    results = [det(1, [10, 10, 20, 20], 0.33), det(2, [50, 50, 10, 10], 0.31)]
    predicted = [("negatives", negatives, [det(9, [0, 0, 9, 9], 0.99)]), ("valid", COCO, results)]
    assert resolve_threshold("auto", predicted) == 0.3
    assert resolve_threshold(0.7, predicted) == 0.7
    with pytest.raises(ConfigError, match="no evaluated split has objects") as err:
        resolve_threshold("auto", predicted[:1])
    assert err.value.key == "evaluate.threshold"


@pytest.mark.parametrize("value", ["high", 1.5, -0.1])
def test_threshold_must_be_a_score_or_auto(value):
    data = {"splits": None, "max_dets": 100, "threshold": value, "overlays": 0}
    with pytest.raises(ConfigError, match=r"evaluate\.threshold"):
        params.section_from_dict(params.Evaluate, data, "evaluate")
    assert (
        params.section_from_dict(params.Evaluate, dict(data, threshold="auto"), "evaluate").threshold
        == "auto"
    )
