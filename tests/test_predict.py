"""Evaluation and `sam3ft predict` on a model whose outputs are fixed: exact, hand-checked values."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from sam3.model import box_ops
from sam3.model.data_misc import FindStage
from torchvision.transforms import v2

from conftest import SAMPLE
from sam3ft.__main__ import main as cli
from sam3ft.errors import ConfigError, Sam3ftError
from sam3ft.inference import collect_images, predict_images
from sam3ft.io import write_json
from sam3ft.metrics.image_level import confusion, confusion_rows, threshold_sweep
from sam3ft.model.build import build_model
from sam3ft.model.export import FORMAT, cast, load_export, write_weights
from sam3ft.model.predict import Predictor
from sam3ft.model.spec import load_preset
from sam3ft.stages.fetch import bundled_vocab


class FixedBackbone(torch.nn.Module):
    """Records the images and texts it encodes."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[int, ...]] = []
        self.texts: list[str] = []

    def forward_image(self, pixels):
        self.images.append(tuple(pixels.shape))
        return {"backbone_fpn": [pixels]}

    def forward_text(self, prompts, device):
        self.texts += prompts
        return {k: torch.zeros(1, len(prompts), 1) for k in ("language_features", "language_embeds")} | {
            "language_mask": torch.zeros(len(prompts), 1, dtype=torch.bool)
        }


class FixedModel(torch.nn.Module):
    """Stands in for Sam3Image: two queries, the first a confident box, the second a weak one."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = FixedBackbone()
        self.prompts_seen: list[int] = []  # prompts per grounding call

    def _get_dummy_prompt(self, num_prompts=1):
        return None

    def _encode_prompt(self, backbone_out, find_input, geometric_prompt):
        self.prompts_seen.append(len(find_input.text_ids))
        ids = find_input.text_ids  # one query per (image, prompt), as sam3's _encode_prompt indexes
        return backbone_out["language_features"][:, ids], backbone_out["language_mask"][ids], backbone_out

    def _run_encoder(self, backbone_out, find_input, prompt, prompt_mask):
        return backbone_out, {"encoder_hidden_states": None, "pos_embed": None, "padding_mask": None}, None

    def _run_decoder(self, memory, pos_embed, src_mask, out, prompt, prompt_mask, encoder_out):
        n = prompt.shape[1]
        out["pred_boxes"] = torch.tensor([[[0.5, 0.5, 0.5, 0.2], [0.1, 0.1, 0.4, 0.4]]] * n)  # cxcywh
        out["pred_logits"] = torch.tensor([[[2.0], [-5.0]]] * n)
        out["presence_logit_dec"] = torch.tensor([[3.0]] * n)
        return out, None


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_predictor_maps_boxes_to_original_pixels():
    model = FixedModel()
    dets = Predictor(model, 28).predict(Image.new("RGB", (200, 100)), {1: "fuse cutout"}, max_dets=5)
    assert model.backbone.images == [(1, 3, 28, 28)]  # resized to the model's resolution
    assert model.backbone.texts == ["fuse cutout"]
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
        Predictor(FixedModel(), 28), images, {1: "fuse cutout"}, 0.5, 100, tmp_path / "out", {"preset": "x"}
    )
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    broken = str(tmp_path / "broken.jpg")
    assert written["errors"][broken] == f"{broken}: not an image (or a damaged one)"
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
        "failed": [broken],
        "errors": {broken: written["errors"][broken]},
        "model": {"preset": "x"},
    }
    assert report.failed == [broken]
    with Image.open(tmp_path / "out" / "overlays" / "box.jpg") as overlay:
        assert overlay.size == (200, 100)
        assert max(overlay.getpixel((50, 50))) > 150  # the red box edge was drawn at x=50
        # the label: white text on a red band above the box (rows < 40), wider than the old 10 px font
        band = [overlay.getpixel((x, 30)) for x in range(50, 150)]
        assert sum(p[0] > 200 and p[1] < 80 for p in band) > 20
        assert sum(min(p) > 200 for p in band) > 3  # white glyph pixels
    coco = json.loads((tmp_path / "out" / "_annotations.coco.json").read_text())
    assert coco["images"] == [{"id": 1, "file_name": "box.png", "width": 200, "height": 100}]
    assert coco["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [50.0, 40.0, 100.0, 20.0], "area": 2000.0,
         "iscrowd": 0, "segmentation": [], "score": 0.839}
    ]  # fmt: skip
    assert coco["categories"] == [{"id": 1, "name": "fuse cutout", "supercategory": "none"}]


def test_collect_images_folders_globs_and_missing(tmp_path):
    for name in ("b.jpg", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert collect_images([str(tmp_path)]) == [tmp_path / "a.png", tmp_path / "b.jpg"]
    assert collect_images([str(tmp_path / "*.jpg"), str(tmp_path / "b.jpg")]) == [tmp_path / "b.jpg"]
    with pytest.raises(Sam3ftError, match="matches no file"):
        collect_images([str(tmp_path / "*.webp")])
    with pytest.raises(Sam3ftError, match=r"no such file or folder: .*gone\.jpg"):
        collect_images([str(tmp_path / "a.png"), str(tmp_path / "gone.jpg")])


def fake_export(directory: Path, threshold: float | None = 0.4, mode: str = "full") -> Path:
    """An export folder that passes model.json's checks; `load_export` is swapped for FixedModel."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.safetensors").write_bytes(b"")
    (directory / "vocab.txt.gz").write_bytes(b"")
    info = {"format": FORMAT, "mode": mode, "weights": "model.safetensors", "vocab": "vocab.txt.gz"}
    info |= {"prompts": {"1": "fuse"}, "weights_sha256": "ab" * 32, "spec": {"name": "fixed"}}
    if threshold is not None:
        info["threshold"] = threshold
    write_json(directory / "model.json", info)
    return directory


@pytest.fixture
def fixed_export(tmp_path, monkeypatch):
    """`sam3ft predict --model DIR` runs FixedModel (which loads nothing) through the real CLI."""
    import sam3ft.model.export as export

    monkeypatch.setattr(
        export, "load_export", lambda d, b, dtype: (FixedModel(), SimpleNamespace(image_size=28), {})
    )
    return fake_export(tmp_path / "model")


def test_cli_exits_nonzero_when_an_image_fails(tmp_path, fixed_export):
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    args = ["predict", "--model", str(fixed_export), "--out", str(out)]
    assert cli([*args, str(tmp_path / "ok.jpg")]) == 0
    assert cli([*args, str(tmp_path / "ok.jpg"), str(tmp_path / "broken.jpg")]) == 1
    assert json.loads((out / "detections.json").read_text())["failed"] == [str(tmp_path / "broken.jpg")]
    # a path that does not exist is a usage error, found before the model loads
    assert cli([*args, str(tmp_path / "ok.jpg"), str(tmp_path / "gone.jpg")]) == 2


def test_cli_threshold_defaults_to_the_models_operating_threshold(tmp_path, fixed_export, capsys):
    """FixedModel scores 0.839 and 0.0064: the threshold decides how many are kept."""
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.jpg")
    out = tmp_path / "out"
    args = ["predict", str(tmp_path / "ok.jpg"), "--out", str(out)]
    assert cli([*args, "--model", str(fixed_export)]) == 0
    written = json.loads((out / "detections.json").read_text())
    assert written["threshold"] == 0.4 and len(written["images"][0]["detections"]) == 1
    assert cli([*args, "--model", str(fixed_export), "--threshold", "0"]) == 0
    assert len(json.loads((out / "detections.json").read_text())["images"][0]["detections"]) == 2
    older = fake_export(tmp_path / "older", threshold=None)  # exported before model.json stored it
    capsys.readouterr()
    assert cli([*args, "--model", str(older)]) == 0
    assert json.loads((out / "detections.json").read_text())["threshold"] == 0.5
    assert "stores no operating threshold" in capsys.readouterr().err


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
    """FixedModel with a mask head: `pred_masks` (P, Q, H, W) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.segmentation_head = torch.nn.Identity()  # its presence is what Predictor checks

    def _run_encoder(self, backbone_out, find_input, prompt, prompt_mask):
        backbone_out, encoder_out, extra = super()._run_encoder(backbone_out, find_input, prompt, prompt_mask)
        return backbone_out, {**encoder_out, "vis_feat_sizes": None}, extra

    def _run_segmentation_heads(self, out, prompt, **kwargs):
        logits = torch.full((prompt.shape[1], 2, 100, 200), -10.0)
        logits[:, 0][:, BOX_MASK] = 10.0
        out["pred_masks"] = logits


def decode(rle: dict) -> torch.Tensor:
    return torch.from_numpy(mask_utils.decode({**rle, "counts": rle["counts"].encode()}).astype(bool))


def test_predictor_gives_rle_masks_in_original_pixels():
    dets = Predictor(FixedMaskModel(), 28).predict(Image.new("RGB", (200, 100)), {1: "fuse"}, max_dets=5)
    assert [d.mask["size"] for d in dets] == [[100, 200], [100, 200]]
    assert torch.equal(decode(dets[0].mask), BOX_MASK)
    assert not decode(dets[1].mask).any()
    boxes_only = Predictor(FixedModel(), 28).predict(Image.new("RGB", (200, 100)), {1: "f"}, max_dets=5)
    assert [d.mask for d in boxes_only] == [None, None]
    skipped = Predictor(FixedMaskModel(), 28, masks=False)  # `sam3ft predict --boxes-only`
    dets_skipped = skipped.predict(Image.new("RGB", (200, 100)), {1: "fuse"}, max_dets=5)
    assert [d.mask for d in dets_skipped] == [None, None]
    assert [d.box_xyxy for d in dets_skipped] == [d.box_xyxy for d in dets]


def test_min_score_drops_detections_before_their_masks_are_encoded(monkeypatch):
    import sam3ft.model.predict as predict_module

    encoded = []
    real = predict_module.masks_to_rles
    monkeypatch.setattr(
        predict_module, "masks_to_rles", lambda m, h, w: encoded.append(len(m)) or real(m, h, w)
    )
    predictor = Predictor(FixedMaskModel(), 28)
    image = Image.new("RGB", (200, 100))
    everything = predictor.predict(image, {1: "fuse"}, max_dets=5)
    assert len(everything) == 2 and encoded == [2] and everything[0].score > everything[1].score
    encoded.clear()
    between = (everything[0].score + everything[1].score) / 2
    kept = predictor.predict(image, {1: "fuse"}, max_dets=5, min_score=between)
    assert kept == everything[:1] and encoded == [1]  # the dropped one's mask was never encoded
    encoded.clear()
    assert predictor.predict(image, {1: "fuse"}, max_dets=5, min_score=1.01) == [] and encoded == []


def reference_rle(logits: torch.Tensor, height: int, width: int) -> dict:
    """One mask as sam3's PostProcessImage makes it (bilinear resize, logit > 0), pycocotools' encoder."""
    mask = F.interpolate(logits[None, None], (height, width), mode="bilinear", align_corners=False)[0, 0] > 0
    rle = mask_utils.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))
    return {"size": [height, width], "counts": rle["counts"].decode()}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_rle_on_the_device_equals_pycocotools_per_mask(monkeypatch, device):
    import sam3ft.model.predict as predict_module

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    torch.manual_seed(0)
    logits = torch.randn(6, 18, 18) * 4
    logits[3] = -1.0  # empty
    logits[4] = 1.0  # full
    logits[5, :, :9] = 5.0  # starts with a foreground run
    logits = logits.to(device)
    for height, width in ((37, 53), (100, 64), (1, 1)):
        expected = [reference_rle(m, height, width) for m in logits]
        assert predict_module.masks_to_rles(logits, height, width) == expected
        monkeypatch.setattr(predict_module, "RLE_CHUNK_PIXELS", 2 * height * width)  # chunks of 2
        assert predict_module.masks_to_rles(logits, height, width) == expected
        monkeypatch.undo()
    assert predict_module.masks_to_rles(logits[:0], 10, 10) == []


def test_compiled_batches_are_padded_and_split(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, dynamic=None: fn)  # the padding, not inductor
    model = FixedMaskModel()
    predictor = Predictor(model, 28, compile_mode="default", compile_scope="all", compile_batches=(4, 1))
    assert predictor.batch_sizes == (1, 4) and model.backbone.images[-2:] == [(1, 3, 28, 28), (4, 3, 28, 28)]
    images = [Image.new("RGB", (200, 100 + i)) for i in range(6)]
    model.backbone.images.clear()
    found = predictor.predict_batch(images, {1: "fuse"}, 5, [0.0] * 6)
    assert model.backbone.images == [(4, 3, 28, 28), (4, 3, 28, 28)]  # 4, then 2 padded up to 4
    single = [predictor.predict(image, {1: "fuse"}, 5) for image in images]
    assert found == single and [len(f) for f in found] == [2] * 6
    assert [d.mask["size"] for d in found[5]] == [[105, 200]] * 2
    with pytest.raises(ValueError, match="2 images but 1 min_scores"):
        predictor.predict_batch(images[:2], {1: "fuse"}, 5, [0.0])


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


def test_masks_tinted_in_one_pass_match_tinting_them_one_by_one():
    """draw_masks' closed form (a pixel under k masks keeps (1 - alpha)^k of itself) against the
    mask-by-mask blend it replaced: within one level of 255 everywhere (float32 rounding), the
    untouched pixels exact, and no mask the image as it was."""
    from sam3ft.viz import PREDICTION, draw_masks

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    masks = [rng.random((60, 80)) < share for share in (0.5, 0.3, 0.7, 0.5, 0.1)]
    masks[0][:5] = False  # rows under no mask
    for mask in masks[1:]:
        mask[:5] = False
    reference = pixels.astype(np.float32)
    for mask in masks:
        reference[mask] = 0.6 * reference[mask] + 0.4 * np.asarray(PREDICTION, dtype=np.float32)
    got = np.asarray(draw_masks(Image.fromarray(pixels), masks, PREDICTION))
    assert np.abs(got.astype(int) - reference.round().astype(int)).max() <= 1
    assert np.array_equal(got[:5], pixels[:5])
    assert (np.sum(masks, axis=0) >= 4).any()  # deep overlaps were drawn
    assert np.array_equal(np.asarray(draw_masks(Image.fromarray(pixels), [], PREDICTION)), pixels)


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


# --- the real tiny model: the fast Predictor against the per-prompt path it replaced -----------------


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """Tiny SAM3 whose boxes depend on the image: the box head's last layer starts at zero
    (DETR init), which would make every box the query's reference box whatever the input."""
    torch.manual_seed(seed)
    model = build_model(load_preset("tiny"), str(bundled_vocab()), training=False, coord_cache=False)
    last = model.transformer.decoder.bbox_embed.layers[-1]
    torch.nn.init.normal_(last.weight, std=0.05)
    return model


@torch.inference_mode()
def reference_raw_outputs(model, image: Image.Image, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The Predictor before batching (commit ab1010b): backbone and full forward_grounding per prompt."""
    transform = v2.Compose(
        [
            v2.Resize(size=(224, 224)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        ]
    )
    backbone_out = model.backbone.forward_image(transform(v2.functional.to_image(image)).unsqueeze(0))
    backbone_out.update(model.backbone.forward_text([prompt], device="cpu"))
    out = model.forward_grounding(
        backbone_out=backbone_out,
        find_input=FindStage(torch.tensor([0]), torch.tensor([0]), None, None, None, None, None),
        geometric_prompt=model._get_dummy_prompt(),
        find_target=None,
    )
    presence = out["presence_logit_dec"].sigmoid().unsqueeze(1)
    return out["pred_boxes"][0], (out["pred_logits"].sigmoid() * presence).squeeze(-1)[0]


@pytest.fixture(scope="module")
def sample_image() -> Image.Image:
    with Image.open(sorted((SAMPLE / "valid").glob("*.jpg"))[0]) as image:
        return image.convert("RGB")


PROMPTS = {1: "fuse neutrals", 2: "cutout", 3: "screw head"}


def test_one_prompt_is_bit_identical_to_the_per_prompt_path(sample_image):
    model = tiny_model().eval()
    boxes, scores = Predictor(model, 224).raw_outputs(sample_image, "fuse neutrals")
    ref_boxes, ref_scores = reference_raw_outputs(model, sample_image, "fuse neutrals")
    assert boxes.shape == (20, 4) and scores.shape == (20,)
    assert torch.equal(boxes, ref_boxes) and torch.equal(scores, ref_scores)
    assert scores.std() > 0.001 and boxes[:, 0].std() > 0.001  # not a constant output


def test_several_prompts_batched_match_one_by_one_and_run_the_backbone_once(sample_image):
    model = tiny_model().eval()
    calls = {"image": 0, "text": 0}
    image_fn, text_fn = model.backbone.forward_image, model.backbone.forward_text

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    predictor = Predictor(model, 224)
    model.backbone.forward_image = count("image", image_fn)
    model.backbone.forward_text = count("text", text_fn)
    predictor._forward_image = model.backbone.forward_image
    dets = predictor.predict(sample_image, PROMPTS, max_dets=5)
    assert calls == {"image": 1, "text": 3}
    predictor.predict(sample_image, PROMPTS, max_dets=5)
    assert calls == {"image": 2, "text": 3}  # text features cached per prompt

    model.backbone.forward_image, model.backbone.forward_text = image_fn, text_fn
    width, height = sample_image.size
    scale = torch.tensor([width, height, width, height])
    assert [d.category_id for d in dets] == [1] * 5 + [2] * 5 + [3] * 5
    for category_id, prompt in PROMPTS.items():
        ref_boxes, ref_scores = reference_raw_outputs(model, sample_image, prompt)
        order = torch.sort(ref_scores, descending=True, stable=True).indices[:5]
        ref_xyxy = box_ops.box_cxcywh_to_xyxy(ref_boxes[order]).clamp(0, 1) * scale
        got = [d for d in dets if d.category_id == category_id]
        # batching the prompts changes float32 sums in the last bit, no more
        assert torch.tensor([d.box_xyxy for d in got]) == pytest.approx(ref_xyxy, abs=1e-3)  # pixels
        assert [d.score for d in got] == pytest.approx(ref_scores[order].tolist(), abs=1e-6)


def test_a_batch_of_images_gives_each_images_own_detections(sample_image):
    model = tiny_model().eval()
    spec = dataclasses.replace(load_preset("tiny"), segmentation=True)
    torch.manual_seed(3)
    with_masks = build_model(spec, str(bundled_vocab()), training=False, coord_cache=False).eval()
    flipped = sample_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((300, 200))
    images = [sample_image, flipped, sample_image]
    for predictor in (Predictor(model, 224), Predictor(with_masks, 224)):
        scores = sorted(d.score for d in predictor.predict(sample_image, PROMPTS, 5))
        half = len(scores) // 2  # the third image keeps about half: a cut between two scores
        min_scores = [0.0, 0.0, (scores[half - 1] + scores[half]) / 2]
        assert scores[half] - scores[half - 1] > 1e-4
        batched = predictor.predict_batch(images, PROMPTS, 5, min_scores)
        for got, image, min_score in zip(batched, images, min_scores, strict=True):
            alone = predictor.predict(image, PROMPTS, 5, min_score)
            assert [d.category_id for d in got] == [d.category_id for d in alone]
            # a batch of 3 changes float32 sums in the last bits, no more
            assert torch.tensor([d.box_xyxy for d in got]) == pytest.approx(
                torch.tensor([d.box_xyxy for d in alone]), abs=1e-3
            )
            assert [d.score for d in got] == pytest.approx([d.score for d in alone], abs=1e-5)
            for a, b in zip(got, alone, strict=True):
                assert (a.mask is None) == (b.mask is None) == (not predictor.with_masks)
                if a.mask is not None:  # a logit within rounding of 0 may flip a pixel
                    assert (decode(a.mask) == decode(b.mask)).float().mean() > 0.999
        assert batched[0] != batched[1] and 0 < len(batched[2]) < len(batched[0])


def test_a_split_predicted_in_batches_gives_the_records_of_one_by_one(tmp_path, sample_image):
    """evaluate.batch_size: predict_split in batches of 2 over 3 images (the last batch short) gives
    each image's own records, as one image at a time does, up to float rounding; and null resolves to
    8 on a GPU, 1 on the CPU."""
    from sam3ft.params import GPU_PREDICT_BATCH, Evaluate
    from sam3ft.stages.evaluate import predict_split

    flipped = sample_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((300, 200))
    images = [("a.jpg", sample_image), ("b.jpg", flipped), ("c.jpg", sample_image.resize((160, 120)))]
    for name, image in images:
        image.save(tmp_path / name)
    coco = {
        "images": [
            {"id": i, "file_name": name, "width": image.width, "height": image.height}
            for i, (name, image) in enumerate(images, 1)
        ],
        "annotations": [],
        "categories": [{"id": k, "name": v} for k, v in PROMPTS.items()],
    }
    predictor = Predictor(tiny_model().eval(), 224)
    alone = predict_split(predictor, tmp_path, coco, max_dets=4, batch_size=1)
    batched = predict_split(predictor, tmp_path, coco, max_dets=4, batch_size=2)
    assert [r["image_id"] for r in alone] == [1] * 12 + [2] * 12 + [3] * 12
    assert [(r["image_id"], r["category_id"]) for r in batched] == [
        (r["image_id"], r["category_id"]) for r in alone
    ]
    for got, want in zip(batched, alone, strict=True):
        assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-2)  # pixels
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    by_image = {i: [r["bbox"] for r in alone if r["image_id"] == i] for i in (1, 2, 3)}
    assert by_image[1] != by_image[2] and by_image[1] != by_image[3]  # each image its own boxes

    evaluate = Evaluate(splits=None, max_dets=100, threshold="auto", overlays=0, batch_size=None)
    assert (evaluate.images_per_batch("cuda"), evaluate.images_per_batch("cpu")) == (GPU_PREDICT_BATCH, 1)
    assert dataclasses.replace(evaluate, batch_size=3).images_per_batch("cpu") == 3
    with pytest.raises(ConfigError, match=r"evaluate\.batch_size"):
        dataclasses.replace(evaluate, batch_size=0)


def test_bfloat16_backbone_runs_on_cpu_close_to_float32(sample_image):
    fp32 = Predictor(tiny_model().eval(), 224)
    bf16 = Predictor(tiny_model().eval(), 224, dtype=torch.bfloat16)
    trunk = bf16.model.backbone.vision_backbone.trunk
    assert trunk.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert trunk.blocks[0].attn.freqs_cis.dtype == torch.complex64  # RoPE table left complex
    assert bf16.model.transformer.decoder.bbox_embed.layers[0].weight.dtype == torch.float32
    boxes, scores = fp32.raw_outputs(sample_image, "fuse neutrals")
    bf_boxes, bf_scores = bf16.raw_outputs(sample_image, "fuse neutrals")
    assert bf_boxes.dtype == bf_scores.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: measured 0.0003 (boxes, normalised) and 0.0007 (scores) here
    assert (bf_boxes - boxes).abs().max() < 0.01
    assert (bf_scores - scores).abs().max() < 0.01
    assert not torch.equal(bf_boxes, boxes)  # it did run in bf16


def test_load_export_in_bfloat16_keeps_stored_weights(tmp_path):
    model = tiny_model()
    bf16_state = cast(model.state_dict(), torch.bfloat16)
    info = {"format": FORMAT, "spec": load_preset("tiny").to_dict(), "vocab": bundled_vocab().name}
    info |= {"mode": "full", **write_weights(tmp_path, bf16_state, "model", torch_file=False)}
    shutil.copyfile(bundled_vocab(), tmp_path / bundled_vocab().name)
    write_json(tmp_path / "model.json", info)
    loaded, _, _ = load_export(tmp_path, dtype=torch.bfloat16)
    state = loaded.state_dict()
    key = "backbone.vision_backbone.trunk.blocks.0.attn.qkv.weight"
    assert state[key].dtype == torch.bfloat16 and torch.equal(state[key], bf16_state[key])
    head = "transformer.decoder.bbox_embed.layers.0.weight"
    assert state[head].dtype == torch.float32 and torch.equal(state[head], bf16_state[head].float())
    fp32, _, _ = load_export(tmp_path)  # built on the meta device, every parameter then loaded
    fp32_state = fp32.state_dict()
    assert all(v.dtype != torch.bfloat16 for v in fp32_state.values())
    upcast = cast(bf16_state, torch.float32)
    assert fp32_state.keys() == upcast.keys()
    assert all(torch.equal(fp32_state[k], upcast[k]) for k in upcast)
    mask = "backbone.language_backbone.encoder.attn_mask"  # a buffer outside the state dict
    assert torch.equal(dict(fp32.named_buffers())[mask], dict(model.named_buffers())[mask])


def test_compile_failure_is_an_error_not_a_fallback(monkeypatch):
    def broken(fn, mode=None, dynamic=None):
        def run(*args, **kwargs):
            raise RuntimeError("inductor exploded")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(Sam3ftError, match=r"torch\.compile.*inductor exploded"):
        Predictor(FixedModel(), 28, compile_mode="default")
    with pytest.raises(Sam3ftError, match="unknown compile mode"):
        Predictor(FixedModel(), 28, compile_mode="fastest")
    with pytest.raises(Sam3ftError, match=r"of the image backbone and grounding head failed.*inductor"):
        Predictor(FixedModel(), 28, compile_mode="default", compile_scope="all")
    with pytest.raises(Sam3ftError, match="unknown compile scope"):
        Predictor(FixedModel(), 28, compile_mode="default", compile_scope="head")


@pytest.mark.slow
def test_compiled_model_matches_eager(sample_image):
    """torch.compile of the image backbone and the grounding head as one function (the CLI's default
    scope and mode): ~75 s of inductor on this 2-core CPU (tiny model), where inductor skips the CUDA
    graphs. sam3's box encoder stays eager (its .pin_memory())."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    eager = Predictor(tiny_model().eval(), 224, device, dtype)
    compiled = Predictor(
        tiny_model().eval(), 224, device, dtype, compile_mode="reduce-overhead", compile_scope="all"
    )
    assert compiled._detect is not None and compiled._forward_image == compiled.model.backbone.forward_image
    # what compiling at start cost (the CLI prints it): every graph compiled or loaded from the cache
    assert eager.compile_cost is None and compiled.compile_cost is not None
    assert (
        compiled.compile_cost.seconds > 0
        and compiled.compile_cost.cached + compiled.compile_cost.compiled > 0
    )
    boxes, scores = eager.raw_outputs(sample_image, "fuse neutrals")
    c_boxes, c_scores = compiled.raw_outputs(sample_image, "fuse neutrals")
    # a second call: equal values in its own memory (with CUDA graphs, not the graph's output buffer)
    again, _ = compiled.raw_outputs(sample_image, "fuse neutrals")
    assert again.data_ptr() != c_boxes.data_ptr() and torch.equal(again, c_boxes)
    # inductor fuses and reorders float ops: measured 6e-8 (scores) on CPU float32
    tol = 0.01 if dtype == torch.bfloat16 else 1e-4
    assert (c_boxes - boxes).abs().max() < tol and (c_scores - scores).abs().max() < tol


def test_cli_device_and_dtype_flags(tmp_path, monkeypatch, capsys):
    import sam3ft.model.export as export

    loaded: list[torch.dtype] = []

    def fake_load(d, b, dtype):
        loaded.append(dtype)
        return FixedModel(), SimpleNamespace(image_size=28), {}

    monkeypatch.setattr(export, "load_export", fake_load)
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.jpg")
    model = fake_export(tmp_path / "model")
    args = ["predict", str(tmp_path / "ok.jpg"), "--out", str(tmp_path / "out"), "--model", str(model)]
    assert cli([*args, "--device", "cpu"]) == 0
    assert cli([*args, "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert loaded == [torch.float32, torch.bfloat16]  # auto is float32 on the CPU
    if not torch.cuda.is_available():
        assert cli([*args, "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
