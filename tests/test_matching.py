"""Matching several outputs in one matcher call (train/matching.py) against upstream's call per output."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sam3.model.box_ops import box_cxcywh_to_xyxy
from sam3.train.matcher import BinaryHungarianMatcherV2, BinaryOneToManyMatcher

from sam3ft.train.matching import match_outputs, stacked_matching

QUERIES, LAYERS = 12, 6


def _targets(gen: torch.Generator, boxes_per_image: list[int]) -> dict[str, torch.Tensor]:
    """Targets as sam3's back_convert packs them (cxcywh boxes, packed and padded)."""
    b, h = len(boxes_per_image), max(boxes_per_image)
    padded = torch.zeros(b, h, 4)
    for i, n in enumerate(boxes_per_image):
        padded[i, :n] = torch.cat(
            [torch.rand(n, 2, generator=gen) * 0.5 + 0.25, torch.rand(n, 2, generator=gen) * 0.2 + 0.05], 1
        )
    packed = torch.cat([padded[i, :n] for i, n in enumerate(boxes_per_image)])
    return {
        "boxes": packed,
        "boxes_xyxy": box_cxcywh_to_xyxy(packed),
        "boxes_padded": padded,
        "num_boxes": torch.tensor(boxes_per_image),
    }


def _outputs(gen: torch.Generator, images: int, layers: int = LAYERS) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "pred_logits": torch.randn(images, QUERIES, 1, generator=gen) * 3,
            "pred_boxes": torch.rand(images, QUERIES, 4, generator=gen) * 0.4 + 0.2,
        }
        for _ in range(layers)
    ]


class _Counting(BinaryHungarianMatcherV2):  # type: ignore[misc]
    calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return super().forward(*args, **kwargs)


def _matcher() -> _Counting:
    """configs/train/sam3ft.yaml's matcher, counting its calls."""
    return _Counting(focal=True, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2)


def _assert_same(ours: list[Any], upstream: list[Any]) -> None:
    assert len(ours) == len(upstream)
    for mine, theirs in zip(ours, upstream, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b)


# [2, 0, 3]: an image without objects (the matcher drops it); [15, 1]: more objects than queries,
# so the matcher returns target indices, offset per layer in the stacked call
@pytest.mark.parametrize("boxes_per_image", [[1], [2, 0, 3], [4, 1], [15, 1]])
def test_one_call_gives_each_outputs_matches(boxes_per_image: list[int]) -> None:
    gen = torch.Generator().manual_seed(len(boxes_per_image))
    targets, outputs = _targets(gen, boxes_per_image), _outputs(gen, len(boxes_per_image))
    matcher = _matcher()
    upstream = [matcher(out, targets) for out in outputs]
    matcher.calls = 0
    ours = match_outputs(matcher, outputs, targets)
    assert matcher.calls == 1
    _assert_same(ours, upstream)
    assert sum(len(m[0]) for m in ours) == LAYERS * sum(min(n, QUERIES) for n in boxes_per_image)
    assert (upstream[0][2] is not None) == (max(boxes_per_image) > QUERIES)


def test_validity_masks_filter_as_upstream() -> None:
    gen = torch.Generator().manual_seed(7)
    targets, outputs = _targets(gen, [3, 2]), _outputs(gen, 2, layers=5)
    out_is_valid = torch.rand(2, QUERIES, generator=gen) > 0.3  # (B, Q)
    target_is_valid = torch.tensor([[True, False, True], [True, True, False]])  # (B, max boxes)
    valid = {"out_is_valid": out_is_valid, "target_is_valid_padded": target_is_valid}
    matcher = _matcher()
    upstream = [matcher(out, targets, **valid) for out in outputs]
    ours = match_outputs(matcher, outputs, targets, **valid)
    _assert_same(ours, upstream)
    assert all(1 not in m[2][m[0] == 0] for m in ours)  # image 0's second object is masked out


def test_other_matchers_and_uneven_outputs_run_per_output() -> None:
    gen = torch.Generator().manual_seed(3)
    targets, outputs = _targets(gen, [2, 1]), _outputs(gen, 2, layers=3)
    o2m = BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=4)
    _assert_same(match_outputs(o2m, outputs, targets), [o2m(out, targets) for out in outputs])
    matcher = _matcher()
    outputs[1] = {k: v[:, : QUERIES // 2] for k, v in outputs[1].items()}  # fewer queries
    upstream = [matcher(out, targets) for out in outputs]
    matcher.calls = 0
    _assert_same(match_outputs(matcher, outputs, targets), upstream)
    assert matcher.calls == 3


def test_the_models_matching_is_one_call_with_upstreams_indices() -> None:
    gen = torch.Generator().manual_seed(11)
    targets, (out, *aux) = _targets(gen, [2, 3]), _outputs(gen, 2)
    out["aux_outputs"] = aux
    matcher = _matcher()
    upstream = [matcher(each, targets) for each in [out, *aux]]

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.matcher = matcher

    model = Model()
    model._compute_matching = stacked_matching(model)
    matcher.calls = 0
    model._compute_matching(out, targets)
    assert matcher.calls == 1
    _assert_same([each["indices"] for each in [out, *aux]], upstream)
