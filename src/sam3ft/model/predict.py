"""Text-prompted detection with a SAM3 image model, mirroring sam3's Sam3Processor on any device.

Same boxes and scores as Sam3Processor (set_image + set_text_prompt per prompt), with less work per image:
the image backbone runs once for all prompts, the prompts go through the grounding head as one batch, the
mask head runs only when the model has one, results stay on the device until one copy per batch; masks are
upsampled and run-length encoded on the device for the detections kept only. Several images (same
prompts) go through the model as one batch with `predict_batch`.
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

from sam3ft.compile_cache import CompileCost, CompileLog, use_persistent_cache
from sam3ft.errors import Sam3ftError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# torch.compile modes offered for the image backbone; bench/gpu_inference.py measures them
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = {"backbone": "image backbone", "all": "image backbone and grounding head"}
RLE_CHUNK_PIXELS = 2**26  # full-size masks resized at once by masks_to_rles (float32: 256 MB)

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


def masks_to_rles(logits: torch.Tensor, height: int, width: int) -> list[dict[str, Any]]:
    """(K, h, w) mask logits -> K COCO RLEs (`counts` as text, JSON-ready) in (height, width) pixels,
    as sam3's PostProcessImage makes masks (bilinear resize, then sigmoid > 0.5, i.e. logit > 0):
    resized, thresholded and cut into runs on the logits' device, a chunk of masks at a time; only
    the run boundaries come to the host, in one copy per chunk."""
    pixels = height * width
    chunk = max(1, RLE_CHUNK_PIXELS // pixels)  # full-size float32 masks of a 12 MP photo are 48 MB each
    rles: list[dict[str, Any]] = []
    for start in range(0, len(logits), chunk):
        part = logits[start : start + chunk, None].float()
        masks = F.interpolate(part, (height, width), mode="bilinear", align_corners=False)[:, 0] > 0
        flat = masks.transpose(1, 2).reshape(len(masks), pixels)  # column-major, as COCO RLE runs
        # (M, 2): mask, index before a change; nonzero waits for the device (its size is data)
        changes = (flat[:, 1:] != flat[:, :-1]).nonzero()
        first = flat[:, 0].long()  # 1: the mask starts with a foreground run
        host = torch.cat([first, changes.flatten()]).cpu().numpy()  # one copy to the host
        starts, edges = host[: len(masks)], host[len(masks) :].reshape(-1, 2)
        bounds = np.searchsorted(edges[:, 0], np.arange(len(masks) + 1))  # rows of each mask
        for i in range(len(masks)):
            cuts = np.concatenate([[0], edges[bounds[i] : bounds[i + 1], 1] + 1, [pixels]])
            counts = np.diff(cuts).tolist()  # run lengths, background first
            rle = mask_utils.frPyObjects(
                {"size": [height, width], "counts": [0] * int(starts[i]) + counts}, height, width
            )
            rles.append({"size": [height, width], "counts": rle["counts"].decode()})
    return rles


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
    construction so a failure surfaces there, never as a silent fallback. `compile_batches`: the
    image batch sizes compiled then (static shapes, one graph each); compiled, a batch of another
    size is padded up to the next of them (and split above the largest).
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
        compile_batches: tuple[int, ...] = (1,),
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
        self._query_cache: dict[tuple[int, int], tuple[FindStage, Any]] = {}
        self._text_cache: dict[str, Features] = {}
        self._stacked_text: dict[tuple[str, ...], Features] = {}
        self._forward_image = model.backbone.forward_image
        self._detect: Any = None  # compile scope `all`: backbone + grounding head, one compiled call
        self._graphs = False  # CUDA graphs replay into the same output buffers on every call
        self.batch_sizes: tuple[int, ...] = ()  # compiled image batch sizes; () eager: any size as is
        self.compile_cost: CompileCost | None = None  # what compiling at start cost (None: nothing)
        if compile_mode is not None:
            if not compile_batches or min(compile_batches) < 1:
                raise Sam3ftError(f"compile batch sizes {compile_batches}", fix="give sizes of at least 1")
            self.batch_sizes = tuple(sorted(set(compile_batches)))
            self._compile(compile_mode, compile_scope)

    def _compile(self, mode: str, scope: str) -> None:
        """torch.compile the image backbone (and with scope `all` the grounding head too), compiled here
        on blank images and a dummy prompt: a failure stops, nothing runs uncompiled behind it."""
        if mode not in COMPILE_MODES:
            raise Sam3ftError(f"unknown compile mode {mode!r}", fix=f"use one of {COMPILE_MODES}")
        if scope not in COMPILE_SCOPES:
            raise Sam3ftError(f"unknown compile scope {scope!r}", fix=f"use one of {list(COMPILE_SCOPES)}")
        torch_mode = None if mode == "default" else mode
        use_persistent_cache()
        compiling = CompileLog()
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
            # compiled call, and the head's would overwrite the backbone's outputs while it reads them.
            # Static shapes: each batch size gets its own graph instead of one with symbolic sizes
            self._detect = torch.compile(self._image_and_heads, mode=torch_mode, dynamic=False)
            self._graphs = mode == "reduce-overhead"
        else:
            self._forward_image = torch.compile(self._forward_image, mode=torch_mode, dynamic=False)
        try:
            for size in self.batch_sizes:  # one prompt: more prompts compile again
                self.detect_batch([blank] * size, ["object"])
        except Exception as exc:  # any compiler/backend failure: stop, do not run uncompiled
            raise Sam3ftError(
                f"torch.compile(mode={mode!r}) of the {COMPILE_SCOPES[scope]} failed: "
                f"{type(exc).__name__}: {exc}",
                fix="run without --compile",
            ) from exc
        self.compile_cost = compiling.since_last()

    def _queries(self, prompts: int, images: int = 1) -> tuple[FindStage, Any]:
        """`images` images (ids 0..images-1), each queried with `prompts` texts (ids 0..prompts-1):
        query i * prompts + j is image i with text j; no geometric prompt."""
        key = (prompts, images)
        if key not in self._query_cache:
            queries = prompts * images
            find = FindStage(
                img_ids=torch.arange(images, device=self.device).repeat_interleave(prompts),
                text_ids=torch.arange(prompts, device=self.device).repeat(images),
                input_boxes=None,
                input_boxes_mask=None,
                input_boxes_label=None,
                input_points=None,
                input_points_mask=None,
            )
            # empty box prompt, reused as Sam3Processor reuses its state's (sam3_image_processor.py)
            self._query_cache[key] = (find, self.model._get_dummy_prompt(num_prompts=queries))
        return self._query_cache[key]

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

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, 3, R, R) model input: each image resized to the model's resolution, normalised, in `dtype`."""
        pixels = [self.transform(v2.functional.to_image(i.convert("RGB")).to(self.device)) for i in images]
        return torch.stack(pixels).to(self.dtype)

    @torch.inference_mode()
    def features(self, image: Image.Image) -> Features:
        """Image backbone output for one image (batch 1)."""
        return self._forward_image(self._pixels([image]))

    @torch.inference_mode()
    def ground(self, features: Features, prompts: list[str], images: int = 1) -> Grounding:
        """(images * P, Q, 4) cxcywh boxes in [0, 1], (images * P, Q) scores = sigmoid(logit) *
        sigmoid(presence), and with a mask head (images * P, Q, h, w) mask logits at the model's mask
        resolution (else None); row i * P + j is image i, prompt j."""
        backbone_out = {**features, **self._text(prompts)}  # a copy: sam3 pops keys from it
        return self._grounding(backbone_out, *self._queries(len(prompts), images))

    def _image_and_heads(
        self, pixels: torch.Tensor, text: Features, find: FindStage, geometric: Any
    ) -> Grounding:
        """`ground(features(images), prompts)` as one function, for torch.compile with scope `all`."""
        return self._grounding({**self._forward_image(pixels), **text}, find, geometric)

    @torch.inference_mode()
    def detect(self, image: Image.Image, prompts: list[str]) -> Grounding:
        """`ground(features(image), prompts)` for one image."""
        return self.detect_batch([image], prompts)

    @torch.inference_mode()
    def detect_batch(self, images: list[Image.Image], prompts: list[str]) -> Grounding:
        """`ground` of the images as one batch; compiled, padded up to a compiled batch size (the
        padding's rows dropped) and split above the largest."""
        if not self.batch_sizes:
            return self.ground(self._forward_image(self._pixels(images)), prompts, len(images))
        largest = self.batch_sizes[-1]
        if len(images) > largest:
            parts = [
                self.detect_batch(images[i : i + largest], prompts) for i in range(0, len(images), largest)
            ]
            masks = None if parts[0][2] is None else torch.cat([p[2] for p in parts if p[2] is not None])
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), masks
        size = next(s for s in self.batch_sizes if s >= len(images))
        pixels = self._pixels(images + images[-1:] * (size - len(images)))
        rows = len(images) * len(prompts)
        if self._detect is None:  # scope `backbone`: compiled backbone, eager head
            found = self.ground(self._forward_image(pixels), prompts, size)
        else:
            if self._graphs:
                torch.compiler.cudagraph_mark_step_begin()
            found = self._detect(pixels, self._text(prompts), *self._queries(len(prompts), size))
        boxes, scores, masks = found
        if self._graphs or size > len(images):  # the next replay reuses these buffers: copies
            boxes, scores = boxes[:rows].clone(), scores[:rows].clone()
            masks = None if masks is None else masks[:rows].clone()
        return boxes, scores, masks

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
        presence = out["presence_logit_dec"].float().sigmoid().unsqueeze(1)  # (N, 1, 1)
        scores = (out["pred_logits"].float().sigmoid() * presence).squeeze(-1)  # (N, Q)
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
        return self.predict_batch([image], prompts, max_dets, [min_score])[0]

    @torch.inference_mode()
    def predict_batch(
        self, images: list[Image.Image], prompts: dict[int, str], max_dets: int, min_scores: list[float]
    ) -> list[list[Detection]]:
        """`predict` of each image (with its own `min_scores` entry), the images as one model batch."""
        if len(min_scores) != len(images):
            raise ValueError(f"{len(images)} images but {len(min_scores)} min_scores")
        boxes, scores, masks = self.detect_batch(images, list(prompts.values()))  # rows: image-major
        scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
        scores, order = scores[:, :max_dets], order[:, :max_dets]  # (N, K), N = images * P
        picked = boxes.gather(1, order.unsqueeze(-1).expand(-1, -1, 4))  # (N, K, 4) cxcywh
        xyxy = box_ops.box_cxcywh_to_xyxy(picked).clamp(0, 1)  # (N, K, 4) in [0, 1]: inside the image
        rows = torch.cat([xyxy, scores.unsqueeze(-1)], dim=-1).cpu()  # the one wait for the boxes
        rows = rows.view(len(images), len(prompts), *rows.shape[1:])  # (B, P, K, 5)
        order = order.view(len(images), len(prompts), -1)
        if masks is not None:
            masks = masks.view(len(images), len(prompts), *masks.shape[1:])  # (B, P, Q, h, w)
        found = []
        for i, (image, min_score) in enumerate(zip(images, min_scores, strict=True)):
            per_image = None if masks is None else masks[i]
            found.append(self._detections(image.size, prompts, rows[i], order[i], per_image, min_score))
        return found

    def _detections(
        self,
        size: tuple[int, int],
        prompts: dict[int, str],
        rows: torch.Tensor,
        order: torch.Tensor,
        masks: torch.Tensor | None,
        min_score: float,
    ) -> list[Detection]:
        """One image's Detections from its (P, K, 5) host rows (xyxy in [0, 1], score; sorted), the
        (P, K) query index of each and, with a mask head, its (P, Q, h, w) mask logits."""
        width, height = size
        # scaled on the host: a tensor made on the device would be a host-to-device copy, which syncs
        rows = rows * torch.tensor([width, height, width, height, 1.0], dtype=torch.float32)  # pixels
        kept = [int((per_prompt[:, 4] >= min_score).sum()) for per_prompt in rows]  # sorted: a prefix
        count = sum(kept)
        rles: list[dict[str, Any] | None] = [None] * count
        if masks is not None and count:  # the kept detections' masks, all prompts in one call
            chosen = torch.cat([masks[j][order[j, :k]] for j, k in enumerate(kept)])
            rles = list(masks_to_rles(chosen, height, width))
        per_prompt_rles = iter(rles)
        return [
            Detection((row[0], row[1], row[2], row[3]), row[4], category_id, next(per_prompt_rles))
            for category_id, per_prompt, k in zip(prompts, rows.tolist(), kept, strict=True)
            for row in per_prompt[:k]
        ]
