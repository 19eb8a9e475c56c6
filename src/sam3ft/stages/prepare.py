"""prepare: validate a Roboflow COCO export and write it in the layout sam3's dataset reads.

Output (paths.prepared): <split>/_annotations.coco.json + images, stats.json, preview.png.
Splits: train (required), valid and test (each carved from train by `prepare.split` when the export
lacks it; see sam3ft.data.splits), and `negatives/` (a plain folder of images that do not show the
object; it becomes a split with no annotations, for image-level false-positive rates).
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

from sam3ft import params as params_module
from sam3ft.data.coco import Category, Split, normalized_image, resolve_categories
from sam3ft.data.dvc_pin import check_pinned_remote
from sam3ft.data.preview import draw_preview
from sam3ft.data.roboflow import check_eval_splits, plan_dataset
from sam3ft.io import atomic_dir, sha256_tree, write_json
from sam3ft.layout import ANNOTATIONS_FILE

log = logging.getLogger(__name__)
SECTIONS = ["paths", "prepare", "evaluate"]  # evaluate: only `splits`, checked here before training


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


def run(p: params_module.Params) -> None:
    paths, prepare = p.paths, p.prepare
    pin_warnings = check_pinned_remote(Path(paths.data))
    root = Path(paths.data) / prepare.dataset
    plan = plan_dataset(root, prepare.split, prepare.seed, prepare.allow_leakage)
    categories = resolve_categories(plan.splits, prepare.prompts)
    check_eval_splits(p.evaluate.splits, plan.names, root)
    split_warnings = [w for split in plan.splits for w in split.warnings]
    for warning in pin_warnings + plan.carve_notes + plan.warnings + split_warnings:
        log.warning(warning)
    stats: dict[str, Any] = {
        "dataset": prepare.dataset,
        "source_sha256": sha256_tree(root),
        "prompts": {c.name: c.prompt for c in categories},
        "splits": {},
    }
    # only when present: an export with all its splits, and nothing to warn about, gives the
    # stats.json it gave before these keys existed (the sample's dvc.lock hash stays)
    if plan.carved:
        stats["carved"] = plan.carved
    if plan.warnings:
        stats["warnings"] = plan.warnings
    with atomic_dir(Path(paths.prepared)) as out:
        for split in plan.splits:
            write_split(split, categories, out, stats, prepare.preview_images)
        write_json(out / "stats.json", stats)
    log.info("prepared %s: %s", root, {k: v["images"] for k, v in stats["splits"].items()})


def write_split(
    split: Split, categories: list[Category], out: Path, stats: dict[str, Any], preview_images: int
) -> None:
    """One split's images and COCO file under `out`, its entry in `stats`, and train's preview."""
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
    if split.name == "train" and preview_images:
        draw_preview(out / "train", coco, preview_images, out / "preview.png")


def main() -> None:
    from sam3ft.stages import stage_main

    stage_main("prepare", SECTIONS, run)


if __name__ == "__main__":
    main()
