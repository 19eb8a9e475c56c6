"""adamw_bf16's Triton update (train/adamw_kernel.py): same weights as the torch path, unbiased
bf16 moments, bit-identical resume. Runs on CUDA where there is one; on the CPU under Triton's
interpreter, which tests/test_optim.py starts in a process of its own (TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

from sam3ft.train.optim import AdamWBf16

if os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"  # the interpreter runs the kernel on CPU tensors, with or without a GPU
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("no CUDA; tests/test_optim.py runs these under Triton's interpreter", allow_module_level=True)


def _one_step(kernel: bool, shapes: list[tuple[int, ...]], step: int) -> list[dict[str, torch.Tensor]]:
    """One update of fresh tensors (the same values both ways) at optimizer step `step`."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in shapes]
    opt = AdamWBf16(params, lr=1e-2, weight_decay=0.1, seed=5, kernel=kernel)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
        state = opt._state(p)
        state["exp_avg"].copy_(torch.randn(p.shape, generator=gen) * 0.1)
        state["exp_avg_sq"].copy_(torch.rand(p.shape, generator=gen) * 0.01)
        state["step"] += step - 1
    opt.step()
    return [{"param": p.detach().cpu(), **{k: t.cpu() for k, t in opt.state[p].items()}} for p in params]


def test_update_equals_torch_path() -> None:
    """Same weights (both update from the unrounded fp32 moments); the bf16 moments differ only in
    which neighbour the noise picked: at most one bf16 step apart. Sizes span one program, a
    partial one and several (BLOCK = 2048)."""
    shapes = [(7,), (64, 32), (3000,), (5, 1000)]
    torch_path, kernel = _one_step(False, shapes, step=4), _one_step(True, shapes, step=4)
    for a, b in zip(torch_path, kernel, strict=True):
        torch.testing.assert_close(b["param"], a["param"], rtol=1e-6, atol=1e-7)
        assert b["step"].item() == a["step"].item() == 4
        for key in ("exp_avg", "exp_avg_sq"):
            assert b[key].dtype == torch.bfloat16
            ulp = a[key].float().abs() * 2**-7  # one bf16 step at that magnitude
            assert ((b[key].float() - a[key].float()).abs() <= ulp).all()
    assert any(not torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in zip(torch_path, kernel, strict=True))


def test_rounding_is_unbiased() -> None:
    """A zero gradient decays v by beta2 = 0.999: nearest rounding would keep v at 1.0 forever."""
    param = torch.nn.Parameter(torch.zeros(20_000, device=DEVICE))
    param.grad = torch.zeros(20_000, device=DEVICE)
    opt = AdamWBf16([param], lr=0.0, seed=1, kernel=True)
    opt._state(param)["exp_avg_sq"].fill_(1.0)
    opt.step()
    v = opt.state[param]["exp_avg_sq"].float()
    assert set(v.unique().tolist()) == {0.99609375, 1.0}
    assert v.mean().item() == pytest.approx(0.999, abs=5e-4)


def _fit(
    kernel: bool | None, steps: int, break_at: int | None = None
) -> tuple[list[float], list[torch.Tensor]]:
    """A small regression with two param groups (as sam3's lr/wd groups); kernel None: torch AdamW.
    At `break_at` the optimizer is rebuilt from its state_dict, as a resumed run does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).to(DEVICE)

    def make() -> torch.optim.Optimizer:
        groups = [
            {"params": list(model[0].parameters()), "lr": 1e-2, "weight_decay": 0.1},
            {"params": list(model[2].parameters()), "lr": 3e-3, "weight_decay": 0.0},
        ]
        if kernel is None:
            return torch.optim.AdamW(groups)
        return AdamWBf16(groups, seed=3, kernel=kernel)

    opt = make()
    x, y = torch.randn(64, 16).to(DEVICE), torch.randn(64, 1).to(DEVICE)
    losses = []
    for step in range(steps):
        if step == break_at:
            state = opt.state_dict()
            opt = make()
            opt.load_state_dict(state)  # torch casts the moments to fp32 here
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, [p.detach().cpu() for p in model.parameters()]


def test_training_follows_fp32_adamw() -> None:
    """30 steps: the loss within 1% of torch's fp32 AdamW at every step."""
    stock, _ = _fit(None, 30)
    kernel, _ = _fit(True, 30)
    assert kernel[-1] < 0.8 * kernel[0]  # it trains
    for step, (a, b) in enumerate(zip(stock, kernel, strict=True)):
        assert abs(a - b) <= 0.01 * a, f"step {step}: {a} vs {b}"


def test_resume_is_bit_identical() -> None:
    _, unbroken = _fit(True, 6)
    _, resumed = _fit(True, 6, break_at=3)
    for a, b in zip(unbroken, resumed, strict=True):
        assert torch.equal(a, b)


def test_used_where_it_can_run() -> None:
    param = torch.nn.Parameter(torch.zeros(3, device=DEVICE))
    param.grad = torch.ones(3, device=DEVICE)
    group = AdamWBf16([param]).param_groups[0]
    expected = DEVICE == "cuda" and torch.cuda.get_device_capability() >= (8, 0)
    assert AdamWBf16([param])._use_kernel(group) == expected  # default: CUDA cards with native bf16
    assert not AdamWBf16([param], kernel=False)._use_kernel(group)
    assert AdamWBf16([param], kernel=True)._use_kernel(group)
    double = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64, device=DEVICE))
    double.grad = torch.ones(3, dtype=torch.float64, device=DEVICE)
    assert not AdamWBf16([double], kernel=True)._use_kernel(AdamWBf16([double]).param_groups[0])


def test_groups_and_step_counts_share_one_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two groups (other lr and weight decay) and a weight one step behind (it missed a gradient)
    update in one launch per step, each with its group's lr and its own step's bias correction."""
    from sam3ft.train import adamw_kernel

    launches = []

    class Counted:
        def __getitem__(self, grid: tuple[int]):
            launches.append(grid)
            return kernel[grid]

    kernel = adamw_kernel._adamw_bf16
    monkeypatch.setattr(adamw_kernel, "_adamw_bf16", Counted())

    shapes = ((300,), (50, 3), (4000,))

    def run(use_kernel: bool) -> tuple[list[torch.Tensor], AdamWBf16]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in shapes]
        groups = [
            {"params": params[:2], "lr": 1e-2, "weight_decay": 0.1},
            {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0},
        ]
        opt = AdamWBf16(groups, seed=2, kernel=use_kernel)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = None if (step == 1 and i == 1) else torch.randn(p.shape, generator=gen).to(DEVICE)
            opt.step()
        return [p.detach().cpu() for p in params], opt

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in shapes]  # as run() draws them
    torch_path, _ = run(False)
    assert not launches
    kernel_path, opt = run(True)
    assert len(launches) == 3  # one per step, all groups and step counts together
    assert [opt.state[p]["step"].item() for g in opt.param_groups for p in g["params"]] == [3, 2, 3]
    for first, a, b in zip(start, torch_path, kernel_path, strict=True):
        moved = (a - first).norm()  # rounding noise differs between the paths: ~2**-8 of the move
        assert (b - a).norm() <= 0.01 * moved, f"{(b - a).norm()} vs a move of {moved}"


def _scaled_step(inf: bool, unscale: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """One GradScaler step as sam3's trainer takes it (scale, backward, unscale_ before clipping,
    step, update) next to a plain step on copies; `inf` puts an inf into one gradient."""
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(s, generator=gen) for s in ((300,), (20, 7))]
    scaled = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in start]
    plain = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in start]
    weights = [torch.randn(t.shape, generator=gen).to(DEVICE) for t in start]
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**16)
    opt = AdamWBf16(scaled, lr=1e-2, seed=4, kernel=True)
    scaler.scale(sum((p * w).sum() for p, w in zip(scaled, weights, strict=True))).backward()
    if inf:
        scaled[1].grad[3, 2] = float("inf")
    if unscale:
        scaler.unscale_(opt)
    sync_mode = torch.cuda.get_sync_debug_mode() if DEVICE == "cuda" else None
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode("error")  # found_inf stays on the device
    try:
        scaler.step(opt)
    finally:
        if sync_mode is not None:
            torch.cuda.set_sync_debug_mode(sync_mode)
    scaler.update()
    reference = AdamWBf16(plain, lr=1e-2, seed=4, kernel=True)
    for p, w in zip(plain, weights, strict=True):
        p.grad = w.clone()
    reference.step()
    return [p.detach().cpu() for p in scaled], [p.detach().cpu() for p in plain], scaler.get_scale()


@pytest.mark.parametrize("unscale", [True, False])
def test_grad_scaler_hands_over_found_inf_and_scale(unscale: bool) -> None:
    """Finite gradients: the same weights as an unscaled step (scaling by 2**16 is exact), whether
    GradScaler unscaled them first (sam3 does, before clipping) or the optimizer does. An inf: the
    kernel leaves every weight as it was, and GradScaler halves its scale, as with torch's fused AdamW."""
    ours, plain, scale = _scaled_step(inf=False, unscale=unscale)
    assert all(torch.equal(a, b) for a, b in zip(ours, plain, strict=True))
    assert scale == 2.0**16
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(s, generator=gen) for s in ((300,), (20, 7))]
    ours, _, scale = _scaled_step(inf=True, unscale=unscale)
    assert all(torch.equal(a, b) for a, b in zip(ours, start, strict=True))
    assert scale == 2.0**15


def _clipped_steps(
    handover: bool, inf_at: int | None = None, steps: int = 3
) -> tuple[list[torch.Tensor], list[float]]:
    """`steps` steps as sam3's trainer takes them (scale, backward, unscale_, clip to 0.5, step,
    update) with adamw_bf16 on its kernel; `handover`: through DeviceGradScaler and a clipper that
    hands the clipping to the optimizer, else torch's GradScaler and clip_grad_norm_. `inf_at`: the
    step whose gradients get an inf. Returns the weights and the scale after each step."""
    from sam3ft.train.optim import DeviceGradScaler, GradientClipper

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Linear(64, 3)).to(DEVICE)
    groups = [
        {"params": list(model[0].parameters()), "lr": 1e-2, "weight_decay": 0.1},
        {"params": list(model[1].parameters()), "lr": 3e-3, "weight_decay": 0.0},
    ]
    opt = AdamWBf16(groups, seed=6, kernel=True)
    scaler = (DeviceGradScaler if handover else torch.amp.GradScaler)(DEVICE, init_scale=2.0**12)
    clipper = GradientClipper(max_norm=0.5)
    clipper.optimizer = opt if handover else None
    x, y = torch.randn(32, 40).to(DEVICE), torch.randn(32, 3).to(DEVICE)
    scales = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        scaler.scale(torch.nn.functional.mse_loss(model(x), y) * 50).backward()
        if step == inf_at:
            model[1].weight.grad[1, 2] = float("inf")
        sync_mode = torch.cuda.get_sync_debug_mode() if DEVICE == "cuda" else None
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("error")  # unscaling, clipping, the step: no host wait
        try:
            scaler.unscale_(opt)
            clipper(model=model)
            handed = opt._handed  # what the step takes over: both passes, or neither
            expected = (True, 0.5) if handover else (False, None)
            assert (handed.inv_scale is not None, handed.max_norm) == expected
            scaler.step(opt)
            scaler.update()
        finally:
            if sync_mode is not None:
                torch.cuda.set_sync_debug_mode(sync_mode)
        scales.append(scaler.get_scale())
    return [p.detach().cpu() for p in model.parameters()], scales


LR_MAX = 1e-2  # the larger of _clipped_steps' two group learning rates


def _assert_equal_up_to_rounding_flips(b: torch.Tensor, a: torch.Tensor, steps: int) -> None:
    """Weights of two paths whose gradients differ by float rounding only (a norm summed in another
    order: a few fp32 ulps). Both update from the same fp32 moments, so an element differs by a few
    ulps of its update, unless those ulps tipped a stochastic rounding of a bf16 moment the other
    way: that moment is then one bf16 step (2**-8 relative, 2**-9 for the root of v) off in every
    later update. Adam's normalised step |m/sqrt(v)| stays below 4 here, so each step can move such
    an element by at most LR_MAX * 4 * (2**-8 + 2**-9) more. Flips are rare (a few ulps against the
    2**16 ulps of fp32 between two bf16 values), whichever CPU or GPU computes the sums."""
    diff = (b - a).abs()
    assert (diff <= steps * LR_MAX * 4 * (2**-8 + 2**-9)).all(), f"max {diff.max()}"
    tight = diff <= 1e-6 + 1e-5 * a.abs()  # a few ulps of the update, relative to the weight
    assert tight.float().mean() >= 0.99, f"{(~tight).sum()} of {a.numel()} elements off by more than rounding"


def test_unscaling_and_clipping_in_the_update_equal_torchs_passes() -> None:
    """DeviceGradScaler and the clipper hand their passes to the kernel: the weights of torch's
    unscale_ + clip_grad_norm_ (the norm is summed in another order: within float rounding)."""
    torch_passes, scales = _clipped_steps(handover=False)
    in_kernel, scales_kernel = _clipped_steps(handover=True)
    for a, b in zip(torch_passes, in_kernel, strict=True):
        _assert_equal_up_to_rounding_flips(b, a, steps=3)
    assert scales == scales_kernel == [2.0**12] * 3


def test_an_inf_handed_to_the_update_skips_the_step_and_halves_the_scale() -> None:
    """An inf in step 1's gradients: that step leaves every weight as it was (the kernel writes
    GradScaler's found_inf, which its update reads), as torch's passes do."""
    torch_passes, scales = _clipped_steps(handover=False, inf_at=1)
    in_kernel, scales_kernel = _clipped_steps(handover=True, inf_at=1)
    assert scales == scales_kernel == [2.0**12, 2.0**11, 2.0**11]
    for a, b in zip(torch_passes, in_kernel, strict=True):
        _assert_equal_up_to_rounding_flips(b, a, steps=2)  # the skipped step moves nothing
    skipped, _ = _clipped_steps(handover=True, inf_at=2)  # the last step skipped: the weights of two
    two_steps, _ = _clipped_steps(handover=True, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(skipped, two_steps, strict=True))


def test_clipping_stays_with_torch_where_the_weights_differ() -> None:
    """A clipper over weights the optimizer does not hold (here: one more) clips itself."""
    from sam3ft.train.optim import GradientClipper

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)).to(DEVICE)
    opt = AdamWBf16(list(model[0].parameters()), kernel=True)
    clipper = GradientClipper(max_norm=1e-3)
    clipper.optimizer = opt
    (model(torch.randn(8, 4).to(DEVICE)) ** 2).sum().backward()
    clipper(model=model)
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert total <= 1e-3 * (1 + 1e-4)  # clipped in place, by torch
    assert opt._handed.max_norm is None
