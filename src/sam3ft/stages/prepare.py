"""prepare: validate a Roboflow COCO export and write it in the layout sam3's dataset reads.

Output (paths.prepared): <split>/_annotations.coco.json + images, stats.json, preview.png.
Splits: train and valid (required), test, and `negatives/` (a plain folder of images that do not
show the object; it becomes a split with no annotations, for image-level false-positive rates).
Category ids become 1..N and each category's `name` becomes its text prompt (sam3's
COCO_FROM_JSON uses the name as the query text); the export's own name stays in `roboflow_name`.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from sam3ft.data.coco import (
    Category,
    Split,
    load_image_folder,
    load_split,
    normalized_image,
    resolve_categories,
)
from sam3ft.data.preview import draw_preview
from sam3ft.errors import DatasetError
from sam3ft.io import atomic_dir, sha256_tree, write_json
from sam3ft.layout import ANNOTATIONS_FILE

log = logging.getLogger(__name__)
SECTIONS = ["paths", "prepare"]
REQUIRED_SPLITS = ("train", "valid")
OPTIONAL_SPLITS = ("test",)
NEGATIVES = "negatives"  # optional folder of images without the object (no JSON needed)


def load_dataset(root: Path) -> list[Split]:
    """Every split of the export, validated; train and valid must exist."""
    if not root.is_dir():
        raise DatasetError(
            f"{root}: dataset folder not found", fix="set prepare.dataset to a folder under paths.data"
        )
    splits = [load_split(root / name, name) for name in REQUIRED_SPLITS]
    splits += [load_split(root / name, name) for name in OPTIONAL_SPLITS if (root / name).is_dir()]
    if (root / NEGATIVES).is_dir():
        splits.append(load_image_folder(root / NEGATIVES, NEGATIVES, splits[0].categories))
    return splits


def convert_split(split: Split, categories: list[Category]) -> dict[str, Any]:
    """The split as sam3-ready COCO: renumbered categories, required fields filled."""
    old_to_new = {}
    for cat in categories:
        (old,) = [c["id"] for c in split.categories if c["name"] == cat.name]
        old_to_new[old] = cat.id
    images = [{k: img[k] for k in ("id", "file_name", "width", "height")} for img in split.images]
    annotations = []
    for ann in split.annotations:
        x, y, w, h = ann["bbox"]
        out = {
            "id": ann["id"],
            "image_id": ann["image_id"],
            "category_id": old_to_new[ann["category_id"]],
            "bbox": [x, y, w, h],
            "area": ann.get("area") or w * h,
            "iscrowd": int(ann.get("iscrowd", 0)),
        }
        if ann.get("segmentation"):
            out["segmentation"] = ann["segmentation"]
        annotations.append(out)
    cats = [
        {"id": c.id, "name": c.prompt, "roboflow_name": c.name, "supercategory": "none"} for c in categories
    ]
    return {"images": images, "annotations": annotations, "categories": cats}


def copy_image(src: Path, dst: Path, fixes: list[str]) -> None:
    """Copy as is, or rewrite with EXIF orientation applied and wide pixels scaled to 8-bit."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not fixes:
        shutil.copyfile(src, dst)
        return
    with Image.open(src) as img:
        fixed = normalized_image(img)
        fixed.save(dst, format=img.format or "PNG", quality=95)


def split_stats(coco: dict[str, Any]) -> dict[str, Any]:
    per_class = Counter(a["category_id"] for a in coco["annotations"])
    with_ann = {a["image_id"] for a in coco["annotations"]}
    return {
        "images": len(coco["images"]),
        "annotations": len(coco["annotations"]),
        "negative_images": sum(1 for img in coco["images"] if img["id"] not in with_ann),
        "annotations_per_class": {c["roboflow_name"]: per_class.get(c["id"], 0) for c in coco["categories"]},
    }


def run(p: dict[str, Any]) -> None:
    paths, prepare = p["paths"], p["prepare"]
    root = Path(paths.data) / prepare.dataset
    splits = load_dataset(root)
    categories = resolve_categories(splits, prepare.prompts)
    for split in splits:
        for warning in split.warnings:
            log.warning(warning)
    stats: dict[str, Any] = {
        "dataset": prepare.dataset,
        "source_sha256": sha256_tree(root),
        "prompts": {c.name: c.prompt for c in categories},
        "splits": {},
    }
    with atomic_dir(Path(paths.prepared)) as out:
        for split in splits:
            coco = convert_split(split, categories)
            (out / split.name).mkdir()
            for record, img in zip(split.images, coco["images"], strict=True):
                copy_image(
                    split.directory / img["file_name"],
                    out / split.name / img["file_name"],
                    record.get("_fixes", []),
                )
            write_json(out / split.name / ANNOTATIONS_FILE, coco)
            stats["splits"][split.name] = split_stats(coco)
            stats["splits"][split.name]["warnings"] = split.warnings
            if split.name == "train" and prepare.preview_images:
                draw_preview(out / "train", coco, prepare.preview_images, out / "preview.png")
        write_json(out / "stats.json", stats)
    log.info("prepared %s: %s", root, {k: v["images"] for k, v in stats["splits"].items()})


def main() -> None:
    from sam3ft.stages import stage_main

    stage_main("prepare", SECTIONS, run)


if __name__ == "__main__":
    main()
