"""Drawing boxes on images for people to look at: dataset previews, evaluation and predict overlays."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

GROUND_TRUTH = (40, 220, 60)  # green
PREDICTION = (255, 40, 40)  # red


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str],
    color: tuple[int, int, int],
    width: int = 3,
) -> Image.Image:
    """A copy of `image` (RGB) with xyxy pixel boxes and a label above each."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    for box, label in zip(boxes, labels, strict=True):
        x0, y0, x1, y1 = box
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
        draw.text((x0 + 3, max(0.0, y0 - 12)), label, fill=color)
    return out


def xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    x, y, w, h = box
    return [x, y, x + w, y + h]
