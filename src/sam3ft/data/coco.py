"""Read and validate a Roboflow COCO export: one folder per split, each with `_annotations.coco.json`.

Everything is checked before any expensive work; each problem names the file, the record and the fix.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from warnings import catch_warnings, simplefilter

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sam3ft.errors import DatasetError
from sam3ft.io import sha256_file
from sam3ft.layout import ANNOTATIONS_FILE

log = logging.getLogger(__name__)

BOX_TOLERANCE_PX = 1.0  # boxes may overhang the image by this much (rounding in exports); clipped
MAX_PIXELS = 8192 * 8192
"""Largest image (width x height, ~67 MP) prepare accepts; bigger ones must be downscaled first."""
SHA256 = "_sha256"  # image record key: sha256 of the file's bytes (duplicates, leakage); never written
DOWNSCALE_FIX = (
    f"downscale it to at most {MAX_PIXELS:,} pixels (e.g. 8192x8192; SAM3 sees it at 1008 px anyway): "
    "re-export from Roboflow with a Resize preprocessing step, which scales the boxes too"
)


@dataclass
class Category:
    """One object class; `prompt` is the text SAM3 is asked to find."""

    id: int
    name: str
    prompt: str


@dataclass
class Split:
    """One validated split: COCO records plus where they came from."""

    name: str
    directory: Path
    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)


def _fail(path: Path, record: str, problem: str, fix: str) -> DatasetError:
    return DatasetError(f"{path}: {record}: {problem}", fix=fix)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise _fail(path, "file", "missing", f"export the split in COCO format so {path.name} exists")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(path, "file", f"not valid JSON ({exc})", "re-export the dataset") from exc
    if not isinstance(data, dict):
        raise _fail(path, "file", "top level is not a JSON object", "use a COCO export")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise _fail(
                path,
                f"'{key}'",
                "missing or not a list: this is not COCO",
                "use a COCO export (Roboflow: 'COCO JSON' format)",
            )
    return data


def _safe_image_path(directory: Path, file_name: Any, json_path: Path, image_id: Any) -> Path:
    record = f"image id={image_id}"
    if not isinstance(file_name, str) or not file_name:
        raise _fail(json_path, record, "file_name missing or not a string", "set file_name")
    if "\0" in file_name:
        raise _fail(json_path, record, "file_name contains a NUL byte", "rename the file")
    candidate = (directory / file_name).resolve()
    if Path(file_name).is_absolute() or not candidate.is_relative_to(directory.resolve()):
        raise _fail(
            json_path,
            record,
            f"file_name {file_name!r} points outside {directory}",
            "use a file name relative to the split folder",
        )
    return candidate


EXIF_ORIENTATION = 0x0112  # EXIF tag: how a viewer must rotate/flip the stored pixels
WIDE_MODES = {"I;16", "I;16B", "I;16L", "I", "F"}  # 16/32-bit: PIL's RGB conversion clips these


def image_fixes(img: Image.Image) -> list[str]:
    """What prepare must do to an image so sam3 sees what the annotator saw, as 8-bit pixels."""
    fixes = []
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    if orientation not in (1, None):
        fixes.append(f"exif-orientation-{orientation}")
    if img.mode in WIDE_MODES:
        fixes.append(f"{img.mode}-to-8-bit")
    return fixes


def normalized_image(img: Image.Image) -> Image.Image:
    """EXIF orientation applied to the pixels; 16/32-bit scaled to 8-bit (full range kept)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in WIDE_MODES:
        array = np.asarray(img, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        img = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    return img


def open_image(path: Path, where: Path, label: str) -> Image.Image:
    """`path` opened by PIL with only its header read; refused above MAX_PIXELS before any decoding.

    PIL itself raises DecompressionBombError (no file named) above twice its own limit and warns
    above it; both become a DatasetError naming the file and the fix.
    """
    try:
        with catch_warnings():
            simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _fail(where, label, f"image too large (PIL: {exc})", DOWNSCALE_FIX) from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise _fail(where, label, f"unreadable image ({exc})", "replace or drop it") from exc
    width, height = img.size
    if width * height > MAX_PIXELS:
        img.close()
        raise _fail(
            where,
            label,
            f"image is {width}x{height} = {width * height:,} pixels, above the limit of {MAX_PIXELS:,}",
            DOWNSCALE_FIX,
        )
    return img


def _check_image_file(path: Path, record: dict[str, Any], json_path: Path, warnings: list[str]) -> None:
    label = f"image id={record['id']} ({record['file_name']})"
    if not path.is_file():
        raise _fail(json_path, label, "image file not found", f"add {path.name} or drop the record")
    try:
        with open_image(path, json_path, label) as img:
            img.load()  # decodes fully: truncated files fail here, not mid-training
            fixes = image_fixes(img)
            size = normalized_image(img).size if fixes else img.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise _fail(json_path, label, f"unreadable image ({exc})", "replace or drop it") from exc
    record[SHA256] = sha256_file(path)  # duplicates and leakage (data/splits.py), never written
    declared = (record.get("width"), record.get("height"))
    if declared != size:
        hint = " (after applying its EXIF orientation)" if any("exif" in f for f in fixes) else ""
        raise _fail(
            json_path,
            label,
            f"JSON says {declared[0]}x{declared[1]}, file is {size[0]}x{size[1]}{hint}",
            "re-export so width/height match the files",
        )
    if fixes:
        record["_fixes"] = fixes
        warnings.append(f"{json_path}: {label}: rewritten by prepare: {', '.join(fixes)}")


def _check_box(ann: dict[str, Any], image: dict[str, Any], json_path: Path, warnings: list[str]) -> None:
    label = f"annotation id={ann['id']}"
    bbox = ann.get("bbox")
    if not (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    ):
        raise _fail(json_path, label, f"bbox {bbox!r} is not 4 finite numbers", "fix or drop it")
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        raise _fail(json_path, label, f"bbox {bbox} has non-positive width/height", "fix or drop it")
    width, height = image["width"], image["height"]
    tol = BOX_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise _fail(
            json_path,
            label,
            f"bbox {bbox} lies outside the {width}x{height} image",
            "fix the box or the image size",
        )
    if x < 0 or y < 0 or x + w > width or y + h > height:  # within tolerance: clip
        clipped = [max(0.0, x), max(0.0, y)]
        clipped += [min(width, x + w) - clipped[0], min(height, y + h) - clipped[1]]
        warnings.append(f"{json_path}: {label}: bbox {bbox} clipped to the image: {clipped}")
        ann["bbox"] = clipped


def _check_segmentation(ann: dict[str, Any], image: dict[str, Any], json_path: Path) -> None:
    """Polygons need >= 3 points (6 numbers) each; RLE must be sized like its image."""
    label = f"annotation id={ann['id']}"
    segm = ann.get("segmentation")
    if segm in (None, [], {}):
        return
    if isinstance(segm, list):
        for polygon in segm:
            if not (
                isinstance(polygon, list)
                and len(polygon) >= 6
                and len(polygon) % 2 == 0
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in polygon)
            ):
                raise _fail(
                    json_path,
                    label,
                    "polygon needs at least 3 (x, y) points of finite numbers",
                    "fix or remove the polygon (boxes still train without it)",
                )
        return
    if isinstance(segm, dict):
        size = segm.get("size")
        if size != [image["height"], image["width"]] or "counts" not in segm:
            raise _fail(
                json_path,
                label,
                f"RLE size {size} does not match the image "
                f"[{image['height']}, {image['width']}] (or counts missing)",
                "re-export the masks",
            )
        return
    raise _fail(json_path, label, f"segmentation is {type(segm).__name__}", "use polygons or RLE")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_records(images: list[dict[str, Any]], cats: list[dict[str, Any]], json_path: Path) -> None:
    """Field types the rest of the checks rely on: integer sizes, named categories."""
    for img in images:
        if not (_is_int(img.get("width")) and _is_int(img.get("height"))):
            raise _fail(
                json_path,
                f"image id={img['id']}",
                f"width/height {img.get('width')!r}/{img.get('height')!r} are not integers",
                "set them to the pixel size",
            )
    names = [c.get("name") for c in cats]
    for cat, cat_name in zip(cats, names, strict=True):
        if not isinstance(cat_name, str) or not cat_name.strip():
            raise _fail(json_path, f"category id={cat['id']}", "name missing or empty", "name it")
        if names.count(cat_name) > 1:
            raise _fail(
                json_path,
                f"category id={cat['id']}",
                f"name {cat_name!r} is used twice",
                "give each category its own name (or merge them)",
            )
        if not isinstance(cat.get("supercategory", ""), (str, type(None))):
            raise _fail(json_path, f"category id={cat['id']}", "supercategory is not text", "fix it")


def _unique_ids(records: list[dict[str, Any]], kind: str, json_path: Path) -> None:
    seen: set[Any] = set()
    for index, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise _fail(json_path, f"{kind} #{index}", f"is {type(rec).__name__}, not an object", "fix it")
        rid = rec.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            raise _fail(json_path, f"{kind} {rec!r:.80}", "id missing or not an integer", "set ids")
        if rid in seen:
            raise _fail(json_path, f"{kind} id={rid}", "duplicate id", f"make {kind} ids unique")
        seen.add(rid)


def load_split(directory: Path, name: str) -> Split:
    """Parse and validate one split folder; raise DatasetError on the first real problem."""
    json_path = directory / ANNOTATIONS_FILE
    if not directory.is_dir():
        raise _fail(directory, "split", "folder missing", f"export a '{name}' split")
    data = _read_json(json_path)
    images, anns, cats = data["images"], data["annotations"], data["categories"]
    _unique_ids(images, "image", json_path)
    _unique_ids(anns, "annotation", json_path)
    _unique_ids(cats, "category", json_path)
    _check_records(images, cats, json_path)
    by_id = {img["id"]: img for img in images}
    warnings: list[str] = []
    for img in images:
        path = _safe_image_path(directory, img.get("file_name"), json_path, img["id"])
        _check_image_file(path, img, json_path, warnings)
    cat_ids = {c["id"] for c in cats}
    for ann in anns:
        label = f"annotation id={ann['id']}"
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in by_id:
            raise _fail(
                json_path,
                label,
                f"image_id {ann.get('image_id')!r} has no image record",
                "drop the annotation or add the image",
            )
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in cat_ids:
            raise _fail(
                json_path,
                label,
                f"category_id {ann.get('category_id')!r} unknown (known: {sorted(cat_ids)})",
                "fix the id or add the category",
            )
        _check_box(ann, by_id[ann["image_id"]], json_path, warnings)
        _check_segmentation(ann, by_id[ann["image_id"]], json_path)
    listed = {(directory / img["file_name"]).resolve() for img in images}
    unlisted = sorted(
        p.name
        for p in directory.iterdir()
        if p.suffix.lower() in {".jpg", ".jpeg", ".png"} and p.resolve() not in listed
    )
    if unlisted:
        warnings.append(
            f"{directory}: {len(unlisted)} image file(s) not in {ANNOTATIONS_FILE}, "
            f"ignored: {unlisted[:3]}{'...' if len(unlisted) > 3 else ''}"
        )
    if not images:
        raise _fail(json_path, "images", "split is empty", f"add images to '{name}' or drop it")
    return Split(name, directory, images, anns, cats, warnings)


def resolve_categories(splits: list[Split], prompts: dict[str, str]) -> list[Category]:
    """The real classes of the export, renumbered 1..N; Roboflow's unused parent category dropped.

    Roboflow adds a parent category (supercategory "none") that no annotation uses and that the
    real classes name as their supercategory; it is not a class and must not become a prompt.
    """
    first = splits[0]
    for split in splits[1:]:
        if split.categories != first.categories:
            raise _fail(
                split.directory / ANNOTATIONS_FILE,
                "categories",
                f"differ from split '{first.name}'",
                "export all splits together",
            )
    children = {
        parent["name"]: [c["name"] for c in first.categories if c.get("supercategory") == parent["name"]]
        for parent in first.categories
    }
    parents = {c["id"]: c["name"] for c in first.categories if set(children[c["name"]]) - {c["name"]}}
    for split in splits:
        _refuse_parent_annotations(split, parents, children)
    kept = [c for c in first.categories if c["id"] not in parents]
    unknown = sorted(set(prompts) - {c["name"] for c in kept})
    if unknown:
        raise DatasetError(
            f"params prepare.prompts names unknown categories {unknown}",
            fix=f"use category names from the export: {[c['name'] for c in kept]}",
        )
    return [
        Category(i + 1, c["name"], prompts.get(c["name"], c["name"]))
        for i, c in enumerate(sorted(kept, key=lambda c: c["id"]))
    ]


def _refuse_parent_annotations(split: Split, parents: dict[int, str], children: dict[str, list[str]]) -> None:
    """An object labelled with a parent category would become one more class and text prompt."""
    on_parent = [a for a in split.annotations if a["category_id"] in parents]
    if on_parent:
        name = parents[on_parent[0]["category_id"]]
        ids = [a["id"] for a in on_parent]
        raise _fail(
            split.directory / ANNOTATIONS_FILE,
            f"annotation id={ids[0]}",
            f"labelled {name!r}, the parent category of {children[name]}, not a class "
            f"({len(ids)} annotation(s) in '{split.name}': ids {ids[:5]}{' ...' if len(ids) > 5 else ''})",
            f"relabel them with one of {[c for c in children[name] if c != name]} in Roboflow and "
            "re-export (or drop them)",
        )


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def load_image_folder(directory: Path, name: str, categories: list[dict[str, Any]]) -> Split:
    """A split from a plain folder of images with no annotations (negatives: the object is absent)."""
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise _fail(directory, "split", "holds no .jpg/.png images", "add negative images or remove it")
    images = []
    for index, path in enumerate(files):
        try:
            with open_image(path, path, "image") as img:
                img.load()
                width, height = img.size
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise _fail(path, "image", f"unreadable image ({exc})", "replace or remove it") from exc
        images.append(
            {"id": index, "file_name": path.name, "width": width, "height": height, SHA256: sha256_file(path)}
        )
    return Split(name, directory, images, [], categories)


def check_objects_per_image(coco: dict[str, Any], limit: int, source: Path) -> list[str]:
    """One warning per image and category with more objects than `limit` (trainer.max_ann_per_img).

    sam3 asks one query per image and category and skips a datapoint whose query has more objects
    than the limit (sam3/train/data/sam3_image_dataset.py:499 raises, and another image is loaded
    in its place): such an image never trains. `coco` is a split's COCO dict (export or prepared).
    """
    counts = Counter((a["image_id"], a["category_id"]) for a in coco["annotations"])
    names = {img["id"]: img["file_name"] for img in coco["images"]}
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    return [
        f"{source}: image id={image_id} ({names.get(image_id)}): {count} objects of "
        f"{categories.get(category_id)!r}, more than trainer.max_ann_per_img={limit}: sam3 skips this "
        f"image in training; fix: set trainer.max_ann_per_img: {count} (or more), or tile the image"
        for (image_id, category_id), count in sorted(counts.items())
        if count > limit
    ]
