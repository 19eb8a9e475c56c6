"""Training with the weights held in bf16 (`trainer.weight_dtype: bfloat16`, recipe
lean-bf16-in-backward): the update rounded stochastically onto them, the model built in bf16 with
its buffers exact, the refused combinations, and the memory estimate."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import recipe_trainer, write_params
from sam3ft import params
from sam3ft.errors import ConfigError
from sam3ft.io import write_json
from sam3ft.model.build import bundled_vocab
from sam3ft.model.load import load_trained
from sam3ft.model.spec import load_preset
from sam3ft.preflight import GB
from sam3ft.train import memory
from sam3ft.train.model import build_trainable_model, outside_autocast
from sam3ft.train.optim import AdamWBf16, InBackward


def _steps(weight: torch.Tensor, opt: torch.optim.Optimizer, steps: int) -> None:
    """`steps` AdamW steps on a constant gradient of 1 (each moves the weight by about -lr)."""
    for _ in range(steps):
        opt.zero_grad()
        weight.grad = torch.ones_like(weight)
        opt.step()


CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA (bench/gpu_tests.sh runs it on a GPU)"
)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_updates_below_half_a_bf16_step_still_move_the_weights(device: str) -> None:
    """At 1.0 a bf16 step is 2**-7; AdamW's update here is ~1e-4 per step. Rounded to nearest the
    weights would never move; rounded stochastically they follow fp32 AdamW on average. On CUDA,
    where adamw_bf16 defaults to its Triton kernel, bf16 weights take the torch-ops path."""
    reference = torch.nn.Parameter(torch.ones(50_000))
    _steps(reference, torch.optim.AdamW([reference], lr=1e-4, weight_decay=0.0), 300)
    moved = 1.0 - reference.mean().item()
    assert moved == pytest.approx(0.03, rel=0.01)
    assert torch.tensor(1.0 - 1e-4).to(torch.bfloat16).item() == 1.0  # nearest: stuck at 1.0

    weight = torch.nn.Parameter(torch.ones(50_000, dtype=torch.bfloat16, device=device))
    _steps(weight, AdamWBf16([weight], lr=1e-4, weight_decay=0.0), 300)
    assert weight.dtype is torch.bfloat16
    assert 1.0 - weight.float().mean().item() == pytest.approx(moved, rel=0.02)
    values = set(weight.float().unique().tolist())
    assert len(values) > 1  # each element its own rounding draws


def test_weight_decay_reaches_bf16_weights() -> None:
    weight = torch.nn.Parameter(torch.full((50_000,), 2.0, dtype=torch.bfloat16))
    opt = AdamWBf16([weight], lr=1e-3, weight_decay=0.1, kernel=False)
    for _ in range(100):
        opt.zero_grad()
        weight.grad = torch.zeros_like(weight)  # no gradient: only the decay moves it
        opt.step()
    assert weight.float().mean().item() == pytest.approx(2.0 * (1 - 1e-4) ** 100, rel=2e-4)


def test_in_backward_trains_bf16_weights_and_frees_their_gradients() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    opt = InBackward([{"params": list(model.parameters()), "lr": 3e-3, "weight_decay": 0.0}], "adamw_bf16")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=generator)
    y = x[:, :1] * 2 - x[:, 1:2]
    losses = []
    for _ in range(200):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        assert all(p.grad is None for p in model.parameters())  # each stepped and freed in the backward
        opt.step()
        losses.append(loss.item())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(losses[-10:]) < 0.2 * sum(losses[:10])


def test_the_model_is_built_in_bf16_with_exact_buffers(tmp_path) -> None:
    """Every parameter bf16; buffers (RoPE's complex tables, position grids) as in the fp32 build;
    a forward and backward through the image backbone under bf16 autocast gives bf16 gradients."""
    spec = tmp_path / "model_spec.yaml"  # as fetch writes it
    write_json(spec, load_preset("tiny").to_dict())
    fp32 = build_trainable_model(str(spec), str(bundled_vocab()), ["trunk", "neck"], init_seed=0)
    bf16 = build_trainable_model(
        str(spec), str(bundled_vocab()), ["trunk", "neck"], weight_dtype="bfloat16", init_seed=0
    )
    kept = {id(p) for p in outside_autocast(bf16)}
    assert kept  # the decoder layers' feed-forward linears
    for (name, a), (_, b) in zip(fp32.named_parameters(), bf16.named_parameters(), strict=True):
        assert b.dtype == (torch.float32 if id(b) in kept else torch.bfloat16), name
        assert torch.equal(a.to(b.dtype), b), name
    buffers = dict(fp32.named_buffers())
    for name, buffer in bf16.named_buffers():
        assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = bf16.backbone.forward_image(image)["vision_features"]
    features.float().square().mean().backward()
    grads = [p.grad for p in bf16.backbone.parameters() if p.grad is not None]
    assert grads and {g.dtype for g in grads} == {torch.bfloat16}
    assert all(torch.isfinite(g).all() for g in grads)


def test_what_sam3_runs_outside_autocast_stays_float32(tmp_path, monkeypatch) -> None:
    """sam3's decoder layers switch CUDA autocast off around their feed-forward linears, whose input
    is then float32: with bf16 weights there the GPU run failed ("mat1 and mat2 must have the same
    dtype"). Here sam3's `autocast(device_type="cuda", enabled=False)` switches the CPU's autocast
    off instead, so the same code path runs: the layer's feed-forward answers in float32 and
    back-propagates into its float32 weights."""
    from sam3.model.decoder import TransformerDecoderLayer

    real = torch.amp.autocast
    monkeypatch.setattr(torch.amp, "autocast", lambda device_type, *a, **k: real("cpu", *a, **k))
    spec = tmp_path / "model_spec.yaml"
    write_json(spec, load_preset("tiny").to_dict())
    model = build_trainable_model(
        str(spec), str(bundled_vocab()), ["decoder"], weight_dtype="bfloat16", init_seed=0
    )
    layer = next(m for m in model.modules() if isinstance(m, TransformerDecoderLayer))
    # the layer norm after the linears: CUDA's autocast runs it in float32 (weights cast), the
    # CPU's does not cast a bf16 weight for a float32 input; not what this test is about
    monkeypatch.setattr(layer, "norm3", torch.nn.Identity())
    tgt = torch.randn(4, 1, layer.linear1.in_features, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer.forward_ffn(tgt)
    out.square().mean().backward()
    assert out.dtype == torch.float32
    assert layer.linear1.weight.grad.dtype == layer.linear2.weight.grad.dtype == torch.float32
    assert torch.isfinite(tgt.grad).all()


def _trainer(tmp_path, shipped_params, **changes) -> params.Trainer:
    gpu = {"recipe": "lean-bf16-in-backward", "num_gpus": 1, "amp": True}
    shipped_params["trainer"].update({**gpu, **changes})
    return params.load(["trainer"], write_params(tmp_path / "params.yaml", shipped_params)).trainer


def test_recipe_loads_on_a_gpu(tmp_path, shipped_params) -> None:
    trainer = _trainer(tmp_path, shipped_params)
    assert trainer.weight_dtype == "bfloat16" and trainer.optimizer == "adamw_bf16_in_backward"


@pytest.mark.parametrize(
    ("changes", "key", "fix"),
    [
        (
            {"optimizer": "adamw"},
            "trainer.optimizer",
            "adamw_bf16 or adamw_bf16_in_backward with trainer.weight_dtype",
        ),
        ({"num_gpus": 0, "amp": False}, "trainer.weight_dtype", "float32 on the CPU"),
        ({"amp": False}, "trainer.amp", "true with trainer.amp_dtype bfloat16"),
        ({"ema_decay": 0.99}, "trainer.ema_decay", "0 with trainer.weight_dtype bfloat16"),
        ({"weight_dtype": "float16"}, "trainer.weight_dtype", "float32 or bfloat16"),
    ],
)
def test_bad_combinations_are_refused_naming_the_key(tmp_path, shipped_params, changes, key, fix) -> None:
    with pytest.raises(ConfigError, match=rf"{key}=.* is invalid") as err:
        _trainer(tmp_path, shipped_params, **changes)
    assert err.value.key == key and err.value.fix is not None and fix in err.value.fix


def test_memory_estimate_halves_weights_and_gradients() -> None:
    """bf16 weights: 2 B per weight (and gradient element) instead of 4, no autocast copies, plus
    the torch-ops update's temporaries; the full model's estimate at batch 1 falls under 8 GB."""
    trainer = SimpleNamespace(
        amp=True, autocast_cache=True, optimizer="adamw_bf16_in_backward", trainable=list(params.GROUPS)
    )
    trainer.lora_rank, trainer.batch_size, trainer.ddp_one_process = 0, 1, False
    trainer.num_gpus = trainer.num_nodes = 1
    sam3 = load_preset("sam3")
    total, trainable, largest = 840 * 10**6, 830 * 10**6, 50 * 10**6
    trainer.weight_dtype = "float32"
    fp32, _ = memory.training_peak_gb(sam3, total, trainable, trainer, largest)
    trainer.weight_dtype = "bfloat16"
    bf16, how = memory.training_peak_gb(sam3, total, trainable, trainer, largest)
    # at batch 1 the forward pass sets the peak, before any gradient: weights and autocast's copies
    saved = (2 * total + 2 * total) / GB - memory.STEP_TEMPORARIES_GB
    assert fp32 - bf16 == pytest.approx(saved) and "bf16 weights" in how
    trainer = recipe_trainer("lean-bf16-in-backward", "sam3", batch_size=1)
    total, trainable, largest = memory.param_sizes(sam3, bundled_vocab(), trainer.trainable, 0)
    assert memory.training_peak_gb(sam3, total, trainable, trainer, largest)[0] < 8.0


def test_a_bf16_checkpoint_loads_in_float32_for_evaluate_and_export(tmp_path) -> None:
    """The trainer saves the bf16 weights; evaluate and export build the float32 model from them."""
    base = tmp_path / "base"
    base.mkdir()
    write_json(base / "model_spec.yaml", load_preset("tiny").to_dict())
    shutil.copyfile(bundled_vocab(), base / bundled_vocab().name)
    trained = build_trainable_model(
        str(base / "model_spec.yaml"), str(bundled_vocab()), ["heads"], weight_dtype="bfloat16", init_seed=0
    )
    torch.save({"model": trained.state_dict(), "epoch": 0}, tmp_path / "checkpoint.pt")
    model, _ = load_trained(base, tmp_path / "checkpoint.pt")
    state = model.state_dict()
    for name, param in trained.named_parameters():
        assert state[name].dtype is torch.float32 and torch.equal(state[name], param.float()), name
