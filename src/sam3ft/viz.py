"""Drawing boxes and masks on images for people to look at: dataset previews, evaluation and predict
overlays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

GROUND_TRUTH = (40, 220, 60)  # green
PREDICTION = (255, 40, 40)  # red


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str],
    color: tuple[int, int, int],
    width: int | None = None,
) -> Image.Image:
    """A copy of `image` (RGB) with xyxy pixel boxes and a label above each: white text on a band of
    the box colour, sized to the image (readable at 512 px and on a 12 MP photo alike)."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    short_side = min(out.size)
    width = width or max(2, round(short_side / 200))
    # Pillow's bundled font (no font file needed); scaled: ~16 px at 512 px, 2.5% of the short side
    font = ImageFont.load_default(size=max(14, round(short_side / 32)))
    for box, label in zip(boxes, labels, strict=True):
        x0, y0, x1, y1 = box
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        pad = max(2, (bottom - top) // 5)
        band_h = bottom + 2 * pad
        band_y = y0 - band_h if y0 >= band_h else y0  # above the box, inside it at the top edge
        draw.rectangle([x0, band_y, x0 + right - left + 2 * pad, band_y + band_h], fill=color)
        draw.text((x0 + pad - left, band_y + pad), label, fill=(255, 255, 255), font=font)
    return out


def xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    x, y, w, h = box
    return [x, y, x + w, y + h]


def segmentation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE or uncompressed RLE) as an (height, width) bool array."""
    if isinstance(segmentation, list):  # polygons: one RLE each, merged
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


def draw_masks(
    image: Image.Image, masks: Sequence[np.ndarray], color: tuple[int, int, int], alpha: float = 0.4
) -> Image.Image:
    """A copy of `image` (RGB) with each (H, W) bool mask tinted in `color` at opacity `alpha`, one
    over the other: a pixel under k masks is (1 - alpha)^k * itself + (1 - (1 - alpha)^k) * color,
    what tinting them one at a time gives, in one pass over the image however many masks there are."""
    if not masks:
        return image.convert("RGB")
    out = np.asarray(image.convert("RGB")).astype(np.float32)
    layers = np.zeros(out.shape[:2], dtype=np.uint16)
    for mask in masks:
        layers += mask
    keep = (np.float32(1 - alpha) ** layers.astype(np.float32))[..., None]  # (H, W, 1): the image's share
    out = keep * out + (1 - keep) * np.asarray(color, dtype=np.float32)
    return Image.fromarray(out.round().astype(np.uint8))
