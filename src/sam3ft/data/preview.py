"""A contact sheet of a few images with their ground-truth boxes, for a person to look at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

TILE = 256  # px, side of each thumbnail


def draw_preview(split_dir: Path, coco: dict[str, Any], count: int, out: Path) -> None:
    """Draw the first `count` images of a prepared split, boxes in red, into one PNG."""
    images = coco["images"][:count]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    cols = max(1, min(len(images), 4))
    rows = max(1, (len(images) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * TILE, rows * TILE), "white")
    for index, record in enumerate(images):
        with Image.open(split_dir / record["file_name"]) as img:
            tile = img.convert("RGB")
        scale_x, scale_y = TILE / tile.width, TILE / tile.height
        tile = tile.resize((TILE, TILE))
        draw = ImageDraw.Draw(tile)
        for ann in coco["annotations"]:
            if ann["image_id"] != record["id"]:
                continue
            x, y, w, h = ann["bbox"]
            box = [x * scale_x, y * scale_y, (x + w) * scale_x, (y + h) * scale_y]
            draw.rectangle(box, outline=(255, 0, 0), width=3)
            draw.text((box[0] + 3, box[1] + 2), names[ann["category_id"]], fill=(255, 0, 0))
        sheet.paste(tile, ((index % cols) * TILE, (index // cols) * TILE))
    sheet.save(out, format="PNG")
