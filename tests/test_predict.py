"""Evaluation and `sam3ft predict` on a model whose outputs are fixed: exact, hand-checked values."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

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


# masks: the first query's mask is exactly its box (rows 40-59, columns 50-149 of a 200x100 image),
# the second query's is empty. Logits at the image's own size: resizing to it is the identity.
BOX_MASK = torch.zeros(100, 200, dtype=torch.bool)
BOX_MASK[40:60, 50:150] = True


class FixedMaskModel(FixedModel):
    """FixedModel with a mask head: `pred_masks` (1, Q, H, W) logits."""

    def forward_grounding(self, **kwargs):
        out = super().forward_grounding(**kwargs)
        logits = torch.full((1, 2, 100, 200), -10.0)
        logits[0, 0][BOX_MASK] = 10.0
        return {**out, "pred_masks": logits}


def decode(rle: dict) -> torch.Tensor:
    return torch.from_numpy(mask_utils.decode({**rle, "counts": rle["counts"].encode()}).astype(bool))


def test_predictor_gives_rle_masks_in_original_pixels():
    dets = Predictor(FixedMaskModel(), 28).predict(Image.new("RGB", (200, 100)), {1: "fuse"}, max_dets=5)
    assert [d.mask["size"] for d in dets] == [[100, 200], [100, 200]]
    assert torch.equal(decode(dets[0].mask), BOX_MASK)
    assert not decode(dets[1].mask).any()
    boxes_only = Predictor(FixedModel(), 28).predict(Image.new("RGB", (200, 100)), {1: "f"}, max_dets=5)
    assert [d.mask for d in boxes_only] == [None, None]


def test_predict_images_writes_masks_and_tints_them(tmp_path):
    Image.new("RGB", (200, 100), (10, 20, 30)).save(tmp_path / "box.png")
    predictor = Predictor(FixedMaskModel(), 28)
    predict_images(predictor, [tmp_path / "box.png"], {1: "fuse"}, 0.5, 100, tmp_path / "out")
    (image,) = json.loads((tmp_path / "out" / "detections.json").read_text())["images"]
    (det,) = image["detections"]
    assert torch.equal(decode(det["segmentation"]), BOX_MASK)
    with Image.open(tmp_path / "out" / "overlays" / "box.jpg") as overlay:
        inside, outside = overlay.getpixel((100, 50)), overlay.getpixel((20, 20))
    assert inside[0] > 100 and outside[0] < 30  # red tint at 40% over (10, 20, 30) inside the mask only


def test_evaluation_of_perfect_masks_scores_one(tmp_path):
    """predict_split + split_report on a fixed-output model: its mask is the ground truth's, so segm
    AP is 1.0 (pycocotools); the weak second detection is a false positive ranked last."""
    from sam3ft.stages.evaluate import predict_split, split_report

    Image.new("RGB", (200, 100)).save(tmp_path / "a.jpg")
    polygon = [50, 40, 150, 40, 150, 60, 50, 60]
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [50, 40, 100, 20], "area": 2000,
             "iscrowd": 0, "segmentation": [polygon]},
        ],
        "categories": [{"id": 1, "name": "fuse"}],
    }  # fmt: skip
    gt = tmp_path / "_annotations.coco.json"
    gt.write_text(json.dumps(coco))
    gt_mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], 100, 200)))
    assert torch.equal(torch.from_numpy(gt_mask.astype(bool)), BOX_MASK)  # the polygon rasterises to it
    results = predict_split(Predictor(FixedMaskModel(), 28), tmp_path, coco, max_dets=5)
    assert [set(r) for r in results] == [{"image_id", "category_id", "bbox", "score", "segmentation"}] * 2
    metrics, _ = split_report(gt, coco, results, threshold=0.5)
    assert metrics["segm"]["AP"] == 1.0 and metrics["segm"]["AP75"] == 1.0 and metrics["segm"]["AR@1"] == 1.0
    assert metrics["AP"] == 1.0  # the box, too
    results_without_masks = predict_split(Predictor(FixedModel(), 28), tmp_path, coco, max_dets=5)
    assert "segm" not in split_report(gt, coco, results_without_masks, threshold=0.5)[0]
