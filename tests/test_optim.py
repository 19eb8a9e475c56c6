"""The optimizers `trainer.optimizer` names: same math as torch's AdamW, bf16 moments stay unbiased."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sam3ft.train import optim
from sam3ft.train.optim import AdamWBf16, make_optimizer, stochastic_round_

KERNEL_TESTS = Path(__file__).with_name("test_adamw_kernel.py")


def _train(kind: str, steps: int, seed: int = 0) -> tuple[torch.nn.Module, list[float]]:
    """A small regression fitted by `kind` with two param groups (as sam3's lr/wd groups)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    groups = [
        {"params": list(model[0].parameters()), "lr": 1e-2, "weight_decay": 0.1},
        {"params": list(model[2].parameters()), "lr": 3e-3, "weight_decay": 0.0},
    ]
    opt = make_optimizer(groups, kind, seed=seed)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def test_fused_adamw_equals_stock() -> None:
    a, la = _train("adamw", 30)
    b, lb = _train("adamw_fused", 30)
    assert la == pytest.approx(lb, rel=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_bf16_moments_follow_stock_adamw() -> None:
    """50 steps: loss within 1% of fp32 AdamW at every step (measured 0.3%), and each tensor's
    distance to the fp32 run under 5% of how far training moved it (measured <= 3.4%)."""
    torch.manual_seed(0)
    init = [p.detach().clone() for p in _train("adamw", 0)[0].parameters()]
    a, la = _train("adamw", 50)
    b, lb = _train("adamw_bf16", 50)
    assert la[-1] < 0.8 * la[0]  # it actually trains
    for step, (x, y) in enumerate(zip(la, lb, strict=True)):
        assert abs(x - y) <= 0.01 * x, f"step {step}: {x} vs {y}"
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), init, strict=True):
        assert (pa - pb).norm() < 0.05 * (pa - p0).norm()


def test_bf16_states_are_bf16_and_half_the_bytes() -> None:
    model, _ = _train("adamw_bf16", 2)
    opt = AdamWBf16(model.parameters())
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    states = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
    assert {t.dtype for t in states} == {torch.bfloat16}
    assert sum(t.numel() * t.element_size() for t in states) == 4 * sum(p.numel() for p in model.parameters())


def test_stochastic_rounding_is_unbiased_where_nearest_is_stuck() -> None:
    """v * 0.999 rounds back to v in bf16; stochastic rounding decays it on average."""
    v = torch.full((200_000,), 1.0, dtype=torch.bfloat16)
    decayed = v.float() * 0.999
    assert torch.equal(decayed.to(torch.bfloat16), v)  # nearest: no decay at all
    out = torch.empty_like(v)
    stochastic_round_(out, decayed, torch.Generator().manual_seed(0))
    assert set(out.float().unique().tolist()) <= {0.99609375, 1.0}  # the two neighbours
    assert out.float().mean().item() == pytest.approx(0.999, abs=2e-4)


def test_bf16_resume_matches_unbroken_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Noise is drawn from (seed, step, index): a state_dict round trip resumes bit-identically;
    chunking large tensors changes nothing."""
    monkeypatch.setattr(optim, "CHUNK", 100)  # several slices per weight matrix

    def run(break_at: int | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(32, 16)
        opt = AdamWBf16(model.parameters(), lr=1e-2, seed=3)
        x = torch.randn(8, 32)
        for step in range(6):
            if step == break_at:
                state = opt.state_dict()
                opt = AdamWBf16(model.parameters(), lr=1e-2, seed=3)
                opt.load_state_dict(state)  # torch casts the moments to fp32 here
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(None), run(3), strict=True):
        assert torch.equal(a, b)


def test_kernel_tests_pass_under_the_triton_interpreter() -> None:
    """tests/test_adamw_kernel.py runs the CUDA update's Triton kernel; on a machine without CUDA,
    Triton's interpreter runs it on the CPU. Interpretation must be on before Triton is first
    imported (its own library kernels are decorated then), so it gets a process of its own."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(KERNEL_TESTS)]
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"\b11 passed\b", run.stdout), run.stdout[-1000:]
    assert "skipped" not in run.stdout


def test_kernel_by_default_only_on_cuda_cards_with_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    assert optim.kernel_by_default(torch.device("cuda", 0))  # H100
    capability["value"] = (8, 0)
    assert optim.kernel_by_default(torch.device("cuda", 0))  # A100
    capability["value"] = (7, 5)
    assert not optim.kernel_by_default(torch.device("cuda", 0))  # T4: torch ops
    assert not optim.kernel_by_default(torch.device("cpu"))


def test_unknown_optimizer_is_named() -> None:
    with pytest.raises(ValueError, match="adamw_bf16"):
        make_optimizer([torch.zeros(1, requires_grad=True)], "sgd")


def test_every_name_params_accepts_builds_and_keeps_the_state_bytes_memory_and_disk_count():
    from sam3ft.params import OPTIMIZERS, STATE_BYTES

    for kind in OPTIMIZERS:
        param = torch.nn.Parameter(torch.zeros(1000))
        opt = make_optimizer([param], kind)
        (param * 2.0).sum().backward()
        opt.step()
        states = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
        assert sum(t.numel() * t.element_size() for t in states) == STATE_BYTES[kind] * 1000, kind


@pytest.mark.parametrize("inf", [False, True])
def test_bf16_torch_path_takes_grad_scalers_found_inf(inf: bool) -> None:
    """Off the kernel, GradScaler's found_inf is read on the host: an inf skips the step (weights
    and step counts as they were); finite gradients unscale to a plain step's weights."""
    torch.manual_seed(0)
    start = torch.randn(50)
    scaled, plain = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    weight = torch.randn(50)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = AdamWBf16([scaled], lr=1e-2, seed=1, kernel=False)
    scaler.scale((scaled * weight).sum()).backward()
    if inf:
        scaled.grad[7] = float("nan")
    scaler.step(opt)  # no unscale_ first: the optimizer divides by the scale it is handed
    scaler.update()
    if inf:
        assert torch.equal(scaled.detach(), start) and not opt.state[scaled]  # no state, no step counted
        assert scaler.get_scale() == 2.0**9
        return
    reference = AdamWBf16([plain], lr=1e-2, seed=1, kernel=False)
    plain.grad = weight.clone()
    reference.step()
    assert torch.equal(scaled.detach(), plain.detach())


def test_gradient_clipper_clips_as_sam3s() -> None:
    """The same clipped gradients as sam3's GradientClipper, a frozen weight left out, from its
    parameter list made at the first call."""
    from sam3.train.optim.optimizer import GradientClipper as Sam3Clipper

    from sam3ft.train.optim import GradientClipper

    grads = []
    for clipper in (Sam3Clipper(max_norm=0.5), GradientClipper(max_norm=0.5)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2))
        model[0].bias.requires_grad_(False)
        for _ in range(2):  # the second call reuses the list
            model.zero_grad(set_to_none=True)
            (model(torch.randn(4, 8)) ** 2).sum().backward()
            before = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            clipper(model=model)
        after = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        assert before.norm() > 0.5 and torch.cat([g.flatten() for g in after]).norm() <= 0.5 + 1e-6
        grads.append(after)
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_schedule_equals_upstream_and_survives_steps_equal_to_warmup() -> None:
    """Our schedule gives upstream's learning rate wherever upstream computes one, and one more
    where upstream divides by zero: a run of exactly `warmup_steps` steps."""
    from sam3.train.optim.schedulers import InverseSquareRootParamScheduler

    kwargs = {"base_lr": 8e-4, "warmup_steps": 4, "cooldown_steps": 4, "timescale": 20}
    ours, upstream = optim.InverseSquareRootSchedule(**kwargs), InverseSquareRootParamScheduler(**kwargs)
    compared = 0
    for total in (5, 12, 144):
        for step in range(total):
            where = step / total
            assert ours(step, where) == pytest.approx(upstream(step, where), rel=1e-12, abs=0.0)
            compared += 1
    assert compared == 161
    # 4 steps in all, warmup 4: upstream's unused progress divides by total - warmup = 0
    with pytest.raises(ZeroDivisionError):
        upstream(1, 1 / 4)
    lrs = [ours(step, step / 4) for step in range(4)]
    # warmup ramps step / 4; cooldown (4 - step) / 4; no decay before the warmup ends
    assert lrs == pytest.approx([8e-4 * (s / 4) * ((4 - s) / 4) for s in range(4)], rel=1e-12)
    assert lrs[2] > 0


def test_grad_scaler_counts_the_steps_it_skipped(caplog) -> None:
    """DeviceGradScaler counts the steps torch's update skipped on non-finite gradients (on the
    device) and says so once per epoch; a clean epoch says nothing."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = optim.DeviceGradScaler("cpu", init_scale=2.0**10)
    poison = [False, True, False, True, False]  # steps whose gradient holds an inf
    for bad in poison:
        opt.zero_grad()
        handle = model.weight.register_hook(lambda g: torch.full_like(g, float("inf"))) if bad else None
        scaler.scale(model(torch.ones(2, 4)).sum()).backward()
        if handle is not None:
            handle.remove()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0**8  # halved at each skipped step, as torch's
    with caplog.at_level("WARNING"):
        scaler.check_skipped(steps=len(poison), epoch=3)
        scaler.check_skipped(steps=len(poison), epoch=4)  # counted from zero again: nothing
    warned = [r.getMessage() for r in caplog.records if "skipped on non-finite" in r.getMessage()]
    assert warned == [
        "epoch 3: 2 optimizer steps (of 5 batches) skipped on non-finite gradients (GradScaler's scale "
        "now 256); a run skipping most steps learns nothing"
    ]
    assert all(torch.isfinite(p).all() for p in model.parameters())
