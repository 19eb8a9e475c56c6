"""Each recipe in configs/recipes/ trains the tiny preset on CPU through the train stage, and does
what it says: bf16 moments, frozen trunk, LoRA adapters merged into sam3's own key layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sam3ft import params
from sam3ft.stages import evaluate
from sam3ft.train.logging import read_steps
from test_train import finish, train, workspace

pytestmark = pytest.mark.slow


def _losses(run: Path) -> list[float]:
    rows = (run / "train/dvclive-steps/plots/metrics/step/loss.tsv").read_text().splitlines()[1:]
    return [float(row.split("\t")[-1]) for row in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request) -> dict[str, Path]:
    """One epoch of the bundled sample per recipe (6 steps of 4 images), same seed for all; plus stock
    with one device read per step and lean with upstream's activation checkpointing of the text and
    geometry encoders but none in the DETR layers (each must train and log exactly as its recipe),
    lean with upstream's per-layer loss, and lean with the ViT trunk compiled (inductor on the CPU:
    about a minute more)."""
    shipped = params.read_params(Path(request.config.rootpath) / "params.yaml")
    # bf16 weights need CUDA's autocast: tests/test_bf16_weights.py covers that recipe's parts on the CPU
    on_cpu = [name for name in params.recipes() if params.load_recipe(name).get("weight_dtype") != "bfloat16"]
    variants = {name: (name, {}) for name in on_cpu}
    variants["stock+sync_once"] = ("stock", {"sync_once": True})
    variants["lean+ckpt_switched"] = (
        "lean",
        {"act_ckpt_text": True, "act_ckpt_geometry": True, "act_ckpt_detr": False},
    )
    variants["lean+unbatched_loss"] = ("lean", {"batched_loss": False})
    variants["lean+compiled"] = ("lean", {"compile_trunk": True, "compile_layers": True})
    out = {}
    for name, (recipe, extra) in variants.items():
        root = tmp_path_factory.mktemp(name.replace("+", "-"))
        shipped_copy = json.loads(json.dumps(shipped))
        path = workspace(root, shipped_copy, max_epochs=1, batch_size=4, recipe=recipe, **extra)
        finish(train(path))
        out[name] = root
    return out


def _ckpt(run: Path) -> dict:
    return torch.load(run / "train/checkpoint.pt", weights_only=True)


def test_recipes_train_from_the_same_start(runs):
    assert set(runs) >= {"stock", "lean", "frozen-trunk", "lora"}
    # inductor may reassociate floats: the compiled run's first step has its own test below
    first = {name: _losses(run)[0] for name, run in runs.items() if name != "lean+compiled"}
    # step 0 precedes any update: equal for all, up to float summation order (the batched loss adds
    # the decoder layers' terms in another order than upstream's per-layer loss)
    assert max(first.values()) - min(first.values()) <= 1e-6 * max(first.values()), first
    for name, run in runs.items():
        losses = _losses(run)
        assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses))), name


@pytest.mark.parametrize(
    ("recipe", "variant", "settings"),
    [
        # only when the host waits for the GPU moves
        ("stock", "stock+sync_once", ["sync_once: true"]),
        # lean keeps the text and geometry encoders' activations and re-runs the DETR layers in the
        # backward (dropout included), the variant the other way round
        (
            "lean",
            "lean+ckpt_switched",
            ["act_ckpt_text: true", "act_ckpt_geometry: true", "act_ckpt_detr: false"],
        ),
    ],
)
def test_variant_trains_and_logs_exactly_as_its_recipe(runs, recipe, variant, settings):
    """Every step's logged values, the epoch's loss meters and the trained weights are identical."""
    base, other = runs[recipe], runs[variant]
    for setting in settings:
        assert setting in (other / "train/run/trainer_config.yaml").read_text()
        assert setting not in (base / "train/run/trainer_config.yaml").read_text()
    stats = "train/run/train_stats.json"
    assert (base / stats).read_text() == (other / stats).read_text()
    # every step's values; sync_once reads a step's losses in the next step, after its lr was logged
    steps = [read_steps(run / "scratch/train/logs/steps.jsonl") for run in (base, other)]
    assert steps[0] == steps[1] and {"loss", "lr_group0"} <= set(steps[0][5])
    a, b = _ckpt(base)["model"], _ckpt(other)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _steps(run: Path) -> list[tuple[int, str, float]]:
    lines = (run / "scratch/train/logs/steps.jsonl").read_text().splitlines()
    return [(row["step"], row["name"], row["value"]) for row in map(json.loads, lines)]


def test_batched_loss_logs_the_same_terms_as_upstreams_per_layer_loss(runs):
    """`batched_loss: true` (lean) against upstream's Sam3LossWrapper: the same terms in the same
    order at every step, equal up to float summation order (tests/test_loss.py compares one step);
    through six updates they stay within 3e-7 of each other on the CPU."""
    batched, upstream = runs["lean"], runs["lean+unbatched_loss"]
    assert "batched: true" in (batched / "train/run/trainer_config.yaml").read_text()
    assert "batched: false" in (upstream / "train/run/trainer_config.yaml").read_text()
    ours, theirs = _steps(batched), _steps(upstream)
    assert [(s, n) for s, n, _ in ours] == [(s, n) for s, n, _ in theirs]
    # tiny has 2 decoder layers: the final one and aux_0
    assert {n for _, n, _ in ours} >= {"loss", "loss_ce_aux_0_o2m", "ce_f1", "presence_dec_acc_aux_0"}
    for (step, name, a), (_, _, b) in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (step, name, a, b)


def test_compiled_trunk_and_layers_train_the_same_function(runs):
    """`compile_trunk: true` and `compile_layers: true` train what eager lean trains. Inductor draws
    the compiled layers' dropout masks (p = 0.1 in tiny's encoder and decoder) from its own
    generator, so the losses are close, not equal, from the first step on (tests/test_model.py
    compares the compiled layers with dropout off)."""
    eager, compiled = _losses(runs["lean"]), _losses(runs["lean+compiled"])
    config = (runs["lean+compiled"] / "train/run/trainer_config.yaml").read_text()
    assert "compile_trunk: true" in config and "compile_layers: true" in config
    assert all(abs(x - y) <= 0.1 * x for x, y in zip(eager, compiled, strict=True)), (eager, compiled)


def test_compiled_training_forward_trains_what_eager_lean_trains(runs, tmp_path, monkeypatch, request):
    """`compile_model: true` through the train stage: the whole training forward goes through dynamo
    (train/model.compile_training_forward, the trainer's eager first step) and so do the loss's
    batched terms, and every step's loss equals eager lean's. The stage runs in this process, so
    that torch.compile can be given a backend that records each graph and runs it through AOT
    autograd with eager kernels ("aot_eager", the path inductor takes, without its code generation,
    to keep the suite short; dynamo's plain "eager" backend, without AOT autograd, gave other
    gradients)."""
    import torch._dynamo
    from torch._dynamo.backends.registry import lookup_backend

    from sam3ft.stages import train as stage

    graphs: list[torch.fx.GraphModule] = []
    aot_eager = lookup_backend("aot_eager")

    def record(graph: torch.fx.GraphModule, inputs: list) -> object:
        graphs.append(graph)
        return aot_eager(graph, inputs)

    compile_fn = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: compile_fn(fn, backend=record))
    shipped = params.read_params(Path(request.config.rootpath) / "params.yaml")
    path = workspace(tmp_path, shipped, max_epochs=1, batch_size=4, recipe="lean", compile_model=True)
    # what the stage sets for its process, put back for the tests after this one
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", ""))
    # (not monkeypatch.setattr: undoing it deletes a key of dynamo's config module)
    optimize_ddp = torch._dynamo.config.optimize_ddp
    threads, autocast_cache = torch.get_num_threads(), torch.is_autocast_cache_enabled()
    torch._dynamo.reset()
    try:
        stage.run(params.load(stage.SECTIONS, path))
    finally:
        torch._dynamo.reset()
        torch.set_num_threads(threads)
        torch.set_autocast_cache_enabled(autocast_cache)
        torch._dynamo.config.optimize_ddp = optimize_ddp
    config = (tmp_path / "train/run/trainer_config.yaml").read_text()
    assert config.count("compile_model: true") == 3  # the knob, the trainer, the model's builder
    # the forward's graphs between the breaks (the matching, the geometry encoder stay eager)
    assert len(graphs) >= 5, len(graphs)
    assert sum(len(g.graph.nodes) for g in graphs) > 500
    # and the batched loss's terms (train/loss.py `_terms`): lean batches its loss
    assert any("binary_cross_entropy_with_logits" in g.code for g in graphs)
    assert _losses(tmp_path) == pytest.approx(_losses(runs["lean"]), rel=1e-6)


def test_lean_keeps_bf16_moments_and_follows_stock(runs):
    lean, stock = _ckpt(runs["lean"]), _ckpt(runs["stock"])
    moments = [t for s in lean["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
    assert moments and {t.dtype for t in moments} == {torch.bfloat16}
    assert {t.dtype for s in stock["optimizer"]["state"].values() for k, t in s.items() if k != "step"} == {
        torch.float32
    }
    a, b = _losses(runs["stock"]), _losses(runs["lean"])
    assert all(abs(x - y) <= 0.05 * x for x, y in zip(a, b, strict=True)), (a, b)


def test_frozen_trunk_and_lora_touch_only_what_they_say(runs):
    frozen, lora = _ckpt(runs["frozen-trunk"])["model"], _ckpt(runs["lora"])
    assert lora["lora_merged"] is True
    assert set(lora["model"]) == set(frozen)  # adapters folded in: sam3's key layout
    trunk = [k for k in frozen if k.startswith("backbone.vision_backbone.trunk.")]
    adapted = [k for k in trunk if k.endswith(("attn.qkv.weight", "attn.proj.weight"))]
    assert len(adapted) == 4  # 2 blocks x (qkv, proj) in the tiny preset
    for key in trunk:
        same = torch.equal(frozen[key], lora["model"][key])
        assert same != (key in adapted), key  # only the adapted weights moved (same init, same seed)
    text = [k for k in frozen if k.startswith("backbone.language_backbone.")]
    assert all(torch.equal(frozen[k], lora["model"][k]) for k in text)


def test_lora_checkpoint_evaluates_with_the_plain_model(runs):
    """evaluate loads the merged checkpoint key by key into the preset's plain model."""
    path = runs["lora"] / "params.yaml"
    evaluate.run(params.load(evaluate.SECTIONS, path))
    metrics = json.loads((runs["lora"] / "eval/metrics.json").read_text())
    assert 0.0 <= metrics["valid"]["AP50"] <= 1.0


def test_lean_without_ddp_accumulates_and_saves_plain_keys(tmp_path):
    """ddp_one_process: false leaves the model unwrapped; gradient accumulation still works (the
    trainer calls model.no_sync() between micro-batches) and the checkpoint keys are sam3's own."""
    shipped = params.read_params(Path(__file__).resolve().parents[1] / "params.yaml")
    path = workspace(tmp_path, shipped, max_epochs=1, batch_size=2, grad_accum=2, recipe="lean")
    finish(train(path))
    ckpt = _ckpt(tmp_path)
    assert ckpt["steps"]["train"] == 12  # 24 images, 2 per forward pass
    assert not any(k.startswith("module.") for k in ckpt["model"])
    trainer_config = (tmp_path / "train/run/trainer_config.yaml").read_text()
    assert "ddp_one_process: false" in trainer_config and "sam3ft.train.trainer.Trainer" in trainer_config
