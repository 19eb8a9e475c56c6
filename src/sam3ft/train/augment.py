"""Training augmentation from params.yaml `augment`: random crop, rotation, horizontal flip and colour
jitter of each training image together with its boxes (and masks), as one transform in sam3's
train-transform chain (configs/train/sam3ft.yaml), where images are still PIL and boxes absolute
xyxy pixels.

Every draw comes from python's `random`, which the data loader reseeds from (seed, epoch[, image])
(train/data.py `reseed`), so what an image gets depends neither on a resume nor on the number of
workers (1 or more; without workers the epoch's images draw in turn from the epoch's seed). A knob
at its "off" value draws nothing: with everything off the transform is the identity and the rest
of the chain draws what it drew without it.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from sam3.train.transforms.basic_for_api import crop, hflip
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

FILL = [128, 128, 128]  # rotation's empty corners: mid grey, 0 after the chain's normalisation


class Augment:
    """sam3 datapoint transform (`__call__(datapoint, **kwargs)`, as sam3.train.transforms): crop
    (`crop_min` < 1), rotate (`rotate` > 0 degrees), flip (`hflip` probability), then brightness,
    contrast and saturation jitter (factor in [1 - x, 1 + x] each)."""

    def __init__(
        self,
        hflip: float,
        brightness: float,
        contrast: float,
        saturation: float,
        crop_min: float,
        rotate: float,
    ) -> None:
        self.hflip, self.crop_min, self.rotate = hflip, crop_min, rotate
        self.jitter = {"brightness": brightness, "contrast": contrast, "saturation": saturation}

    def __call__(self, datapoint: Any, **kwargs: Any) -> Any:
        for index in range(len(datapoint.images)):
            if self.crop_min < 1:
                crop(datapoint, index, crop_region(datapoint.images[index], self.crop_min, random.random))
            if self.rotate > 0:
                rotate(datapoint, index, random.uniform(-self.rotate, self.rotate))
            if self.hflip > 0 and random.random() < self.hflip:
                hflip(datapoint, index)
            image = datapoint.images[index]
            for name, amount in self.jitter.items():
                if amount > 0:
                    image.data = ADJUST[name](image.data, random.uniform(1 - amount, 1 + amount))
        return datapoint


ADJUST = {
    "brightness": F.adjust_brightness,
    "contrast": F.adjust_contrast,
    "saturation": F.adjust_saturation,
}


def crop_region(image: Any, crop_min: float, draw: Any) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop whose sides are drawn from [crop_min, 1] of the image's
    and which holds every object's box whole (a smaller draw grows to fit them)."""
    width, height = image.data.size  # PIL
    boxes = [obj.bbox.reshape(4).tolist() for obj in image.objects]
    if boxes:
        x0, y0 = math.floor(min(b[0] for b in boxes)), math.floor(min(b[1] for b in boxes))
        x1, y1 = math.ceil(max(b[2] for b in boxes)), math.ceil(max(b[3] for b in boxes))
    else:
        x0, y0, x1, y1 = width, height, 0, 0  # no constraint
    w = min(width, max(x1 - x0, round(width * (crop_min + (1 - crop_min) * draw()))))
    h = min(height, max(y1 - y0, round(height * (crop_min + (1 - crop_min) * draw()))))
    left = _offset(max(0, x1 - w), min(x0, width - w), draw())
    top = _offset(max(0, y1 - h), min(y0, height - h), draw())
    return top, left, h, w


def _offset(low: int, high: int, u: float) -> int:
    """An integer in [low, high] from a uniform draw `u` in [0, 1)."""
    return low + min(high - low, int(u * (high - low + 1))) if high > low else max(0, high)


def rotate(datapoint: Any, index: int, degrees: float) -> None:
    """Rotate image `index` about its centre by `degrees` (counter-clockwise), same canvas; each
    box becomes the enclosing box of its rotated corners (of its rotated mask, when it has one)."""
    image = datapoint.images[index]
    width, height = image.data.size
    canvas = (height, width)
    image.data = F.rotate(image.data, degrees, interpolation=InterpolationMode.BILINEAR, fill=FILL)
    for obj in image.objects:
        if obj.segment is not None:
            mask = F.rotate(tv_tensors.Mask(obj.segment), degrees, interpolation=InterpolationMode.NEAREST)
            obj.segment = mask.as_subclass(torch.Tensor)
        obj.bbox = _rotate_boxes(obj.bbox, degrees, canvas)
        if obj.segment is not None and obj.segment.any():
            ys, xs = torch.nonzero(obj.segment.reshape(canvas), as_tuple=True)
            obj.bbox = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        obj.area = float((obj.bbox[0, 2] - obj.bbox[0, 0]) * (obj.bbox[0, 3] - obj.bbox[0, 1]))
    for query in datapoint.find_queries:
        if query.image_id == index and query.input_bbox is not None:
            query.input_bbox = _rotate_boxes(query.input_bbox, degrees, canvas)


def _rotate_boxes(boxes: torch.Tensor, degrees: float, canvas: tuple[int, int]) -> torch.Tensor:
    """(N, 4) xyxy pixel boxes rotated with the image: enclosing boxes, clamped to the canvas."""
    boxed = tv_tensors.BoundingBoxes(boxes.reshape(-1, 4).float(), format="XYXY", canvas_size=canvas)
    return F.rotate(boxed, degrees).as_subclass(torch.Tensor).reshape(-1, 4)
