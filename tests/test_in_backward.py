"""Optimizers stepped inside the backward pass (`*_in_backward`, train/optim.py InBackward): the same
weights as the ordinary step, gradients freed, exact resume, refused combinations, memory estimate."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import write_params
from sam3ft import params
from sam3ft.errors import ConfigError
from sam3ft.model.build import bundled_vocab
from sam3ft.model.spec import load_preset
from sam3ft.preflight import GB
from sam3ft.train import memory
from sam3ft.train.optim import AdamWBf16, InBackward, make_optimizer

LRS = [(1e-2, 3e-3), (5e-3, 1e-3), (2e-3, 4e-4), (1e-3, 1e-4)]  # per step, per group: a schedule


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))


def _groups(model: torch.nn.Module) -> list[dict]:
    """Two groups as sam3's lr / weight-decay groups."""
    return [
        {"params": list(model[0].parameters()), "lr": 1e-2, "weight_decay": 0.1},
        {"params": list(model[2].parameters()), "lr": 3e-3, "weight_decay": 0.0},
    ]


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(64, 16, generator=generator), torch.randn(64, 1, generator=generator)


def _run(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    clip: Callable[[int, list[torch.Tensor]], None] | None = None,
) -> None:
    """Steps as sam3's trainer runs them, with a schedule setting each group's lr every step: before
    the backward (where an in-backward optimizer needs it), which for the ordinary step is the same as
    upstream's after it. `clip(step, params)`: how the ordinary step clips the gradients."""
    for step in steps:
        for group, lr in zip(opt.param_groups, LRS[step % len(LRS)], strict=True):
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        x, y = _batch(step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if clip is not None and not isinstance(opt, InBackward):
            clip(step, list(model.parameters()))
        opt.step()


def test_in_backward_gives_the_ordinary_steps_weights_exactly() -> None:
    """torch AdamW over one tensor runs the same per-tensor ops (single-tensor path on the CPU) in
    the backward as in the ordinary step, so the weights are bitwise equal, schedule included."""
    ordinary, in_backward = _model(), _model()
    _run(ordinary, make_optimizer(_groups(ordinary), "adamw"), range(6))
    _run(in_backward, make_optimizer(_groups(in_backward), "adamw_in_backward"), range(6))
    for a, b in zip(ordinary.parameters(), in_backward.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(_model()[0].weight, in_backward[0].weight)  # the steps moved the weights


def test_bf16_in_backward_is_adamw_bf16_per_tensor() -> None:
    """adamw_bf16 in the backward equals one AdamWBf16 per weight tensor (its seed: the tensor's
    position) stepped after the backward: the same bf16 moments and rounding noise."""
    ordinary, in_backward = _model(), _model()
    per_tensor = []
    for index, (group, param) in enumerate((g, p) for g in _groups(ordinary) for p in g["params"]):
        hyper = {k: v for k, v in group.items() if k != "params"}
        per_tensor.append(AdamWBf16([{"params": [param], **hyper}], seed=7 * 1_000_003 + index))
    for step in range(6):
        for opt, group_index in zip(per_tensor, (0, 0, 1, 1), strict=True):
            opt.param_groups[0]["lr"] = LRS[step % len(LRS)][group_index]
        x, y = _batch(step)
        ordinary.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(ordinary(x), y).backward()
        for opt in per_tensor:
            opt.step()
    _run(in_backward, make_optimizer(_groups(in_backward), "adamw_bf16_in_backward", seed=7), range(6))
    for a, b in zip(ordinary.parameters(), in_backward.parameters(), strict=True):
        assert torch.equal(a, b)


def test_gradients_are_freed_in_the_backward() -> None:
    model = _model()
    opt = make_optimizer(_groups(model), "adamw_bf16_in_backward")
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert [p.grad for p in model.parameters()] == [None] * 4
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(int(s["step"]) == 1 for s in opt.state.values()) and len(opt.state) == 4


MAX_NORM = 0.05  # below these gradients' norms (~1): every mode clips every step


def _per_tensor(step: int, params: list[torch.Tensor]) -> None:
    for p in params:
        torch.nn.utils.clip_grad_norm_([p], max_norm=MAX_NORM)


def _budget(step: int, params: list[torch.Tensor]) -> None:
    total = sum(p.numel() for p in params)
    for p in params:
        torch.nn.utils.clip_grad_norm_([p], max_norm=MAX_NORM * math.sqrt(p.numel() / total))


def _lagged() -> Callable[[int, list[torch.Tensor]], None]:
    """Global clipping by the previous step's global norm; the first step as _budget."""
    norms: list[torch.Tensor] = []

    def clip(step: int, params: list[torch.Tensor]) -> None:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.square().sum() for p in params]).sum().sqrt())
        if not norms:
            _budget(step, params)
        else:
            for p in params:
                p.grad.mul_((MAX_NORM / (norms[-1] + 1e-6)).clamp(max=1.0))
        norms.append(norm)

    return clip


def _in_backward_run(clip: str) -> torch.nn.Module:
    model = _model()
    opt = make_optimizer(_groups(model), "adamw_in_backward")
    assert isinstance(opt, InBackward)
    opt.max_norm, opt.clip = MAX_NORM, clip
    _run(model, opt, range(4))
    return model


@pytest.mark.parametrize(("clip", "reference"), [("tensor", _per_tensor), ("budget", _budget)])
def test_clipping_in_backward_per_tensor_modes(clip: str, reference: Any) -> None:
    """trainer.grad_clip with an in-backward optimizer, clip "tensor": each gradient to max_norm on
    its own; "budget": each to max_norm x sqrt(its share of the elements). Bitwise the ordinary step
    after the same clipping."""
    ordinary = _model()
    _run(ordinary, make_optimizer(_groups(ordinary), "adamw"), range(4), clip=reference)
    for a, b in zip(ordinary.parameters(), _in_backward_run(clip).parameters(), strict=True):
        assert torch.equal(a, b)


def test_lagged_clipping_uses_the_previous_backwards_global_norm() -> None:
    """The default, "lagged": the first step clips as "budget", each later one scales every gradient
    by min(1, max_norm / the previous step's global norm). Equal to the ordinary step clipped so up
    to float rounding (the norm sums in the backward's order); and each mode gives other weights."""
    ordinary = _model()
    _run(ordinary, make_optimizer(_groups(ordinary), "adamw"), range(4), clip=_lagged())
    lagged = _in_backward_run("lagged")
    assert InBackward.clip == "lagged"
    for a, b in zip(ordinary.parameters(), lagged.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for other in ("budget", "tensor"):
        pairs = zip(lagged.parameters(), _in_backward_run(other).parameters(), strict=True)
        assert max((a - b).abs().max() for a, b in pairs) > 1e-4  # beyond the rounding tolerated above


def test_lagged_clipping_leaves_a_non_finite_gradient_out_of_the_norm() -> None:
    model = _model()
    opt = make_optimizer(_groups(model), "adamw_in_backward")
    assert isinstance(opt, InBackward)
    opt.max_norm = MAX_NORM
    model[2].weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    _run(model, opt, range(2))
    assert opt._scale is not None and torch.isfinite(opt._scale) and 0 < float(opt._scale) < 1
    assert torch.isfinite(model[0].weight).all() and float(opt.skipped) == 2.0


@pytest.mark.parametrize("kind", ["adamw_in_backward", "adamw_bf16_in_backward"])
def test_a_non_finite_gradient_skips_its_weight_only(kind: str) -> None:
    """No GradScaler runs with an in-backward optimizer, so none skips the step whose gradients hold
    an inf or nan: the optimizer skips each such weight itself (its weight and moments unchanged),
    steps the others, and counts the skips."""
    model = _model()
    opt = make_optimizer(_groups(model), kind)
    assert isinstance(opt, InBackward)
    _run(model, opt, range(2))
    poisoned = model[2].weight
    before = {id(p): p.detach().clone() for p in model.parameters()}
    moments = {k: v.clone() for k, v in opt.state[poisoned].items()}
    poisoned.register_hook(lambda grad: torch.full_like(grad, float("nan")))  # runs before the step
    _run(model, opt, range(2, 3))
    assert torch.equal(poisoned, before[id(poisoned)])
    assert torch.equal(opt.state[poisoned]["exp_avg"], moments["exp_avg"])
    assert torch.equal(opt.state[poisoned]["exp_avg_sq"], moments["exp_avg_sq"])
    moved = [p for p in model.parameters() if p is not poisoned]
    assert all(not torch.equal(p, before[id(p)]) and torch.isfinite(p).all() for p in moved)
    assert opt.skipped is not None and float(opt.skipped) == 1.0


def test_an_epoch_with_many_skipped_updates_stops_training(caplog) -> None:
    """A few skipped updates in an epoch are logged; more than SKIPPED_LIMIT of them stop training
    with an error naming the optimizer and the recipe to use instead, and the count starts over."""
    model = _model()
    opt = make_optimizer(_groups(model), "adamw_bf16_in_backward")
    assert isinstance(opt, InBackward)
    opt.check_skipped(steps=4, epoch=0)  # nothing ran: nothing to say
    opt.skipped = torch.tensor(1.0)  # 1 of 4 steps x 4 tensors x 100 epochs' worth: under 1%
    opt.check_skipped(steps=400, epoch=0)
    assert "1 of 1600 weight updates (0.1%) skipped" in caplog.text
    assert opt.skipped is None
    opt.skipped = torch.tensor(3.0)  # 3 of 16 updates
    with pytest.raises(FloatingPointError, match=r"epoch 2: 3 of 16 .* adamw_bf16_in_backward.*recipe lean"):
        opt.check_skipped(steps=4, epoch=2)


@pytest.mark.parametrize("clip", [None, MAX_NORM])
@pytest.mark.parametrize("kind", ["adamw_in_backward", "adamw_bf16_in_backward"])
def test_state_dict_round_trip_resumes_exactly(kind: str, clip: float | None) -> None:
    """Saved after 3 steps (through torch.save, as a checkpoint) and loaded into a fresh model and
    optimizer, 3 more steps give the unbroken run's weights and states, bit for bit; with clipping
    the saved "lagged" factor clips the first resumed step as the unbroken run's."""
    unbroken = _model()
    opt = make_optimizer(_groups(unbroken), kind, seed=3)
    assert isinstance(opt, InBackward)
    opt.max_norm = clip
    _run(unbroken, opt, range(3))
    buffer = io.BytesIO()
    torch.save({"model": unbroken.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model(seed=1)  # other weights until loaded
    resumed.load_state_dict(saved["model"])
    resumed_opt = make_optimizer(_groups(resumed), kind, seed=3)
    assert isinstance(resumed_opt, InBackward)
    resumed_opt.max_norm = clip
    resumed_opt.load_state_dict(saved["optimizer"])
    assert ("clip_scale" in saved["optimizer"]) is (clip is not None)
    assert {s["exp_avg"].dtype for s in resumed_opt.state.values()} == {
        torch.bfloat16 if "bf16" in kind else torch.float32
    }
    _run(unbroken, opt, range(3, 6))
    _run(resumed, resumed_opt, range(3, 6))
    for a, b in zip(unbroken.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    for key, state in opt.state_dict()["state"].items():
        other = resumed_opt.state_dict()["state"][key]
        assert all(torch.equal(state[k], other[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def _trainer(tmp_path, shipped_params, **changes) -> params.Trainer:
    shipped_params["trainer"].update({"recipe": "lean-in-backward", "num_gpus": 0, **changes})
    return params.load(["trainer"], write_params(tmp_path / "params.yaml", shipped_params)).trainer


def test_lean_8gb_recipe_loads(tmp_path, shipped_params) -> None:
    trainer = _trainer(tmp_path, shipped_params)
    assert trainer.optimizer == "adamw_bf16_in_backward" and trainer.ddp_one_process is False


@pytest.mark.parametrize(
    ("changes", "key", "fix"),
    [
        ({"grad_accum": 2}, "trainer.grad_accum", "use 1 with trainer.optimizer adamw_bf16_in_backward"),
        (
            {"num_gpus": 1, "amp": True, "amp_dtype": "float16"},
            "trainer.amp_dtype",
            "use bfloat16 with trainer.optimizer adamw_bf16_in_backward",
        ),
        ({"num_gpus": 2}, "trainer.num_gpus", "use 0 or 1 with trainer.num_nodes 1"),
        ({"ddp_one_process": True}, "trainer.ddp_one_process", "use false with trainer.optimizer"),
    ],
)
def test_bad_combinations_are_refused_naming_the_key(tmp_path, shipped_params, changes, key, fix) -> None:
    with pytest.raises(ConfigError, match=rf"{key}=.* is invalid") as err:
        _trainer(tmp_path, shipped_params, **changes)
    assert err.value.key == key and err.value.fix is not None and fix in err.value.fix


def test_memory_estimate_counts_one_gradient_tensor() -> None:
    """Without DDP the peak is the larger of the forward pass's (no gradients yet) and the end of the
    backward pass's (weights, gradients, moments): in the backward only the largest tensor's gradient
    is held, so only the second term drops, by 4 B x (trainable - largest)."""
    trainer = SimpleNamespace(
        amp=True, autocast_cache=False, optimizer="adamw_bf16", trainable=list(params.GROUPS)
    )
    trainer.lora_rank, trainer.batch_size, trainer.ddp_one_process = 0, 1, False
    trainer.num_gpus = trainer.num_nodes = 1
    sam3, act = load_preset("sam3"), memory.MEASURED["sam3"]
    total, trainable, largest = 840 * 10**6, 830 * 10**6, 50 * 10**6
    no_grads = (4 * total + 4 * trainable) / GB  # fp32 weights, bf16 moments
    forward = no_grads + act.constant_gb + act.trunk_backward_gb  # batch 1
    backward_end = no_grads + act.backward_end_gb + act.constant_gb  # plus the gradients held
    lean, _ = memory.training_peak_gb(sam3, total, trainable, trainer, largest)
    assert lean == pytest.approx(max(forward, backward_end + 4 * trainable / GB))
    trainer.optimizer = "adamw_bf16_in_backward"
    in_backward, how = memory.training_peak_gb(sam3, total, trainable, trainer, largest)
    assert in_backward == pytest.approx(max(forward, backward_end + 4 * largest / GB))
    assert in_backward < lean and "adamw_bf16_in_backward" in how
    unknown, _ = memory.training_peak_gb(sam3, total, trainable, trainer)  # largest unknown: all counted
    assert unknown == pytest.approx(lean)


def test_largest_trainable_tensor_is_counted() -> None:
    """param_sizes' third count is the largest trainable tensor of the model the trainer builds."""
    total, trainable, largest = memory.param_sizes(load_preset("tiny"), bundled_vocab(), ["heads"], 0)
    assert 0 < largest <= trainable < total
    assert (total, trainable) == memory.param_counts(load_preset("tiny"), bundled_vocab(), ["heads"], 0)


def test_deepcopy_is_not_needed_for_independent_runs() -> None:
    """Two in-backward optimizers on two models do not step each other's weights (hooks are per tensor)."""
    a, b = _model(), _model()
    make_optimizer(_groups(a), "adamw_in_backward")
    b_before = copy.deepcopy(b.state_dict())
    x, y = _batch(0)
    torch.nn.functional.mse_loss(a(x), y).backward()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in b_before.items())


class _Schedule:
    """A learning rate per step, called as sam3's schedulers are (step and where)."""

    def __call__(self, step: int, where: float) -> float:
        return 1e-2 / (1 + step)


def test_trainer_sets_the_schedule_before_the_backward() -> None:
    """Our Trainer's step (sam3's train_epoch sets lrs only after the backward) with adamw_in_backward
    gives the weights of torch's AdamW stepped after the backward at each step's scheduled lr."""
    from sam3.train.optim.optimizer import Optimizer as Sam3Optimizer

    from sam3ft.train.trainer import Trainer
    from test_trainer_step import _batches, _meters
    from test_trainer_step import _trainer as stub_trainer

    trainer = stub_trainer(Trainer, sync_once=True)
    reference = copy.deepcopy(trainer.model)
    inner = make_optimizer([{"params": list(trainer.model.parameters())}], "adamw_in_backward")
    trainer.optim = Sam3Optimizer(inner, schedulers=[{"lr": _Schedule()}])  # sets step 0's lr
    trainer.epoch, trainer.max_epochs, trainer._epoch_steps = 0, 1, 3  # as train_epoch sets them
    ordinary = torch.optim.AdamW(reference.parameters(), weight_decay=1e-2)
    loss_mts, extra_mts = _meters()
    for step, (x, target) in enumerate(_batches(3)):
        trainer._run_step((x, target), "train", loss_mts, extra_mts)
        trainer.optim.step_schedulers(step / 3, step=step)  # upstream's, after the backward
        trainer.optim.optimizer.step()  # nothing left to step
        assert all(p.grad is None for p in trainer.model.parameters())
        out = reference(x)  # the stub's loss (tests/test_trainer_step.py `_step`)
        loss = ((out - target) ** 2).mean() * 2 + out.abs().mean()
        ordinary.zero_grad(set_to_none=True)
        loss.backward()
        ordinary.param_groups[0]["lr"] = _Schedule()(step, step / 3)
        ordinary.step()
    for a, b in zip(reference.parameters(), trainer.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_trainer_hands_clipping_to_the_optimizer_and_drops_the_scaler(monkeypatch) -> None:
    """No GradScaler (bf16 needs none) and trainer.grad_clip clips each tensor in the backward."""
    from test_trainer_step import set_up_with

    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(3))], "adamw_bf16_in_backward")
    trainer = set_up_with(monkeypatch, optimizer, scaler_enabled=True)
    assert not trainer.scaler.is_enabled() and trainer.gradient_clipper is None
    assert isinstance(optimizer, InBackward) and optimizer.max_norm == pytest.approx(0.1)
