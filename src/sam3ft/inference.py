"""`sam3ft predict`: detections and overlays for image files, folders or globs, from an export."""

from __future__ import annotations

import glob
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from sam3ft.data.coco import IMAGE_SUFFIXES
from sam3ft.errors import Sam3ftError
from sam3ft.io import write_json
from sam3ft.model.predict import Detection, Predictor
from sam3ft.viz import PREDICTION, draw_boxes, draw_masks, segmentation_mask


@dataclass
class PredictReport:
    """What one predict run produced: per-image records and the inputs that failed."""

    records: list[dict[str, Any]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def collect_images(inputs: list[str]) -> list[Path]:
    """Files as given, folders' images (sorted, not recursive), globs expanded; order kept, no repeats."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise Sam3ftError(f"{item}: the pattern matches no file", fix="check the glob")
            found += [m for m in matches if m.is_file()]
        else:
            found.append(path)  # missing files are reported per image, not up front
    return list(dict.fromkeys(found))


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


def predict_images(
    predictor: Predictor,
    images: list[Path],
    prompts: dict[int, str],
    threshold: float,
    max_dets: int,
    out_dir: Path,
) -> PredictReport:
    """Detect in each image; write `detections.json` and one overlay per image under `out_dir`."""
    report, taken = PredictReport(), set[str]()
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    for path in tqdm(images, desc="predict", unit="img", disable=len(images) < 2, file=sys.stderr):
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, SyntaxError) as exc:  # missing, unreadable, not an image: go on with the rest
            print(f"error: {path}: cannot read image ({exc})", file=sys.stderr)
            report.failed.append(str(path))
            continue
        kept = predictor.predict(image, prompts, max_dets, min_score=threshold)
        overlay = overlay_name(path, taken)
        masks = [segmentation_mask(d.mask, image.height, image.width) for d in kept if d.mask is not None]
        draw_boxes(
            draw_masks(image, masks, PREDICTION),
            [d.box_xyxy for d in kept],
            [f"{prompts[d.category_id]} {d.score:.2f}" for d in kept],
            PREDICTION,
        ).save(out_dir / "overlays" / overlay, quality=90)
        report.records.append(
            {
                "image": str(path),
                "width": image.width,
                "height": image.height,
                "overlay": f"overlays/{overlay}",
                "detections": [detection_record(d, prompts) for d in kept],
            }
        )
    write_json(
        out_dir / "detections.json",
        {"threshold": threshold, "prompts": prompts, "images": report.records, "failed": report.failed},
    )
    return report
