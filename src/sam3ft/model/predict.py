"""Text-prompted detection with a SAM3 image model, mirroring sam3's Sam3Processor on any device.

Same boxes and scores as Sam3Processor (set_image + set_text_prompt per prompt), with less work per image:
the image backbone runs once for all prompts, the prompts go through the grounding head as one batch, the
mask head runs only when the model has one, results stay on the device until one copy per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from sam3.model import box_ops
from sam3.model.data_misc import FindStage
from torchvision.transforms import v2

from sam3ft.errors import Sam3ftError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# torch.compile modes offered for the image backbone; bench/gpu_inference.py measures them
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = {"backbone": "image backbone", "all": "image backbone and grounding head"}

Features = dict[str, Any]  # sam3 backbone output: tensors and lists of tensors
Grounding = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # boxes, scores, mask logits


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


def resolve_device(name: str) -> str:
    """`auto`: CUDA when available, else CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise Sam3ftError(f"device {name!r} asked for, but CUDA is not available", fix="use --device cpu")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto`: bfloat16 on CUDA (what the export stores), float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise Sam3ftError(f"unknown dtype {name!r}", fix=f"use auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def cast_backbone(model: Any, dtype: torch.dtype) -> Any:
    """Floating weights of the image and text backbones (~95% of SAM3's) in `dtype`, in place.

    Only floating tensors: `Module.to(dtype)` would also cast the ViT's complex RoPE table
    (sam3/model/vitdet.py:457 `freqs_cis`) and drop its imaginary part. The grounding head stays
    float32 and runs under autocast: it mixes in float32 constants (e.g. sam3/model/geometry_encoders.py:296,
    sam3/model/position_encoding.py:58) that pure bf16 weights reject.
    """
    backbone = model.backbone
    for tensor in chain(backbone.parameters(), backbone.buffers()):
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)
    return model


class Predictor:
    """Backbone once per image, text tower once per prompt (cached), all prompts in one grounding batch.

    `masks`: run the mask head when the model has one (RLE masks in each Detection); False: boxes only.
    `dtype=torch.bfloat16`: backbone weights in bf16 (no autocast there), grounding head under bf16
    autocast. `compile_mode`: torch.compile with that mode the image backbone (`compile_scope`
    "backbone") or the backbone and the grounding head as one function ("all"), compiled at
    construction so a failure surfaces there, never as a silent fallback.
    """

    def __init__(
        self,
        model: Any,
        resolution: int,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        compile_mode: str | None = None,
        compile_scope: str = "backbone",
        masks: bool = True,
    ) -> None:
        # `model` is a sam3 Sam3Image (typed Any: sam3 ships no type information)
        self.model = cast_backbone(model, dtype).to(device).eval()
        self.device, self.dtype, self.resolution = device, dtype, resolution
        # masks only from a model with a mask head; masks=False skips it (boxes do not depend on it)
        self.with_masks = masks and getattr(model, "segmentation_head", None) is not None
        self.transform = v2.Compose(
            [
                v2.Resize(size=(resolution, resolution)),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
            ]
        )
        self._query_cache: dict[int, tuple[FindStage, Any]] = {}
        self._text_cache: dict[str, Features] = {}
        self._stacked_text: dict[tuple[str, ...], Features] = {}
        self._forward_image = model.backbone.forward_image
        self._detect: Any = None  # compile scope `all`: backbone + grounding head, one compiled call
        self._graphs = False  # CUDA graphs replay into the same output buffers on every call
        if compile_mode is not None:
            self._compile(compile_mode, compile_scope)

    def _compile(self, mode: str, scope: str) -> None:
        """torch.compile the image backbone (and with scope `all` the grounding head too), compiled here
        on a blank image and a dummy prompt: a failure stops, nothing runs uncompiled behind it."""
        if mode not in COMPILE_MODES:
            raise Sam3ftError(f"unknown compile mode {mode!r}", fix=f"use one of {COMPILE_MODES}")
        if scope not in COMPILE_SCOPES:
            raise Sam3ftError(f"unknown compile scope {scope!r}", fix=f"use one of {list(COMPILE_SCOPES)}")
        torch_mode = None if mode == "default" else mode
        blank = Image.new("RGB", (self.resolution, self.resolution))
        # one eager pass first: sam3 fills caches on its first forward (the decoder's coordinates,
        # sam3/model/decoder.py:336); made inside a CUDA graph they would live in its output buffers,
        # which the next replay overwrites
        self.ground(self.features(blank), ["object"])
        if scope == "all":
            # sam3/model/geometry_encoders.py:659 pins a host tensor on every call, which dynamo
            # cannot trace: that method alone stays eager (on this model instance only)
            geometry = getattr(self.model, "geometry_encoder", None)
            if geometry is not None:
                geometry._encode_boxes = torch.compiler.disable(geometry._encode_boxes)
            # one function, not two: CUDA graph trees start a new generation at every top-level
            # compiled call, and the head's would overwrite the backbone's outputs while it reads them
            self._detect = torch.compile(self._image_and_heads, mode=torch_mode)
            self._graphs = mode == "reduce-overhead"
        else:
            self._forward_image = torch.compile(self._forward_image, mode=torch_mode)
        try:
            self.detect(blank, ["object"])  # one prompt: more prompts compile again
        except Exception as exc:  # any compiler/backend failure: stop, do not run uncompiled
            raise Sam3ftError(
                f"torch.compile(mode={mode!r}) of the {COMPILE_SCOPES[scope]} failed: "
                f"{type(exc).__name__}: {exc}",
                fix="run without --compile",
            ) from exc

    def _queries(self, prompts: int) -> tuple[FindStage, Any]:
        """One image (id 0) queried with `prompts` texts (ids 0..prompts-1), no geometric prompt."""
        if prompts not in self._query_cache:
            find = FindStage(
                img_ids=torch.zeros(prompts, device=self.device, dtype=torch.long),
                text_ids=torch.arange(prompts, device=self.device, dtype=torch.long),
                input_boxes=None,
                input_boxes_mask=None,
                input_boxes_label=None,
                input_points=None,
                input_points_mask=None,
            )
            # empty box prompt, reused as Sam3Processor reuses its state's (sam3_image_processor.py)
            self._query_cache[prompts] = (find, self.model._get_dummy_prompt(num_prompts=prompts))
        return self._query_cache[prompts]

    def _text(self, prompts: list[str]) -> Features:
        """Text features of each prompt (encoded alone, cached), stacked along the prompt axis (cached)."""
        key = tuple(prompts)
        if key in self._stacked_text:
            return self._stacked_text[key]
        for prompt in prompts:
            if prompt not in self._text_cache:
                self._text_cache[prompt] = self.model.backbone.forward_text([prompt], device=self.device)
        parts = [self._text_cache[p] for p in prompts]
        self._stacked_text[key] = {
            "language_features": torch.cat([t["language_features"] for t in parts], dim=1),  # (L, P, C)
            "language_mask": torch.cat([t["language_mask"] for t in parts], dim=0),  # (P, L)
            "language_embeds": torch.cat([t["language_embeds"] for t in parts], dim=1),  # (L, P, C)
        }
        return self._stacked_text[key]

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        """(1, 3, R, R) model input: resized to the model's resolution, normalised, in `dtype`."""
        pixels = v2.functional.to_image(image.convert("RGB")).to(self.device)
        return self.transform(pixels).unsqueeze(0).to(self.dtype)

    @torch.inference_mode()
    def features(self, image: Image.Image) -> Features:
        """Image backbone output for one image (batch 1)."""
        return self._forward_image(self._pixels(image))

    @torch.inference_mode()
    def ground(self, features: Features, prompts: list[str]) -> Grounding:
        """(P, Q, 4) cxcywh boxes in [0, 1], (P, Q) scores = sigmoid(logit) * sigmoid(presence), and
        with a mask head (P, Q, h, w) mask logits at the model's mask resolution (else None)."""
        backbone_out = {**features, **self._text(prompts)}  # a copy: sam3 pops keys from it
        return self._grounding(backbone_out, *self._queries(len(prompts)))

    def _image_and_heads(
        self, pixels: torch.Tensor, text: Features, find: FindStage, geometric: Any
    ) -> Grounding:
        """`ground(features(image), prompts)` as one function, for torch.compile with scope `all`."""
        return self._grounding({**self._forward_image(pixels), **text}, find, geometric)

    @torch.inference_mode()
    def detect(self, image: Image.Image, prompts: list[str]) -> Grounding:
        """`ground(features(image), prompts)`: through the one compiled function when there is one."""
        if self._detect is None:
            return self.ground(self.features(image), prompts)
        if self._graphs:
            torch.compiler.cudagraph_mark_step_begin()
        found = self._detect(self._pixels(image), self._text(prompts), *self._queries(len(prompts)))
        if not self._graphs:
            return found
        # the next call replays into the same buffers: hand out copies
        boxes, scores, masks = found
        return boxes.clone(), scores.clone(), None if masks is None else masks.clone()

    def _grounding(self, backbone_out: Features, find: FindStage, geometric: Any) -> Grounding:
        """sam3's `Sam3Image.forward_grounding` (sam3/model/sam3_image.py:442) step by step, the mask
        head only when the model has one (boxes and scores do not depend on it), no training matcher."""
        model = self.model
        autocast = torch.autocast(
            torch.device(self.device).type, dtype=self.dtype, enabled=self.dtype != torch.float32
        )
        with autocast:
            prompt, mask, backbone_out = model._encode_prompt(backbone_out, find, geometric)
            backbone_out, encoder_out, _ = model._run_encoder(backbone_out, find, prompt, mask)
            out, hs = model._run_decoder(
                memory=encoder_out["encoder_hidden_states"],
                pos_embed=encoder_out["pos_embed"],
                src_mask=encoder_out["padding_mask"],
                out={},
                prompt=prompt,
                prompt_mask=mask,
                encoder_out=encoder_out,
            )
            if self.with_masks:
                model._run_segmentation_heads(
                    out=out,
                    backbone_out=backbone_out,
                    img_ids=find.img_ids,
                    vis_feat_sizes=encoder_out["vis_feat_sizes"],
                    encoder_hidden_states=encoder_out["encoder_hidden_states"],
                    prompt=prompt,
                    prompt_mask=mask,
                    hs=hs,
                )
        presence = out["presence_logit_dec"].float().sigmoid().unsqueeze(1)  # (P, 1, 1)
        scores = (out["pred_logits"].float().sigmoid() * presence).squeeze(-1)  # (P, Q)
        masks = out["pred_masks"].float() if out.get("pred_masks") is not None else None
        return out["pred_boxes"].float(), scores, masks

    def outputs(self, image: Image.Image, prompt: str) -> dict[str, torch.Tensor]:
        """One prompt: `boxes` (Q, 4) cxcywh in [0, 1], `scores` (Q,), and with a mask head `masks`
        (Q, h, w) logits."""
        boxes, scores, masks = self.detect(image, [prompt])
        found = {"boxes": boxes[0], "scores": scores[0]}
        if masks is not None:
            found["masks"] = masks[0]
        return found

    def raw_outputs(self, image: Image.Image, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, 4) cxcywh boxes in [0, 1] and (Q,) scores for one prompt."""
        found = self.outputs(image, prompt)
        return found["boxes"], found["scores"]

    @torch.inference_mode()
    def predict(
        self, image: Image.Image, prompts: dict[int, str], max_dets: int, min_score: float = 0.0
    ) -> list[Detection]:
        """Best `max_dets` detections per prompt scoring at least `min_score`, boxes (and masks, with a
        mask head: encoded for those detections only) in original pixels, highest score first."""
        width, height = image.size
        boxes, scores, masks = self.detect(image, list(prompts.values()))
        scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
        scores, order = scores[:, :max_dets], order[:, :max_dets]  # (P, K)
        picked = boxes.gather(1, order.unsqueeze(-1).expand(-1, -1, 4))  # (P, K, 4) cxcywh
        xyxy = box_ops.box_cxcywh_to_xyxy(picked).clamp(0, 1)  # (P, K, 4) in [0, 1]: inside the image
        rows = torch.cat([xyxy, scores.unsqueeze(-1)], dim=-1).cpu()  # the one wait for the device
        # scaled on the host: a tensor made on the device would be a host-to-device copy, which syncs
        rows[..., :4] *= torch.tensor([width, height, width, height], dtype=torch.float32)  # pixels
        kept = [int((per_prompt[:, 4] >= min_score).sum()) for per_prompt in rows]  # sorted: a prefix
        rles: list[list[dict[str, Any] | None]] = [[None] * k for k in kept]
        if masks is not None:  # one at a time: 100 full-size masks of a 12 MP photo are 1.2 GB
            rles = [
                [mask_to_rle(mask_in_pixels(m, height, width)) for m in masks[i][o[:k]]]
                for i, (o, k) in enumerate(zip(order, kept, strict=True))
            ]
        return [
            Detection((row[0], row[1], row[2], row[3]), row[4], category_id, rle)
            for category_id, per_prompt, per_rle, k in zip(prompts, rows.tolist(), rles, kept, strict=True)
            for row, rle in zip(per_prompt[:k], per_rle, strict=True)
        ]
