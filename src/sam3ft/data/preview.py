"""A contact sheet of a few images with their ground-truth boxes, for a person to look at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from sam3ft.viz import GROUND_TRUTH, draw_boxes, xywh_to_xyxy

TILE = 256  # px, side of each thumbnail


def draw_preview(split_dir: Path, coco: dict[str, Any], count: int, out: Path) -> None:
    """Draw the first `count` images of a prepared split with their boxes into one PNG."""
    images = coco["images"][:count]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    cols = max(1, min(len(images), 4))
    rows = max(1, (len(images) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * TILE, rows * TILE), "white")
    for index, record in enumerate(images):
        anns = [a for a in coco["annotations"] if a["image_id"] == record["id"]]
        with Image.open(split_dir / record["file_name"]) as img:
            sx, sy = TILE / img.width, TILE / img.height
            tile = img.convert("RGB").resize((TILE, TILE))
        boxes = [
            [v * s for v, s in zip(xywh_to_xyxy(a["bbox"]), (sx, sy, sx, sy), strict=True)] for a in anns
        ]
        tile = draw_boxes(tile, boxes, [names[a["category_id"]] for a in anns], GROUND_TRUTH)
        sheet.paste(tile, ((index % cols) * TILE, (index // cols) * TILE))
    sheet.save(out, format="PNG")
