"""Text-prompted detection with a SAM3 image model, mirroring sam3's Sam3Processor on any device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from sam3.model import box_ops
from sam3.model.data_misc import FindStage
from torchvision.transforms import v2


@dataclass(frozen=True)
class Detection:
    """One detection in original-image pixels."""

    box_xyxy: tuple[float, float, float, float]
    score: float
    category_id: int
    mask: dict[str, Any] | None = None
    """COCO RLE `{"size": [h, w], "counts": str}` in original pixels; None without a mask head."""


def mask_to_rle(mask: torch.Tensor) -> dict[str, Any]:
    """(H, W) bool mask -> COCO compressed RLE, `counts` as text (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def mask_in_pixels(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(h, w) mask logits -> (height, width) bool, as sam3's PostProcessImage does (bilinear
    resize, then sigmoid > 0.5, i.e. logit > 0)."""
    resized = F.interpolate(logits[None, None].float(), (height, width), mode="bilinear", align_corners=False)
    return resized[0, 0] > 0


class Predictor:
    """Runs backbone once per image and the text tower once per prompt (cached)."""

    def __init__(self, model: Any, resolution: int, device: str = "cpu") -> None:
        # `model` is a sam3 Sam3Image (typed Any: sam3 ships no type information)
        self.model = model.to(device).eval()
        self.device = device
        self.transform = v2.Compose(
            [
                v2.Resize(size=(resolution, resolution)),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
            ]
        )
        self.find_stage = FindStage(
            img_ids=torch.tensor([0], device=device, dtype=torch.long),
            text_ids=torch.tensor([0], device=device, dtype=torch.long),
            input_boxes=None,
            input_boxes_mask=None,
            input_boxes_label=None,
            input_points=None,
            input_points_mask=None,
        )
        self._text_cache: dict[str, dict[str, torch.Tensor]] = {}

    def _text(self, prompt: str) -> dict[str, torch.Tensor]:
        if prompt not in self._text_cache:
            self._text_cache[prompt] = self.model.backbone.forward_text([prompt], device=self.device)
        return self._text_cache[prompt]

    @torch.inference_mode()
    def outputs(self, image: Image.Image, prompt: str) -> dict[str, torch.Tensor]:
        """`boxes` (Q, 4) cxcywh in [0, 1], `scores` (Q,) = sigmoid(logit) * sigmoid(presence), and,
        when the model has a mask head, `masks` (Q, h, w) logits at the model's mask resolution."""
        pixels = v2.functional.to_image(image.convert("RGB")).to(self.device)
        backbone_out = self.model.backbone.forward_image(self.transform(pixels).unsqueeze(0))
        backbone_out.update(self._text(prompt))
        out = self.model.forward_grounding(
            backbone_out=backbone_out,
            find_input=self.find_stage,
            geometric_prompt=self.model._get_dummy_prompt(),
            find_target=None,
        )
        presence = out["presence_logit_dec"].sigmoid().unsqueeze(1)  # (1, 1, 1)
        scores = (out["pred_logits"].sigmoid() * presence).squeeze(-1)[0]  # (Q,)
        found = {"boxes": out["pred_boxes"][0].float(), "scores": scores.float()}
        if out.get("pred_masks") is not None:
            found["masks"] = out["pred_masks"][0].float()  # (Q, h, w): image_size / 4 for SAM3
        return found

    def raw_outputs(self, image: Image.Image, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, 4) cxcywh boxes in [0, 1] and (Q,) scores (see `outputs`)."""
        found = self.outputs(image, prompt)
        return found["boxes"], found["scores"]

    def predict(self, image: Image.Image, prompts: dict[int, str], max_dets: int) -> list[Detection]:
        """Best `max_dets` detections per prompt, boxes (and masks, with a mask head) in original
        pixels, highest score first."""
        width, height = image.size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        detections = []
        for category_id, prompt in prompts.items():
            found = self.outputs(image, prompt)
            scores = found["scores"]
            order = torch.sort(scores, descending=True, stable=True).indices[:max_dets]
            xyxy = box_ops.box_cxcywh_to_xyxy(found["boxes"][order]).clamp(0, 1).cpu() * scale  # inside image
            masks: list[dict[str, Any] | None] = [None] * len(order)
            if "masks" in found:  # one at a time: 100 full-size masks of a 12 MP photo are 1.2 GB
                masks = [mask_to_rle(mask_in_pixels(m, height, width)) for m in found["masks"][order]]
            for box, score, mask in zip(xyxy.tolist(), scores[order].tolist(), masks, strict=True):
                detections.append(Detection(tuple(box), float(score), category_id, mask))
        return detections
