"""sam3's Hungarian matching of several decoder layers' outputs in one matcher call.

Upstream matches each output apart: the one-to-one queries of the final and the 5 auxiliary
layers in the model's forward (sam3/model/sam3_image.py:578), the auxiliary layers' one-to-many
queries in the loss (sam3/train/loss/sam3_loss.py:107). Each BinaryHungarianMatcherV2 call waits
for the device 4 times (the box count, the cost matrix, two index copies from pageable memory:
sam3/train/matcher.py:539, 614, 651, 665), 44 for a SAM3 step's 11 calls.
The matcher also takes a stack of outputs with the targets repeated (`repeat_batch`,
sam3/train/matcher.py:548): one call computes the same cost matrices and runs the same scipy
assignment on each, so the indices are the same, for five waits (one more splits the matches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from sam3.train.matcher import BinaryHungarianMatcherV2

# (batch index, query index, target index or None) of the matched pairs, as sam3's matchers return them
Indices = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]

_STACKED = ("pred_logits", "pred_boxes")


def match_outputs(
    matcher: Any,
    outputs: list[dict[str, Any]],
    targets: dict[str, Any],
    out_is_valid: torch.Tensor | None = None,
    target_is_valid_padded: torch.Tensor | None = None,
) -> list[Indices]:
    """`matcher(out, targets, ...)` for each of `outputs` (same batch, same number of queries):
    one call for all with BinaryHungarianMatcherV2, else one per output."""
    valid = {"out_is_valid": out_is_valid, "target_is_valid_padded": target_is_valid_padded}
    shapes = {out["pred_logits"].shape for out in outputs}
    if len(outputs) < 2 or not isinstance(matcher, BinaryHungarianMatcherV2) or len(shapes) != 1:
        return [matcher(out, targets, **valid) for out in outputs]
    layers, batch = len(outputs), outputs[0]["pred_logits"].shape[0]
    stacked = {k: torch.cat([out[k] for out in outputs]) for k in _STACKED}  # (L * B, Q, ...) layer-major
    if out_is_valid is not None:
        valid["out_is_valid"] = out_is_valid.repeat(layers, 1)  # the matcher repeats only the targets
    rows, queries, found = matcher(stacked, targets, repeat_batch=layers, **valid)
    # pairs come sorted by row (layer, image): each layer's first pair, in the one read here
    # (torch.bincount would read the device twice more, for its output size)
    bounds = torch.arange(layers + 1, device=rows.device) * batch
    firsts = torch.searchsorted(rows, bounds).tolist()  # layers + 1: the last is the pair count
    n_targets = len(targets["boxes"])  # packed: the matcher offsets layer l's target indices by l * this
    split: list[Indices] = []
    for layer in range(layers):
        at = slice(firsts[layer], firsts[layer + 1])
        target = found[at] - layer * n_targets if found is not None else None
        split.append((rows[at] - layer * batch, queries[at], target))
    return split


def stacked_matching(model: torch.nn.Module) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    """A `_compute_matching` for `model` that matches its final and auxiliary outputs in one call
    (same indices as upstream's, a call per output); train/model.py installs it."""
    matcher = model.matcher

    def compute_matching(out: dict[str, Any], targets: dict[str, Any]) -> None:
        outputs = [out, *out.get("aux_outputs", [])]
        for each, indices in zip(outputs, match_outputs(matcher, outputs, targets), strict=True):
            each["indices"] = indices

    return compute_matching
