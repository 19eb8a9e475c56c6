"""sam3's detection loss, optionally computed for all decoder layers at once (`trainer.batched_loss`).

Upstream's Sam3LossWrapper runs its Boxes and IABCEMdetr losses once per output: the final decoder
layer, each auxiliary layer, and each of those again for the one-to-many queries, 12 outputs for
SAM3's 6 layers. That is ~1750 small kernels per step and as many autograd nodes, each queued from
Python while the GPU waits: on a GPU the host time is many times the kernels' time (bench/LOG.md
has the timeline). The batched path stacks the outputs and computes every term with the same formulas on
(outputs, batch, queries) tensors, so one kernel serves all layers; the outputs that share a
matcher are matched in one call (train/matching.py). Same terms under the same names in the same
order; the values differ from upstream's only by float summation order (tests/test_loss.py).

With `compiled: true` (trainer.compile_model) the batched terms (`_terms`) run through
torch.compile with dynamic shapes: one graph for any number of objects (torch gives 0 and 1 a graph
of their own), its elementwise work fused into a few kernels forward and backward. Not a CUDA
graph: the pair count changes every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from sam3.model import box_ops
from sam3.train.loss import loss_fns
from sam3.train.loss.loss_fns import CORE_LOSS_KEY, Boxes, Det2TrkAssoc, IABCEMdetr, Masks
from sam3.train.loss.sam3_loss import Sam3LossWrapper
from torch.fx.experimental import _config as fx_config

from sam3ft.errors import ConfigError
from sam3ft.train.matching import Indices, match_outputs
from sam3ft.train.transfer import to_device


def _unbatchable(wrapper: Sam3LossWrapper) -> list[str]:
    """Why `wrapper`'s settings need upstream's per-output path (empty: the batched path computes them)."""
    kinds = [type(fn) for fn in wrapper.loss_fns_find]
    if kinds[:2] != [Boxes, IABCEMdetr]:
        return [f"loss_fns_find is {[k.__name__ for k in kinds]}; batched: Boxes, IABCEMdetr, then any"]
    boxes, ce = wrapper.loss_fns_find[:2]
    why = [f"{type(fn).__name__}.compute_aux: false" for fn in (boxes, ce) if not fn.compute_aux]
    settings = {
        "weak_loss": False,
        "use_separate_loss_for_det_and_trk": False,
        "pos_focal": False,
        "use_presence": True,
        "use_presence_semgseg": False,
    }
    why += [
        f"IABCEMdetr.{k}: {getattr(ce, k)} (batched: {v})" for k, v in settings.items() if getattr(ce, k) != v
    ]
    return why


@dataclass
class _Entry:
    """One set of queries the loss compares with the targets: an output's one-to-one queries, or
    its one-to-many queries (their keys without the `_o2m` suffix)."""

    out: dict[str, Any]
    indices: Indices
    suffix: str  # of the logged names: "", "_aux_0", ..., then "_o2m" for one-to-many
    weight: float  # o2m_weight for one-to-many queries, else 1
    is_aux: bool
    o2m: bool


class Sam3Loss(Sam3LossWrapper):  # type: ignore[misc]  # sam3 ships no type information
    """Sam3LossWrapper; `batched: true` computes its Boxes and IABCEMdetr terms for all outputs at
    once (loss functions after those two still run per output, as upstream)."""

    def __init__(self, *, batched: bool = False, compiled: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batched = batched
        why = _unbatchable(self) if batched else []
        if why:
            raise ConfigError(
                "configs/train: batched_loss supports sam3's detection losses only: "
                + "; ".join(why)
                + ". Fix: set trainer.batched_loss: false in params.yaml"
            )
        boxes, ce = self.loss_fns_find[:2]
        self._spec = _Spec.of(boxes, ce, compiled) if batched else None
        self._compiled = _compiled_terms() if batched and compiled else None

    def compute_loss(self, nested_out: dict[str, Any], targets: dict[str, Any]) -> dict[str, torch.Tensor]:
        if not self.batched or any(
            o.get("is_video_grounding_batch", False) for o, _, _ in _outputs(nested_out)
        ):
            return super().compute_loss(nested_out, targets)  # type: ignore[no-any-return]
        num_boxes = self._get_num_boxes(targets)
        outputs = _outputs(nested_out)
        o2m_indices = self._o2m_matching(outputs, nested_out, targets)
        per_output = [
            self._entries(out, suffix, is_aux, o2m)
            for (out, suffix, is_aux), o2m in zip(outputs, o2m_indices, strict=True)
        ]
        entries = [e for pair in per_output for e in pair]
        device = entries[0].out["pred_logits"].device
        weight = to_device(torch.tensor([e.weight for e in entries], dtype=torch.float32), device)  # (E,)
        # compiled where the graph is the same as the last step's: training, not validation
        terms_fn = self._compiled if self._compiled is not None and torch.is_grad_enabled() else _terms
        assert self._spec is not None  # batched
        total, terms = terms_fn(
            self._spec,
            {key: [e.out[key] for e in entries] for key in _STACKED},
            _pairs([e.indices for e in entries], len(targets["boxes"]), device),
            [e.out.get("presence_logit_dec") for e in entries],
            {key: targets[key] for key in _TARGETS},
            num_boxes,
            weight,
        )
        others = self.loss_fns_find[2:]
        losses: dict[str, torch.Tensor] = {}
        at = 0  # entry number
        for pair in per_output:  # upstream's order: per output, each loss fn, o2o then o2m
            for values in terms:
                for e, entry in enumerate(pair, start=at):
                    losses.update({f"{key}{entry.suffix}": v[e] for key, v in values.items()})
            for fn in others:
                for entry in pair:
                    if entry.o2m and not _o2m_loss(fn, entry):
                        continue
                    l_dict = fn(
                        outputs=entry.out,
                        targets=targets,
                        indices=entry.indices,
                        num_boxes=num_boxes,
                        is_aux=entry.is_aux,
                    )
                    if entry.o2m:
                        l_dict = {k: v * self.o2m_weight for k, v in l_dict.items()}
                    total = total + l_dict.pop(CORE_LOSS_KEY)
                    losses.update({f"{k}{entry.suffix}": v for k, v in l_dict.items()})
            at += len(pair)
        losses[CORE_LOSS_KEY] = total
        return losses

    def _o2m_matching(
        self,
        outputs: list[tuple[dict[str, Any], str, bool]],
        nested_out: dict[str, Any],
        targets: dict[str, Any],
    ) -> list[Indices | None]:
        """Each output's one-to-many queries matched as upstream matches them
        (sam3/train/loss/sam3_loss.py:107), None where an output has none; the outputs that share a
        matcher in one call (train/matching.py)."""
        groups: dict[int, tuple[Any, list[int]]] = {}
        for n, (out, _, is_aux) in enumerate(outputs):
            if "pred_logits_o2m" in out:
                matcher = self.o2m_matcher if self.use_o2m_matcher_on_o2m_aux or not is_aux else self.matcher
                groups.setdefault(id(matcher), (matcher, []))[1].append(n)
        found: list[Indices | None] = [None] * len(outputs)
        for matcher, members in groups.values():
            matched = match_outputs(
                matcher,
                [_o2m_out(outputs[n][0]) for n in members],
                targets,
                out_is_valid=nested_out.get("o2m_out_is_valid"),
                target_is_valid_padded=nested_out.get("o2m_target_is_valid_padded"),
            )
            for n, indices in zip(members, matched, strict=True):
                found[n] = indices
        return found

    def _entries(self, out: dict[str, Any], suffix: str, is_aux: bool, o2m: Indices | None) -> list[_Entry]:
        """An output's one-to-one queries and, where it has them, its one-to-many queries with their
        matching `o2m`."""
        entries = [_Entry(out, out["indices"], suffix, 1.0, is_aux, o2m=False)]
        if o2m is not None:
            entries.append(_Entry(_o2m_out(out), o2m, suffix + "_o2m", self.o2m_weight, is_aux, o2m=True))
        return entries


def _o2m_out(out: dict[str, Any]) -> dict[str, Any]:
    """An output's one-to-many queries under the one-to-one keys (their `_o2m` suffix dropped)."""
    return {k[: -len("_o2m")]: v for k, v in out.items() if k.endswith("_o2m")}


def _o2m_loss(fn: Any, entry: _Entry) -> bool:
    """Whether upstream applies `fn` to one-to-many queries (sam3/train/loss/sam3_loss.py:141)."""
    if isinstance(fn, Masks):
        return "pred_masks" in entry.out
    return not isinstance(fn, Det2TrkAssoc)


def _outputs(nested_out: dict[str, Any]) -> list[tuple[dict[str, Any], str, bool]]:
    """(outputs, name suffix, is_aux) of the final layer, the auxiliary layers and a first stage."""
    listed = [(nested_out, "", False)]
    listed += [(aux, f"_aux_{i}", True) for i, aux in enumerate(nested_out.get("aux_outputs", []))]
    if "first_stage" in nested_out:
        listed.append((nested_out["first_stage"], "_fs", True))
    return listed


_STACKED = ("pred_logits", "pred_boxes", "pred_boxes_xyxy")  # each entry's outputs the terms read
# the targets they read, and the dimension of each that counts objects: (N, 4) packed, (B, H, ...) padded
_TARGETS = {"boxes": 0, "boxes_xyxy": 0, "object_ids_padded": 1, "boxes_padded": 1}


@dataclass(frozen=True)
class _Spec:
    """The settings of the Boxes and IABCEMdetr losses that the batched terms read, as plain numbers
    (a compiled `_terms` is specialised on them)."""

    box_weights: tuple[tuple[str, float], ...]  # Boxes.weight_dict
    ce_weights: tuple[tuple[str, float], ...]  # IABCEMdetr.weight_dict
    alpha: float
    gamma: float
    pos_weight: float
    pad_n_queries: int | None
    pad_scale_pos: float
    presence_alpha: float
    presence_gamma: float
    triton_focal: bool  # the presence focal loss on sam3's Triton kernel (eager, CUDA) or in torch

    @classmethod
    def of(cls, boxes: Boxes, ce: IABCEMdetr, compiled: bool) -> _Spec:
        pad = ce.pad_n_queries if isinstance(ce.pad_n_queries, int) else None
        return cls(
            box_weights=tuple(boxes.weight_dict.items()),
            ce_weights=tuple(ce.weight_dict.items()),
            alpha=ce.alpha,
            gamma=ce.gamma,
            pos_weight=ce.pos_weight,
            pad_n_queries=pad,
            pad_scale_pos=ce.pad_scale_pos,
            presence_alpha=ce.presence_alpha,
            presence_gamma=ce.presence_gamma,
            triton_focal=not compiled,  # dynamo does not trace sam3's autograd Function around Triton
        )


def _terms(
    spec: _Spec,
    outs: dict[str, list[torch.Tensor]],
    pairs: Pairs,
    presence: list[torch.Tensor | None],
    targets: dict[str, torch.Tensor],
    num_boxes: torch.Tensor,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """The Boxes and IABCEMdetr terms of E entries (their `outs` keyed as `_STACKED`, their matched
    `pairs`, presence logits or None) as (E,) tensors scaled by `weight` (E,), and the total of
    their weighted core terms. Tensors in, tensors out: `Sam3Loss(compiled=True)` compiles it."""
    match = _Matches(outs, pairs, targets)
    box_terms, ce_terms = _box_terms(match, num_boxes), _ce_terms(spec, match, presence, targets)
    total = torch.zeros((), device=weight.device)
    for weights, values in ((spec.box_weights, box_terms), (spec.ce_weights, ce_terms)):
        core = sum(values[key] * w for key, w in weights if w != 0)  # (E,)
        total = total + (core * weight).sum()
    terms = [{key: v * weight for key, v in values.items()} for values in (box_terms, ce_terms)]
    return total, terms  # the one-to-many entries' logged terms scaled by o2m_weight too, as upstream


def _compiled_terms() -> Callable[..., tuple[torch.Tensor, list[dict[str, torch.Tensor]]]]:
    """`_terms` through torch.compile, one graph for any number of objects and matched pairs: the
    sizes that follow the objects (pairs, targets, padded targets) are symbolic, each its own size
    (not duck-sized: a pair count that happens to equal another size would otherwise compile again
    when it does not); the outputs' sizes stay fixed. All sizes symbolic (`dynamic=True`) failed in
    inductor on torch 2.11 + CUDA ("NYI SymInt equality")."""
    compiled = torch.compile(_terms)

    def terms(*args: Any) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        _, _, pairs, _, targets, *_ = args  # as `_terms` takes them
        for t in pairs:
            torch._dynamo.maybe_mark_dynamic(t, 0)  # sizes 0 and 1 stay specialised: a graph each
        for key, dim in _TARGETS.items():
            torch._dynamo.maybe_mark_dynamic(targets[key], dim)
        with fx_config.patch(use_duck_shape=False):  # type: ignore[attr-defined]  # read when tracing
            return compiled(*args)  # type: ignore[no-any-return]

    return terms


# (entry, batch, query, target) index of every matched pair of all entries, concatenated: (M,) each
Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _pairs(indices: list[Indices], n_targets: int, device: torch.device) -> Pairs:
    """The entries' matched pairs `indices` concatenated, with the entry each belongs to; built
    eagerly in a few kernels, so a compiled `_terms` sees one pair count, not one per entry."""
    counts = torch.tensor([len(rows) for rows, _, _ in indices])
    entry = to_device(torch.repeat_interleave(torch.arange(len(indices)), counts), device)
    # no target indices: the matcher kept the targets' own order (one query per target)
    own = torch.arange(n_targets, device=device)
    found = [t if t is not None else own for _, _, t in indices]
    batch = torch.cat([rows for rows, _, _ in indices])
    query = torch.cat([queries for _, queries, _ in indices])
    return entry, batch, query, torch.cat(found)


class _Matches:
    """The entries' outputs stacked (E, B, Q) and their matched (query, target) pairs (M,)."""

    def __init__(
        self, outs: dict[str, list[torch.Tensor]], pairs: Pairs, targets: dict[str, torch.Tensor]
    ) -> None:
        self.logits = torch.stack([t.squeeze(-1) for t in outs["pred_logits"]])  # (E, B, Q)
        self.boxes = torch.stack(outs["pred_boxes"])  # (E, B, Q, 4) cxcywh
        self.boxes_xyxy = torch.stack(outs["pred_boxes_xyxy"])
        self.entry, self.batch, self.query, self.target = pairs
        self.count = len(outs["pred_logits"])
        self.targets_boxes = targets["boxes"][self.target]  # (M, 4) cxcywh
        self.targets_xyxy = targets["boxes_xyxy"][self.target]
        self.pairs = (self.entry, self.batch, self.query)  # index of each matched query in (E, B, Q)
        self.src_boxes, self.src_xyxy = self.boxes[self.pairs], self.boxes_xyxy[self.pairs]  # (M, 4)

    def per_entry(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of per-pair `values` (M,) for each entry: (E,)."""
        return torch.zeros(self.count, dtype=values.dtype, device=values.device).index_add_(
            0, self.entry, values
        )


def _box_terms(match: _Matches, num_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Boxes.get_loss (sam3/train/loss/loss_fns.py:531) for every entry: L1 and GIoU over matched pairs."""
    l1 = F.l1_loss(match.src_boxes, match.targets_boxes, reduction="none").sum(-1)
    giou = 1 - box_ops.fast_diag_generalized_box_iou(match.src_xyxy, match.targets_xyxy)
    return {"loss_bbox": match.per_entry(l1) / num_boxes, "loss_giou": match.per_entry(giou) / num_boxes}


def _ce_terms(
    spec: _Spec, match: _Matches, presence: list[torch.Tensor | None], targets: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """IABCEMdetr.get_loss (sam3/train/loss/loss_fns.py:345) for every entry, as configured for
    images (no weak loss, presence on)."""
    logits = match.logits  # (E, B, Q)
    prob = logits.sigmoid()
    pairs = match.pairs
    with torch.no_grad():
        target_classes = torch.zeros_like(logits, dtype=torch.float)
        target_classes[pairs] = 1
        iou = box_ops.fast_diag_box_iou(match.src_xyxy, match.targets_xyxy)
        t = torch.clamp(prob[pairs] ** spec.alpha * iou ** (1 - spec.alpha), 0.01).detach()
        positive_target_classes = target_classes.clone()
        positive_target_classes[pairs] = t
    loss_bce = F.binary_cross_entropy_with_logits(logits, positive_target_classes, reduction="none")
    loss_bce = loss_bce * target_classes * spec.pos_weight
    queries = logits.shape[2]
    pad = spec.pad_n_queries
    if pad is not None and queries < pad:
        loss_bce = loss_bce * spec.pad_scale_pos
    loss_bce = loss_bce + F.binary_cross_entropy_with_logits(logits, target_classes, reduction="none") * (
        1 - target_classes
    ) * (prob**spec.gamma)
    ids, boxes = targets["object_ids_padded"], targets["boxes_padded"]  # (B, H), (B, H, 4) cxcywh
    visible = (ids >= 0) & (boxes[..., 2] > 0) & (boxes[..., 3] > 0)
    keep_loss = (visible.sum(dim=-1)[..., None] != 0).float()  # (B, 1): no loss on images without objects
    loss_bce = loss_bce * keep_loss
    if pad is not None and queries < pad:
        loss_ce = loss_bce.sum(dim=(1, 2)) / (pad * loss_bce.size(1))
    else:
        loss_ce = loss_bce.mean(dim=(1, 2))
    presence_loss, presence_acc = _presence_terms(spec, presence, keep_loss)
    return {
        "loss_ce": loss_ce,
        "ce_f1": _f1(prob, target_classes),
        "presence_loss": presence_loss,
        "presence_dec_acc": presence_acc,
    }


def _presence_terms(
    spec: _Spec, presence: list[torch.Tensor | None], keep_loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Focal loss and accuracy of the decoder's presence logit `presence` per entry; 0 where an
    entry has none (the one-to-many outputs)."""
    zero = keep_loss.new_zeros(())
    given = [p for p in presence if p is not None]
    if not given:
        return keep_loss.new_zeros(len(presence)), keep_loss.new_zeros(len(presence))
    logits = torch.stack([p.view_as(keep_loss) for p in given])  # (P, B, 1)
    targets = keep_loss.expand_as(logits)
    # elementwise, then upstream's reduction per entry: loss.mean(1).sum() / num_boxes with num_boxes = B
    each = loss_fns.sigmoid_focal_loss(
        logits.flatten(0, 1),
        targets.flatten(0, 1),
        num_boxes=1,
        alpha=spec.presence_alpha,
        gamma=spec.presence_gamma,
        reduce=False,
        triton=spec.triton_focal,
    ).view_as(logits)
    loss = each.mean(2).sum(1) / keep_loss.shape[0]  # (P,)
    hit = ((logits.sigmoid() > 0.5).float() == targets).float().mean(dim=(1, 2))  # (P,)
    rows = iter(range(len(given)))  # spread over the entries, 0 where none
    at = [next(rows) if p is not None else None for p in presence]
    return (
        torch.stack([loss[i] if i is not None else zero for i in at]),
        torch.stack([hit[i] if i is not None else zero for i in at]),
    )


def _f1(prob: torch.Tensor, target_classes: torch.Tensor) -> torch.Tensor:
    """Binary F1 of `prob` > 0.5 per entry over (B, Q), as torchmetrics' f1_score (task="binary")
    that upstream logs as ce_f1: 2 tp / (2 tp + fp + fn), 0 where that is 0/0. No host wait."""
    with torch.no_grad():
        pred, truth = prob.flatten(1) > 0.5, target_classes.flatten(1) > 0.5
        tp = (pred & truth).sum(1)
        wrong = (pred != truth).sum(1)  # fp + fn
        denom = (2 * tp + wrong).float()
        return torch.where(denom > 0, (2 * tp).float() / denom.clamp(min=1), torch.zeros_like(denom))
