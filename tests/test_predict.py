"""Evaluation and `sam3ft predict` on a model whose outputs are fixed: exact, hand-checked values."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from sam3ft.__main__ import main as cli
from sam3ft.errors import Sam3ftError
from sam3ft.inference import collect_images, predict_images
from sam3ft.metrics.image_level import confusion, confusion_rows, threshold_sweep
from sam3ft.model.predict import Predictor


class FixedModel(torch.nn.Module):
    """Stands in for Sam3Image: two queries, the first a confident box, the second a weak one."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = SimpleNamespace(
            forward_image=lambda pixels: {"shape": pixels.shape},
            forward_text=lambda prompts, device: {"prompt": prompts[0]},
        )
        self.seen: list[tuple] = []

    def _get_dummy_prompt(self):
        return None

    def forward_grounding(self, backbone_out, find_input, geometric_prompt, find_target):
        self.seen.append((tuple(backbone_out["shape"]), backbone_out["prompt"]))
        return {
            "pred_boxes": torch.tensor([[[0.5, 0.5, 0.5, 0.2], [0.1, 0.1, 0.4, 0.4]]]),  # cxcywh
            "pred_logits": torch.tensor([[[2.0], [-5.0]]]),
            "presence_logit_dec": torch.tensor([[3.0]]),
        }


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_predictor_maps_boxes_to_original_pixels():
    model = FixedModel()
    dets = Predictor(model, 28).predict(Image.new("RGB", (200, 100)), {1: "fuse cutout"}, max_dets=5)
    assert model.seen == [((1, 3, 28, 28), "fuse cutout")]  # resized to the model's resolution
    assert dets[0].box_xyxy == pytest.approx((50.0, 40.0, 150.0, 60.0))
    assert dets[0].score == pytest.approx(sigmoid(2.0) * sigmoid(3.0), abs=1e-6)
    # the second box (x from -0.1) is clipped to the image
    assert dets[1].box_xyxy == pytest.approx((0.0, 0.0, 60.0, 30.0))
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)


def test_predict_images_writes_exact_json_and_overlays(tmp_path):
    Image.new("RGB", (200, 100), (10, 20, 30)).save(tmp_path / "box.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    images = collect_images([str(tmp_path / "*.png"), str(tmp_path / "broken.jpg")])
    report = predict_images(
        Predictor(FixedModel(), 28), images, {1: "fuse cutout"}, 0.5, 100, tmp_path / "out"
    )
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert written == {
        "threshold": 0.5,
        "prompts": {"1": "fuse cutout"},
        "images": [
            {
                "image": str(tmp_path / "box.png"),
                "width": 200,
                "height": 100,
                "overlay": "overlays/box.jpg",
                "detections": [
                    {
                        "box_xyxy": [50.0, 40.0, 150.0, 60.0],
                        "score": 0.839,
                        "category_id": 1,
                        "prompt": "fuse cutout",
                    }
                ],
            }
        ],
        "failed": [str(tmp_path / "broken.jpg")],
    }
    assert report.failed == [str(tmp_path / "broken.jpg")]
    with Image.open(tmp_path / "out" / "overlays" / "box.jpg") as overlay:
        assert overlay.size == (200, 100)
        assert max(overlay.getpixel((50, 50))) > 150  # the red box edge was drawn at x=50


def test_collect_images_folders_globs_and_missing(tmp_path):
    for name in ("b.jpg", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert collect_images([str(tmp_path)]) == [tmp_path / "a.png", tmp_path / "b.jpg"]
    assert collect_images([str(tmp_path / "*.jpg"), str(tmp_path / "b.jpg")]) == [tmp_path / "b.jpg"]
    with pytest.raises(Sam3ftError, match="matches no file"):
        collect_images([str(tmp_path / "*.webp")])


def test_cli_exits_nonzero_when_an_image_fails(tmp_path, monkeypatch):
    """The real CLI path with the export loader swapped for the fixed model."""
    import sam3ft.model.export as export

    spec = SimpleNamespace(image_size=28)
    monkeypatch.setattr(export, "load_export", lambda d, b: (FixedModel(), spec, {"prompts": {"1": "fuse"}}))
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.jpg")
    out = tmp_path / "out"
    assert cli(["predict", str(tmp_path / "ok.jpg"), "--out", str(out)]) == 0
    assert cli(["predict", str(tmp_path / "ok.jpg"), str(tmp_path / "gone.jpg"), "--out", str(out)]) == 1
    assert json.loads((out / "detections.json").read_text())["failed"] == [str(tmp_path / "gone.jpg")]


# image-level metrics, hand-computed: 3 positive images (ids 1-3), 2 negatives (ids 4-5)
POSITIVE = {1: True, 2: True, 3: True, 4: False, 5: False}


def test_confusion_counts_negatives():
    best = {1: 0.95, 2: 0.7, 3: 0.2, 4: 0.1}  # image 5 has no detection at all
    c = confusion(POSITIVE, best, 0.5)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 0, 1, 2)
    assert (c.precision, c.recall, c.specificity) == (1.0, round(2 / 3, 6), 1.0)
    assert c.f1 == 0.8  # 2*2 / (2*2 + 0 + 1)
    # one false positive on a negative image: specificity 2/2 -> 1/2, precision 1 -> 2/3
    c = confusion(POSITIVE, {**best, 5: 0.9}, 0.5)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 1)
    assert c.specificity == 0.5 and c.precision == round(2 / 3, 6)


def test_confusion_without_any_prediction_is_zero_not_nan():
    c = confusion(POSITIVE, {}, 0.5)
    assert (c.tp, c.fp, c.fn, c.tn) == (0, 0, 3, 2)
    assert (c.precision, c.recall, c.f1, c.specificity) == (0.0, 0.0, 0.0, 1.0)


def test_sweep_and_confusion_rows():
    best = {1: 0.95, 2: 0.7, 3: 0.2, 4: 0.6}
    rows = threshold_sweep(POSITIVE, best, [0.0, 0.65, 1.0])
    assert rows[0] == {"threshold": 0.0, "precision": 0.6, "recall": 1.0, "f1": 0.75}
    assert rows[1] == {"threshold": 0.65, "precision": 1.0, "recall": round(2 / 3, 6), "f1": 0.8}
    assert rows[2]["recall"] == 0.0
    assert confusion_rows(POSITIVE, best, 0.5)[3] == {"actual": "no object", "predicted": "object"}
