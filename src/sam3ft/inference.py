"""`sam3ft predict` and `sam3ft serve`: detections, overlays and COCO pre-labels from an export.

Imports no torch: the CLI checks its arguments with this module before it loads the model. Images
go through prepare's own `normalized_image` (EXIF orientation applied), so predict scores the
pixels training saw and boxes come out in the upright frame a person sees.
"""

from __future__ import annotations

import glob
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from tqdm import tqdm

from sam3ft.data.coco import IMAGE_SUFFIXES, MAX_PIXELS, normalized_image
from sam3ft.errors import Sam3ftError
from sam3ft.io import write_json
from sam3ft.layout import ANNOTATIONS_FILE
from sam3ft.viz import PREDICTION, draw_boxes, draw_masks, segmentation_mask

if TYPE_CHECKING:
    from sam3ft.model.predict import Detection, Predictor

# larger images than prepare's MAX_PIXELS are refused per image, before their pixels are decoded


class ImageError(Sam3ftError):
    """One input image cannot be used (unreadable, not an image, too large); the others go on."""


class ImageTooLarge(ImageError):
    """An image with more than MAX_PIXELS pixels."""


@dataclass
class PredictReport:
    """What one predict run produced: per-image records and the inputs that failed (with why)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def collect_images(inputs: list[str]) -> list[Path]:
    """Files as given, folders' images (sorted, not recursive), globs expanded; order kept, no repeats.

    A path that does not exist is an error here, before any model is loaded."""
    found: list[Path] = []
    missing: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise Sam3ftError(f"{item}: the pattern matches no file", fix="check the glob")
            found += [m for m in matches if m.is_file()]
        elif path.is_file():
            found.append(path)
        else:
            missing.append(item)
    if missing:
        raise Sam3ftError(
            f"no such file or folder: {', '.join(missing)}",
            fix="check the path (image files, folders or globs)",
        )
    return list(dict.fromkeys(found))


def open_image(source: Path | IO[bytes], name: str) -> Image.Image:
    """An RGB image as prepare sees it (EXIF orientation applied, 16-bit scaled); `ImageError` naming
    `name` if it is not a readable image or has more than MAX_PIXELS pixels (checked before decoding)."""
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit and refuses above twice it: the size check below says why
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                width, height = opened.size
                if width * height > MAX_PIXELS:
                    raise too_large(name, width, height)
                return normalized_image(opened).convert("RGB")
    except Image.DecompressionBombError as exc:  # above 2x PIL's limit: refused at open, size unread
        raise too_large(name, None, None) from exc
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (or a damaged one)", fix="give a JPEG or PNG file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: cannot read image ({exc})", fix="give a JPEG or PNG file") from exc


def too_large(name: str, width: int | None, height: int | None) -> ImageTooLarge:
    size = f"{width}x{height} = {width * height / 1e6:.0f} MP" if width and height else "its size"
    return ImageTooLarge(
        f"{name}: {size} is above the {MAX_PIXELS / 1e6:.0f} MP limit",
        fix="downscale it (e.g. to 4000 px on the long side); the model sees it at its own resolution anyway",
    )


def detection_record(det: Detection, prompts: dict[int, str]) -> dict[str, Any]:
    """One detection as JSON; with a mask head, `segmentation` is its COCO RLE in image pixels."""
    record = {
        "box_xyxy": [round(v, 2) for v in det.box_xyxy],
        "score": round(det.score, 4),
        "category_id": det.category_id,
        "prompt": prompts[det.category_id],
    }
    if det.mask is not None:
        record["segmentation"] = det.mask
    return record


def overlay_name(path: Path, taken: set[str]) -> str:
    name, n = f"{path.stem}.jpg", 1
    while name in taken:
        n += 1
        name = f"{path.stem}_{n}.jpg"
    taken.add(name)
    return name


def overlay(image: Image.Image, records: list[dict[str, Any]]) -> Image.Image:
    """`image` with each detection record's mask tinted and its box and "prompt score" label drawn."""
    masks = [
        segmentation_mask(r["segmentation"], image.height, image.width)
        for r in records
        if "segmentation" in r
    ]
    return draw_boxes(
        draw_masks(image, masks, PREDICTION),
        [r["box_xyxy"] for r in records],
        [f"{r['prompt']} {r['score']:.2f}" for r in records],
        PREDICTION,
    )


def predict_images(
    predictor: Predictor,
    images: list[Path],
    prompts: dict[int, str],
    threshold: float,
    max_dets: int,
    out_dir: Path,
    model: dict[str, Any] | None = None,
) -> PredictReport:
    """Detect in each image; write `detections.json`, the COCO pre-labels (`_annotations.coco.json`)
    and one overlay per image under `out_dir`. An image that fails is reported and skipped."""
    report, taken = PredictReport(), set[str]()
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    for path in tqdm(images, desc="predict", unit="img", disable=len(images) < 2, file=sys.stderr):
        try:
            image = open_image(path, str(path))
        except ImageError as exc:  # go on with the rest
            print(f"error: {exc}", file=sys.stderr)
            report.failed.append(str(path))
            report.errors[str(path)] = exc.message
            continue
        dets = [detection_record(d, prompts) for d in predictor.predict(image, prompts, max_dets, threshold)]
        name = overlay_name(path, taken)
        overlay(image, dets).save(out_dir / "overlays" / name, quality=90)
        record = {"image": str(path), "width": image.width, "height": image.height}
        report.records.append(record | {"overlay": f"overlays/{name}", "detections": dets})
    write_json(
        out_dir / "detections.json",
        {
            "threshold": threshold,
            "prompts": prompts,
            "images": report.records,
            "failed": report.failed,
            "errors": report.errors,
            "model": model or {},
        },
    )
    write_json(out_dir / ANNOTATIONS_FILE, coco_prelabels(report.records, prompts, threshold, model or {}))
    return report


def coco_file_names(paths: list[str]) -> list[str]:
    """Names for COCO `file_name`: the base names, or (when two inputs share one) the paths relative
    to the inputs' common folder, so that each name points at one file."""
    names = [Path(p).name for p in paths]
    if len(set(names)) == len(names):
        return names
    root = os.path.commonpath([os.path.abspath(p) for p in paths])
    return [Path(os.path.relpath(os.path.abspath(p), root)).as_posix() for p in paths]


def coco_prelabels(
    records: list[dict[str, Any]], prompts: dict[int, str], threshold: float, model: dict[str, Any]
) -> dict[str, Any]:
    """The detections as a COCO dataset (Roboflow/CVAT/Label Studio import; prepare ingests it):
    xywh boxes, polygons traced from masks when the model has a mask head, `score` as an extra field."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    names = coco_file_names([r["image"] for r in records])
    for image_id, (record, name) in enumerate(zip(records, names, strict=True), start=1):
        images.append(
            {"id": image_id, "file_name": name, "width": record["width"], "height": record["height"]}
        )
        for det in record["detections"]:
            x0, y0, x1, y1 = det["box_xyxy"]
            ann = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": det["category_id"],
                "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                "area": round((x1 - x0) * (y1 - y0), 2),
                "iscrowd": 0,
                "segmentation": [],
                "score": det["score"],
            }
            if "segmentation" in det:
                ann["segmentation"] = mask_polygons(det["segmentation"])
                rle = {**det["segmentation"], "counts": det["segmentation"]["counts"].encode()}
                ann["area"] = float(mask_utils.area(rle))
            if ann["bbox"][2] > 0 and ann["bbox"][3] > 0:  # a zero-size box is no label
                annotations.append(ann)
    return {
        "info": {
            "description": "sam3ft predict pre-labels: check and fix before training",
            "threshold": threshold,
        }
        | {"model": model},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cid, "name": prompt, "supercategory": "none"} for cid, prompt in prompts.items()
        ],
    }


def mask_polygons(rle: dict[str, Any]) -> list[list[float]]:
    """A COCO RLE mask's outer contours as COCO polygons (x, y pixel pairs, >= 3 points each)."""
    import cv2  # only for models with a mask head

    height, width = rle["size"]
    mask = segmentation_mask(rle, height, width).astype("uint8")
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [[float(v) for v in c.reshape(-1)] for c in contours if len(c) >= 3]
