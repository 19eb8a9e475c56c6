"""The batched detection loss (train/loss.py) against sam3's Sam3LossWrapper: same terms, names,
order, total and gradients, up to float summation order."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from sam3.model.box_ops import box_cxcywh_to_xyxy
from sam3.train.loss.loss_fns import Boxes, IABCEMdetr, Masks
from sam3.train.loss.sam3_loss import Sam3LossWrapper
from sam3.train.matcher import BinaryHungarianMatcherV2, BinaryOneToManyMatcher

from sam3ft import compat
from sam3ft.errors import ConfigError
from sam3ft.train.loss import Sam3Loss

QUERIES, LAYERS = 20, 4
# on CUDA sam3's focal loss runs its Triton kernels (sam3/train/loss/sigmoid_focal_loss.py)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", autouse=True)
def one_process_group() -> Iterator[None]:
    compat.apply()  # sam3's focal loss without Triton off the GPU
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()


def _settings(pad_n_queries: int = QUERIES) -> dict:
    """configs/train/sam3ft.yaml's loss, with fresh loss modules."""
    return {
        "matcher": BinaryHungarianMatcherV2(
            focal=True, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2
        ),
        "o2m_weight": 2.0,
        "o2m_matcher": BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=4),
        "use_o2m_matcher_on_o2m_aux": False,
        "loss_fns_find": [
            Boxes(weight_dict={"loss_bbox": 5.0, "loss_giou": 2.0}),
            IABCEMdetr(
                weak_loss=False,
                weight_dict={"loss_ce": 20.0, "presence_loss": 20.0},
                pos_weight=10.0,
                alpha=0.25,
                gamma=2,
                use_presence=True,
                pos_focal=False,
                pad_n_queries=pad_n_queries,
            ),
        ],
        "scale_by_find_batch_size": True,
    }


def _batch(
    seed: int, boxes_per_image: list[int], masks: bool = False, device: str = "cpu"
) -> tuple[dict, dict, list[torch.Tensor]]:
    """Model outputs (final layer, aux layers, one-to-many queries, presence; masks on the final
    layer) with leaves that take gradients, and targets as sam3's back_convert packs them; one image
    may have no object."""
    gen = torch.Generator().manual_seed(seed)
    b, h = len(boxes_per_image), max(boxes_per_image)
    padded = torch.zeros(b, h, 4)  # cxcywh
    ids = torch.full((b, h), -1, dtype=torch.long)
    for i, n in enumerate(boxes_per_image):
        centre = torch.rand(n, 2, generator=gen) * 0.5 + 0.25
        size = torch.rand(n, 2, generator=gen) * 0.2 + 0.05
        padded[i, :n] = torch.cat([centre, size], dim=1)
        ids[i, :n] = torch.arange(n)
    packed = torch.cat([padded[i, :n] for i, n in enumerate(boxes_per_image)])
    targets = {
        "boxes": packed,
        "boxes_xyxy": box_cxcywh_to_xyxy(packed),
        "boxes_padded": padded,
        "num_boxes": torch.tensor(boxes_per_image),
        "object_ids_padded": ids,
        "is_exhaustive": torch.ones(b, dtype=torch.bool),
    }
    leaves: list[torch.Tensor] = []

    def leaf(values: torch.Tensor) -> torch.Tensor:
        values = values.to(device).requires_grad_(True)
        leaves.append(values)
        return values

    def layer() -> dict:
        out = {}
        for sfx in ("", "_o2m"):
            logits = torch.rand(b, QUERIES, 1, generator=gen) * 6 - 4
            boxes = torch.rand(b, QUERIES, 4, generator=gen) * 0.4 + 0.2  # cxcywh
            # a few confident queries near each object, so that the one-to-many matcher pairs some
            near = padded.repeat_interleave(3, dim=1)[:, : QUERIES // 2]
            boxes[:, : near.shape[1]] = near + 0.01 * torch.randn(near.shape, generator=gen)
            logits[:, : near.shape[1]] += 5
            out["pred_logits" + sfx], out["pred_boxes" + sfx] = leaf(logits), leaf(boxes)
            out["pred_boxes_xyxy" + sfx] = box_cxcywh_to_xyxy(out["pred_boxes" + sfx])
        out["presence_logit_dec"] = leaf(torch.rand(b, 1, generator=gen) * 4 - 2)
        return out

    out = layer()
    out["aux_outputs"] = [layer() for _ in range(LAYERS - 1)]
    if masks:
        out["pred_masks"] = leaf(torch.rand(b, QUERIES, 8, 8, generator=gen))
        out["pred_masks_o2m"] = leaf(torch.rand(b, QUERIES, 8, 8, generator=gen))
    if masks:
        targets["masks"] = torch.rand(len(packed), 16, 16, generator=gen) > 0.5
        targets["is_valid_mask"] = torch.arange(len(packed)) != 1  # one object without a mask
    return out, {k: v.to(device) for k, v in targets.items()}, leaves


def _losses(
    wrapper: Sam3LossWrapper, seed: int, boxes_per_image: list[int], masks: bool = False, device: str = "cpu"
) -> tuple[dict, list]:
    """The wrapper's loss dict and the gradients of the total, the model's matching done first (as
    Sam3Image._compute_matching does)."""
    out, targets, leaves = _batch(seed, boxes_per_image, masks, device)
    for each in [out, *out["aux_outputs"]]:
        each["indices"] = wrapper.matcher(each, targets)
    losses = wrapper.compute_loss(out, targets)
    losses["core_loss"].backward()
    return losses, [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("boxes_per_image", [[1, 1, 1], [2, 0, 3], [4, 1]])
@pytest.mark.parametrize("pad_n_queries", [QUERIES, 2 * QUERIES])
def test_same_terms_total_and_gradients_as_upstream(
    boxes_per_image: list[int], pad_n_queries: int, device: str
) -> None:
    upstream, upstream_grads = _losses(
        Sam3LossWrapper(**_settings(pad_n_queries)), 0, boxes_per_image, device=device
    )
    ours, our_grads = _losses(
        Sam3Loss(batched=True, **_settings(pad_n_queries)), 0, boxes_per_image, device=device
    )
    assert list(ours) == list(upstream)  # names and order: the step logs read the same
    assert len(ours) == 1 + LAYERS * 2 * 6  # per layer, o2o and o2m: bbox, giou, ce, f1, presence, acc
    for key, value in upstream.items():
        assert ours[key].shape == value.shape == (), key
        torch.testing.assert_close(ours[key], value.float(), rtol=2e-6, atol=1e-6, msg=key)
    assert any(v.item() != 0 for k, v in ours.items() if k.startswith("ce_f1"))  # the F1 terms are not all 0
    assert ours["presence_loss_aux_0"].item() > 0 and ours["presence_loss_o2m"].item() == 0
    for ours_grad, upstream_grad in zip(our_grads, upstream_grads, strict=True):
        if upstream_grad is None:  # the model's pred_boxes_xyxy feed no loss but through pred_boxes
            assert ours_grad is None
        else:
            torch.testing.assert_close(ours_grad, upstream_grad, rtol=1e-5, atol=1e-7)


def _with_masks() -> dict:
    """The settings plus configs/train/sam3ft_masks.yaml's mask loss (final layer only)."""
    settings = _settings()
    masks = Masks(weight_dict={"loss_mask": 20.0, "loss_dice": 1.0}, focal_alpha=0.25, focal_gamma=2.0)
    settings["loss_fns_find"].append(masks)
    return settings


@pytest.mark.parametrize("device", DEVICES)
def test_loss_functions_after_the_detection_ones_run_per_output_as_upstream(device: str) -> None:
    upstream, upstream_grads = _losses(Sam3LossWrapper(**_with_masks()), 2, [2, 1, 1], True, device)
    ours, our_grads = _losses(Sam3Loss(batched=True, **_with_masks()), 2, [2, 1, 1], True, device)
    assert list(ours) == list(upstream)
    assert {"loss_mask", "loss_dice_o2m"} <= set(ours) and "loss_mask_aux_0" not in ours
    assert ours["loss_mask_o2m"].item() > 0  # the one-to-many queries matched objects
    for key, value in upstream.items():
        torch.testing.assert_close(ours[key], value.float(), rtol=2e-6, atol=1e-6, msg=key)
    for ours_grad, upstream_grad in zip(our_grads, upstream_grads, strict=True):
        assert (ours_grad is None) == (upstream_grad is None)
        if upstream_grad is not None:
            torch.testing.assert_close(ours_grad, upstream_grad, rtol=1e-5, atol=1e-7)


def test_unbatched_is_upstream() -> None:
    upstream, _ = _losses(Sam3LossWrapper(**_settings()), 1, [2, 1])
    ours, _ = _losses(Sam3Loss(batched=False, **_settings()), 1, [2, 1])
    assert list(ours) == list(upstream)
    assert all(torch.equal(ours[k], upstream[k]) for k in upstream)


def test_settings_it_cannot_batch_are_named() -> None:
    settings = _settings()
    settings["loss_fns_find"][1].weak_loss = True
    with pytest.raises(ConfigError, match=r"IABCEMdetr.weak_loss: True .*trainer.batched_loss: false"):
        Sam3Loss(batched=True, **settings)
    settings = _settings()
    settings["loss_fns_find"].reverse()
    with pytest.raises(ConfigError, match=r"\['IABCEMdetr', 'Boxes'\]; batched: Boxes, IABCEMdetr, then any"):
        Sam3Loss(batched=True, **settings)
    Sam3Loss(batched=False, **settings)  # upstream's path takes any settings


def test_the_aux_layers_one_to_many_queries_are_matched_in_one_call() -> None:
    settings = _settings()
    matcher = settings["matcher"]
    calls = []
    forward = matcher.forward
    matcher.forward = lambda *a, **k: calls.append(len(a[0]["pred_logits"])) or forward(*a, **k)
    out, targets, _ = _batch(0, [2, 1])
    for each in [out, *out["aux_outputs"]]:
        each["indices"] = forward(each, targets)
    Sam3Loss(batched=True, **settings).compute_loss(out, targets)
    # the final layer's one-to-many queries go to the one-to-many matcher; the aux layers' to this one
    assert calls == [(LAYERS - 1) * 2]  # one call, the aux layers' outputs stacked over the batch of 2


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_terms_are_the_eager_ones_for_any_number_of_objects(device: str) -> None:
    """`compiled: true` (with compile_model) runs the batched terms through torch.compile with dynamic
    shapes: same values and gradients as eager, and one compiled graph for batches with different
    numbers of objects and matched pairs."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = Sam3Loss(batched=True, compiled=True, **_settings())
    for seed, boxes_per_image in [(0, [2, 0, 3]), (1, [4, 1, 1]), (3, [5, 2, 2])]:
        eager, eager_grads = _losses(
            Sam3Loss(batched=True, **_settings()), seed, boxes_per_image, device=device
        )
        ours, our_grads = _losses(compiled, seed, boxes_per_image, device=device)
        assert list(ours) == list(eager)
        for key, value in eager.items():
            torch.testing.assert_close(ours[key], value, rtol=2e-6, atol=1e-6, msg=key)
        for ours_grad, eager_grad in zip(our_grads, eager_grads, strict=True):
            assert (ours_grad is None) == (eager_grad is None)
            if eager_grad is not None:  # inductor's fused kernels round differently (CUDA: 8e-7 seen)
                torch.testing.assert_close(ours_grad, eager_grad, rtol=1e-5, atol=2e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    with torch.no_grad():  # validation: eager, no second graph for the no-grad mode
        _batch_out, targets, _ = _batch(2, [1, 1, 2], device=device)
        for each in [_batch_out, *_batch_out["aux_outputs"]]:
            each["indices"] = compiled.matcher(each, targets)
        compiled.compute_loss(_batch_out, targets)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_focal_loss_with_gamma_0_leaves_the_triton_kernel() -> None:
    """compat's wrapper of sam3's sigmoid_focal_loss: PyTorch's branch off the GPU and for gamma 0
    (the presence loss's default) on it, where the Triton backward takes 0 ** -1 once a correct
    prediction saturates (sam3#575); Triton stays for gamma 2 on the GPU."""
    seen: list[bool] = []

    def focal(
        inputs: object, targets: object, num_boxes: float, alpha: float = 0.25, gamma: float = 2, **kw: bool
    ) -> None:
        seen.append(kw.get("triton", True))

    wrapped = compat._focal_loss_plain_where_kernel_fails(focal)
    on_gpu, on_cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    wrapped(on_gpu, None, 1, alpha=0.5, gamma=0.0)
    wrapped(on_gpu, None, 1, 0.5, 0.0)  # positional, as some callers pass them
    wrapped(on_gpu, None, 1, alpha=0.25, gamma=2)
    wrapped(on_gpu, None, 1)  # gamma's default: 2
    wrapped(on_cpu, None, 1, alpha=0.25, gamma=2)
    assert seen == [False, False, True, True, False]


@pytest.mark.parametrize("device", DEVICES)
def test_presence_loss_gradient_stays_finite_when_confident(device: str) -> None:
    """Confident, correct presence logits (beyond the sigmoid's float32 range) give a zero gradient,
    not nan, through the loss function every recipe's presence term calls."""
    from sam3.train.loss import loss_fns

    logits = torch.tensor([[18.0], [-18.0], [40.0], [2.0]], device=device, requires_grad=True)
    targets = torch.tensor([[1.0], [0.0], [1.0], [1.0]], device=device)
    loss_fns.sigmoid_focal_loss(logits, targets, num_boxes=4, alpha=0.5, gamma=0.0).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad[:3].abs().max() < 1e-7 < logits.grad[3].abs()  # only the unsure one moves
