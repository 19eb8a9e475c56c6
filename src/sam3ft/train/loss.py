"""sam3's detection loss, optionally computed for all decoder layers at once (`trainer.batched_loss`).

Upstream's Sam3LossWrapper runs its Boxes and IABCEMdetr losses once per output: the final decoder
layer, each auxiliary layer, and each of those again for the one-to-many queries, 12 outputs for
SAM3's 6 layers. That is ~1750 small kernels per step and as many autograd nodes, each queued from
Python while the GPU waits (bench/gpu_recipes.md, call 28: 64 ms of host time for 3 ms of GPU
work). The batched path stacks the outputs and computes every term with the same formulas on
(outputs, batch, queries) tensors, so one kernel serves all layers; the outputs that share a
matcher are matched in one call (train/matching.py). Same terms under the same names in the same
order; the values differ from upstream's only by float summation order (tests/test_loss.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from sam3.model import box_ops
from sam3.train.loss import loss_fns
from sam3.train.loss.loss_fns import CORE_LOSS_KEY, Boxes, Det2TrkAssoc, IABCEMdetr, Masks
from sam3.train.loss.sam3_loss import Sam3LossWrapper

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

    def __init__(self, *, batched: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batched = batched
        why = _unbatchable(self) if batched else []
        if why:
            raise ConfigError(
                "configs/train: batched_loss supports sam3's detection losses only: "
                + "; ".join(why)
                + ". Fix: set trainer.batched_loss: false in params.yaml"
            )

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
        match = _Matches(entries, targets)
        weights = torch.tensor([e.weight for e in entries], dtype=torch.float32)
        weight = to_device(weights, match.logits.device)  # (E,)
        boxes, ce, *others = self.loss_fns_find
        terms = [_box_terms(match, num_boxes), _ce_terms(ce, entries, match, targets)]
        total = torch.zeros((), device=match.logits.device)
        for fn, values in zip((boxes, ce), terms, strict=True):
            core = sum(values[key] * w for key, w in fn.weight_dict.items() if w != 0)  # (E,)
            total = total + (core * weight).sum()
        terms = [{key: v * weight for key, v in values.items()} for values in terms]  # o2m's logs scaled too
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


class _Matches:
    """The outputs stacked (E, B, Q) and their matched (query, target) pairs concatenated (M,)."""

    def __init__(self, entries: list[_Entry], targets: dict[str, Any]) -> None:
        self.logits = torch.stack([e.out["pred_logits"].squeeze(-1) for e in entries])  # (E, B, Q)
        self.boxes = torch.stack([e.out["pred_boxes"] for e in entries])  # (E, B, Q, 4) cxcywh
        self.boxes_xyxy = torch.stack([e.out["pred_boxes_xyxy"] for e in entries])
        device = self.logits.device
        n_targets = len(targets["boxes"])
        entry, batch, query, target = [], [], [], []
        for e, each in enumerate(entries):
            indices = each.indices
            entry.append(torch.full_like(indices[0], e))
            batch.append(indices[0])
            query.append(indices[1])
            # no target indices: the matcher kept the targets' own order (one query per target)
            target.append(indices[2] if indices[2] is not None else torch.arange(n_targets, device=device))
        self.entry, self.batch, self.query, self.target = (
            torch.cat(t) for t in (entry, batch, query, target)
        )
        self.count = len(entries)
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
    ce: IABCEMdetr, entries: list[_Entry], match: _Matches, targets: dict[str, Any]
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
        t = torch.clamp(prob[pairs] ** ce.alpha * iou ** (1 - ce.alpha), 0.01).detach()
        positive_target_classes = target_classes.clone()
        positive_target_classes[pairs] = t
    loss_bce = F.binary_cross_entropy_with_logits(logits, positive_target_classes, reduction="none")
    loss_bce = loss_bce * target_classes * ce.pos_weight
    queries = logits.shape[2]
    padded = isinstance(ce.pad_n_queries, int) and queries < ce.pad_n_queries
    if padded:
        loss_bce = loss_bce * ce.pad_scale_pos
    loss_bce = loss_bce + F.binary_cross_entropy_with_logits(logits, target_classes, reduction="none") * (
        1 - target_classes
    ) * (prob**ce.gamma)
    ids, boxes = targets["object_ids_padded"], targets["boxes_padded"]  # (B, H), (B, H, 4) cxcywh
    visible = (ids >= 0) & (boxes[..., 2] > 0) & (boxes[..., 3] > 0)
    keep_loss = (visible.sum(dim=-1)[..., None] != 0).float()  # (B, 1): no loss on images without objects
    loss_bce = loss_bce * keep_loss
    if padded:
        loss_ce = loss_bce.sum(dim=(1, 2)) / (ce.pad_n_queries * loss_bce.size(1))
    else:
        loss_ce = loss_bce.mean(dim=(1, 2))
    presence_loss, presence_acc = _presence_terms(ce, entries, keep_loss)
    return {
        "loss_ce": loss_ce,
        "ce_f1": _f1(prob, target_classes),
        "presence_loss": presence_loss,
        "presence_dec_acc": presence_acc,
    }


def _presence_terms(
    ce: IABCEMdetr, entries: list[_Entry], keep_loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Focal loss and accuracy of the decoder's presence logit, per entry; 0 where an entry has none
    (the one-to-many outputs)."""
    has = [e for e, entry in enumerate(entries) if "presence_logit_dec" in entry.out]
    device = keep_loss.device
    loss = torch.zeros(len(entries), device=device)
    acc = torch.zeros(len(entries), device=device)
    if not has:
        return loss, acc
    logits = torch.stack([entries[e].out["presence_logit_dec"].view_as(keep_loss) for e in has])  # (P, B, 1)
    targets = keep_loss.expand_as(logits)
    # elementwise, then upstream's reduction per entry: loss.mean(1).sum() / num_boxes with num_boxes = B
    each = loss_fns.sigmoid_focal_loss(
        logits.flatten(0, 1),
        targets.flatten(0, 1),
        num_boxes=1,
        alpha=ce.presence_alpha,
        gamma=ce.presence_gamma,
        reduce=False,
    ).view_as(logits)
    at = to_device(torch.tensor(has, dtype=torch.long), device)
    loss = loss.index_put((at,), each.mean(2).sum(1) / keep_loss.shape[0])
    hit = ((logits.sigmoid() > 0.5).float() == targets).float().mean(dim=(1, 2))
    acc = acc.index_put((at,), hit)
    return loss, acc


def _f1(prob: torch.Tensor, target_classes: torch.Tensor) -> torch.Tensor:
    """Binary F1 of `prob` > 0.5 per entry over (B, Q), as torchmetrics' f1_score (task="binary")
    that upstream logs as ce_f1: 2 tp / (2 tp + fp + fn), 0 where that is 0/0. No host wait."""
    with torch.no_grad():
        pred, truth = prob.flatten(1) > 0.5, target_classes.flatten(1) > 0.5
        tp = (pred & truth).sum(1)
        wrong = (pred != truth).sum(1)  # fp + fn
        denom = (2 * tp + wrong).float()
        return torch.where(denom > 0, (2 * tp).float() / denom.clamp(min=1), torch.zeros_like(denom))
