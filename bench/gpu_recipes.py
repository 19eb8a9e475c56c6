"""Training recipes side by side: s/step, images/s, peak GPU memory, loss per step, GPU busy share.

Each `recipe:batch` runs in its own process (clean CUDA memory, own process group) through sam3's
own Trainer composed exactly as the train stage composes it (configs/train + params + recipe): real
batches of the prepared sample, sam3's loss, clipping, schedulers, DDP wrapper. Only the epoch
loop is ours, so a run stops after `--steps` steps without validation or a 10 GB checkpoint.

    python bench/gpu_recipes.py --params .gpu/sam3-1.yaml --steps 20 stock:1 lean:1 lean:8 lean-in-backward:1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sam3ft.params import Params

ROOT = Path(__file__).resolve().parents[1]


class Batches:
    """The train set's batches as one stream over as many epochs as it takes. `take(n)` hands the
    next n to a `train_epoch` call (a loader with len), so the profiled steps after the timed ones
    continue the same loader: a new one would fork its workers inside the profiled window."""

    def __init__(self, get_loader: Any) -> None:
        self.stream = self._epochs(get_loader)

    @staticmethod
    def _epochs(get_loader: Any) -> Any:
        """`get_loader`: the dataset's loader of an epoch (SeededTorchDataset.get_loader, or its
        per_epoch_loader: upstream's new DataLoader each epoch)."""
        epoch = 0
        while True:
            yield from get_loader(epoch)
            epoch += 1

    def take(self, n: int) -> Any:
        stream = self.stream

        class Next:
            def __len__(self) -> int:
                return n

            def __iter__(self) -> Any:
                for _ in range(n):
                    yield next(stream)

        return Next()


# run-spec keys that are the bench's, not trainer params
BENCH_KEYS = (
    "adamw_kernel",
    "adamw_seed",
    "tokenizer",
    "cudagraphs",
    "compile_loss",
    "gc_freeze",
    "nan_watch",
    "decoder_ckpt",
    "in_backward_defer",
    "in_backward_clip",
    "grad_watch",
    "float8",
    "rope",
    "sdpa",
    "masked_attention",
    "compile_mode",
)

# nan_watch=true: what the watch saw (see watch_nonfinite), added to the run's figures
WATCH: dict[str, Any] = {}


def bench_only(overrides: dict[str, str]) -> None:
    """adamw_kernel=false: adamw_bf16 on torch ops instead of its Triton kernel; adamw_seed=N:
    another stream of adamw_bf16's rounding noise (how far runs differing only there drift apart);
    tokenizer=upstream: sam3's tokenizer, whose ids the text encoder copies to the GPU with a host
    wait each step, instead of model.build.DeviceTokenizer (for stock as upstream runs it);
    cudagraphs=true: see parts_with_cudagraphs;
    compile_loss=false: the batched loss terms eager under compile_model (as before the tenth
    session); nan_watch=true: see watch_nonfinite; decoder_ckpt=false: sam3's decoder without its
    activation checkpointing (its layers and box-bias MLPs keep their activations);
    in_backward_defer=true: an *_in_backward optimizer's hooks only queue each weight, and its step
    clips and steps them after the backward (its per-tensor clipping without stepping inside the
    backward: which of the two leads where lean does not go); in_backward_clip=lagged|budget|tensor:
    InBackward.clip (train/optim.py); grad_watch=true: see watch_grads;
    gc_freeze=false: no gc.freeze() after the first training step (with compile_model:
    the first compiled one), as before the eleventh session;
    float8=tensorwise|rowwise|rowwise_with_gw_hp: see float8_trunk; rope=real|fused: see real_rope;
    sdpa=cudnn: every training step (its compile included) under sdpa_kernel with cuDNN's attention
    first in torch's priority order, then flash, memory-efficient, math.
    masked_attention=math: see masked_attention_math; compile_mode=MODE: torch.compile's mode for
    compile_model instead of "reduce-overhead" (e.g. max-autotune: the same CUDA graphs, and
    inductor benchmarks Triton matmul templates against cuBLAS, fusing what follows a template).
    (The whole forward compiled with CUDA graphs, the sixth and seventh sessions'
    `compile=model:cudagraphs=true:eager=geometry_encoder`, is the trainer param
    `compile_model=true` now.)"""
    from sam3ft.train.optim import AdamWBf16

    if overrides.get("tokenizer") == "upstream":
        from sam3.model.tokenizer_ve import SimpleTokenizer

        from sam3ft.model.build import DeviceTokenizer

        DeviceTokenizer.__call__ = SimpleTokenizer.__call__  # type: ignore[method-assign]

    if overrides.get("cudagraphs") == "true":
        parts_with_cudagraphs()
    if overrides.get("compile_loss") == "false":
        from sam3ft.train import loss

        loss._compiled_terms = lambda: loss._terms
    if overrides.get("gc_freeze") == "false":
        from sam3ft.train.trainer import Trainer

        Trainer._freeze_gc = lambda self: setattr(self, "_gc_frozen", True)  # type: ignore[method-assign]
    if overrides.get("adamw_kernel") == "false":
        AdamWBf16._use_kernel = lambda self, group: False  # type: ignore[method-assign]
    if overrides.get("nan_watch") == "true":
        watch_nonfinite()
    if overrides.get("decoder_ckpt") == "false":
        after_build(decoder_unchecked)
    if "in_backward_clip" in overrides:
        from sam3ft.train.optim import InBackward

        InBackward.clip = overrides["in_backward_clip"]
    if overrides.get("in_backward_defer") == "true":  # after nan_watch: its watch wraps the real step
        defer_in_backward()
    if "float8" in overrides:
        float8_trunk(overrides["float8"])
    if overrides.get("sdpa") == "cudnn":
        cudnn_attention_first()
    if overrides.get("masked_attention") == "math":
        masked_attention_math()
    if "compile_mode" in overrides:
        from sam3ft.train import model as train_model

        forward, mode = train_model.compile_training_forward, overrides["compile_mode"]
        train_model.compile_training_forward = lambda model, _mode="": forward(model, mode)  # type: ignore[misc]
    if overrides.get("rope") in ("real", "fused"):
        fused = overrides["rope"] == "fused"
        after_build(lambda model: WATCH.update(real_rope=real_rope(model, fused)))
    if "adamw_seed" in overrides:
        init, seed = AdamWBf16.__init__, int(overrides["adamw_seed"])
        AdamWBf16.__init__ = lambda self, *a, **k: init(self, *a, **{**k, "seed": seed})  # type: ignore[method-assign]


def decoder_unchecked(model: Any) -> None:
    """The decoder's half of the trainer param act_ckpt_detr: false (train/model.keep_activations):
    its layers and box-bias MLPs run without activation checkpointing, the encoder's stay checked."""
    from sam3ft.train.model import keep_activations

    decoder = model.get_submodule("transformer.decoder")
    keep_activations([*decoder.layers, decoder.boxRPB_embed_x, decoder.boxRPB_embed_y])


def watched_figures() -> dict[str, Any]:
    """What the watches saw, without their parameter-name table."""
    return {k: v for k, v in WATCH.items() if k != "names"}


def watch_nonfinite(keep: int = 30) -> None:
    """A diagnosis, not a timing (a host wait per weight): with an optimizer stepping in the
    backward, each gradient and then its weight checked for inf/nan as the hook steps it (the first
    `keep` of each, by step and parameter name); with any optimizer, GradScaler's scale after each
    step (it halves where upstream's step skipped non-finite gradients)."""
    import torch

    from sam3ft.train.optim import DeviceGradScaler, InBackward

    WATCH.update(nonfinite_grads=[], nonfinite_weights=[], scaler_scales=[], watched_steps=0)
    names: dict[int, str] = WATCH.setdefault("names", {})
    step_param, step, update = InBackward._step_param, InBackward.step, DeviceGradScaler.update

    def watched(self: Any, param: torch.Tensor) -> None:
        where = (WATCH["watched_steps"], names.get(id(param), str(tuple(param.shape))))
        if len(WATCH["nonfinite_grads"]) < keep and not bool(torch.isfinite(param.grad).all()):
            WATCH["nonfinite_grads"].append(where)
        step_param(self, param)
        if len(WATCH["nonfinite_weights"]) < keep and not bool(torch.isfinite(param).all()):
            WATCH["nonfinite_weights"].append(where)
            # on stdout as it happens: the run may crash on these weights before its RESULT line
            print("WATCH " + json.dumps(watched_figures()), flush=True)

    def counted(self: Any, closure: Any = None) -> Any:
        WATCH["watched_steps"] += 1
        return step(self, closure)

    def scale_after(self: Any, new_scale: Any = None) -> None:
        update(self, new_scale)
        if self.is_enabled():
            WATCH["scaler_scales"].append(float(self.get_scale()))

    InBackward._step_param = watched  # type: ignore[method-assign]
    InBackward.step = counted  # type: ignore[method-assign]
    DeviceGradScaler.update = scale_after  # type: ignore[method-assign]


def defer_in_backward() -> None:
    """InBackward's hooks queue their weight; its step then runs the hook's own work (per-tensor
    clipping, the skip on a non-finite gradient, the weight's optimizer) for each, in the order the
    backward completed them."""
    from sam3ft.train.optim import InBackward

    step_param, step = InBackward._step_param, InBackward.step

    def queue(self: Any, param: Any) -> None:
        self.__dict__.setdefault("_deferred", []).append(param)

    def step_queued(self: Any, closure: Any = None) -> Any:
        for param in self.__dict__.pop("_deferred", []):
            step_param(self, param)
        return step(self, closure)

    InBackward._step_param = queue  # type: ignore[method-assign]
    InBackward.step = step_queued  # type: ignore[method-assign]


def watch_grads(module: Any, keep: int = 40) -> None:
    """A diagnosis, not a timing (a host wait per module output): every module's tensor outputs get
    a gradient hook that records, in the order the backward reaches them, the first `keep` outputs
    whose gradient holds an inf or nan (training step from 0, module name, which, shape). The
    earliest names the module whose output received the first non-finite gradient: what consumed
    that output made it."""
    import torch

    WATCH.update(nonfinite_output_grads=[], forwards=0)  # forwards: of the whole model, so far

    def on_grad(name: str) -> Any:
        def check(grad: torch.Tensor) -> None:
            seen = WATCH["nonfinite_output_grads"]
            if len(seen) < keep and grad.is_floating_point() and not bool(torch.isfinite(grad).all()):
                kind = "nan" if bool(torch.isnan(grad).any()) else "inf"
                seen.append((WATCH["forwards"] - 1, name, kind, list(grad.shape)))

        return check

    def after_forward(name: str) -> Any:
        def hook(mod: Any, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                output = [output]
            outs = list(output.values()) if isinstance(output, dict) else output
            for at, out in enumerate(outs if isinstance(outs, (tuple, list)) else []):
                if isinstance(out, torch.Tensor) and out.requires_grad and torch.is_grad_enabled():
                    out.register_hook(on_grad(f"{name}[{at}]"))

        return hook

    for name, mod in module.named_modules():
        mod.register_forward_hook(after_forward(name or "model"))
    module.register_forward_pre_hook(lambda *_: WATCH.update(forwards=WATCH["forwards"] + 1))


def after_build(change: Any) -> None:
    """Call `change(model)` on the training model once it is built and cast (weight_dtype), before
    compile_model or compile_parts compile it: through train/model.compile_parts, which
    build_trainable_model calls at that point."""
    from sam3ft.train import model as train_model

    parts = train_model.compile_parts

    def compile_parts(model: Any, trunk: bool, layers: bool) -> None:
        change(model)
        parts(model, trunk, layers)

    train_model.compile_parts = compile_parts  # type: ignore[assignment]


def float8_trunk(recipe: str) -> None:
    """torchao's float8 training for the ViT trunk's linear layers (qkv, proj, the MLPs: most of
    the step's matmul work): each such nn.Linear becomes a torchao Float8Linear, whose forward and
    backward matmuls take float8 operands scaled per `recipe` (torchao.float8's recipe names) and
    accumulate in high precision; the weights, their dtype and the optimizer stay as they were.
    Done after the model is built and cast (weight_dtype), before compile_model/compile_parts
    compile it, so the casts fuse into the compiled graphs. Layers with a side not a multiple of
    16 (float8 matmul's alignment) and LoRA layers stay as they are. Hopper or Ada GPUs run the
    float8 matmuls natively; torch emulates them on the CPU (the dry run)."""
    import torch
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)

    def eligible(module: torch.nn.Module, fqn: str) -> bool:
        # `type is`: LoRA's layers (model/lora.LoRALinear, an nn.Linear subclass) stay as they are
        return (
            type(module) is torch.nn.Linear and module.in_features % 16 == 0 and module.out_features % 16 == 0
        )

    def convert(model: torch.nn.Module) -> None:
        vit = model.get_submodule("backbone.vision_backbone.trunk")
        WATCH["trunk_linears"] = sum(isinstance(m, torch.nn.Linear) for m in vit.modules())
        convert_to_float8_training(vit, config=config, module_filter_fn=eligible)
        WATCH["float8_linears"] = sum(type(m).__name__ == "Float8Linear" for m in vit.modules())

    after_build(convert)


def real_rope(model: Any, fused: bool = False) -> int:
    """sam3's ViT RoPE (sam3/model/vitdet.py:68 `apply_rotary_enc`) multiplies q and k, as complex
    numbers, by a complex table; inductor generates no code for complex operators, so in a compiled
    graph those run as separate eager kernels on float32 copies. Here every RoPE attention of
    `model` rotates with the table's real and imaginary parts instead, (a + ib)(c + id) =
    (ac - bd) + i(ad + bc) in float32 as sam3 computes it: elementwise work inductor fuses. With
    `fused` the rotation is an autograd.Function whose backward is the inverse rotation, the same
    expression with -d, so the backward is one elementwise expression of the incoming gradient
    (autograd's own backward of the plain form scatters each half into zeros and adds them). The
    tables are buffers outside the state_dict. Returns how many attentions changed."""
    import types

    import torch
    from sam3.model.vitdet import Attention

    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        pairs = x.float().unflatten(-1, (-1, 2))  # (..., L, D/2, 2); cos, sin: (L, D/2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).type_as(x)

    class Rotation(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(cos, sin)
            return rotate(x, cos, sin)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
            cos, sin = ctx.saved_tensors
            return rotate(grad, cos, -sin), None, None

    turn = Rotation.apply if fused else rotate

    def apply_rope(self: Any, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return turn(q, self.rope_cos, self.rope_sin), turn(k, self.rope_cos, self.rope_sin)

    swapped = 0
    for module in model.modules():
        if isinstance(module, Attention) and module.use_rope:
            module.register_buffer("rope_cos", module.freqs_cis.real.contiguous(), persistent=False)
            module.register_buffer("rope_sin", module.freqs_cis.imag.contiguous(), persistent=False)
            module._apply_rope = types.MethodType(apply_rope, module)
            swapped += 1
    return swapped


def cudnn_attention_first() -> None:
    """Each training step under `sdpa_kernel(..., set_priority=True)` with cuDNN's attention
    first: torch.compile picks the attention kernel when it traces, inside the step."""
    import functools

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sam3ft.train.trainer import Trainer

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    order += [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    run_step = Trainer._run_step

    @functools.wraps(run_step)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        with sdpa_kernel(order, set_priority=True):
            return run_step(self, *args, **kwargs)

    Trainer._run_step = step  # type: ignore[method-assign]


def masked_attention_math() -> None:
    """Attention calls with both a mask and dropout, in sam3 those of the DETR encoder's and decoder's
    nn.MultiheadAttention layers that take a mask (the encoder's and decoder's cross-attention to the
    prompt with its padding, the decoder's cross-attention to the image with its box bias), computed
    as explicit matmuls, softmax and dropout: torch's SDPA sends them to its memory-efficient kernel
    even with cuDNN's first in its priority (flash takes no mask), and that kernel's backward with
    a bias gradient is slow; under compile_model inductor fuses the bias add, softmax, dropout and
    cast between two matmuls. Softmax in float32; the probabilities cast to the values' dtype after
    dropout. Every other call (the ViT's, the text encoder's causal one without dropout,
    validation's) goes to SDPA as before."""
    import torch
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention

    def attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if attn_mask is None or dropout_p == 0.0 or is_causal or kwargs:
            return sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        scores = (q @ k.transpose(-2, -1)).float() * (q.size(-1) ** -0.5 if scale is None else scale)
        if attn_mask.dtype == torch.bool:  # SDPA's bool mask: True takes part
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
        return F.dropout(scores.softmax(-1), dropout_p).to(v.dtype) @ v

    F.scaled_dot_product_attention = attention  # type: ignore[assignment]


def parts_with_cudagraphs() -> None:
    """The parts that `compile_trunk` and `compile_layers` pick, compiled in mode "reduce-overhead"
    (CUDA graphs of each compiled graph, forward and backward); the first step eager and a step mark
    before each later one, as `Trainer(compile_model=True)` does."""
    import functools

    import torch

    from sam3ft.train import model as train_model
    from sam3ft.train.trainer import Trainer

    parts, compile_fn = train_model.compile_parts, torch.compile

    def compile_parts(model: torch.nn.Module, trunk: bool, layers: bool) -> None:
        torch.compile = functools.partial(compile_fn, mode="reduce-overhead")  # type: ignore[assignment]
        try:
            parts(model, trunk, layers)
        finally:
            torch.compile = compile_fn

    train_model.compile_parts = compile_parts  # type: ignore[assignment]
    init = Trainer.__init__
    Trainer.__init__ = lambda self, **k: init(self, **{**k, "compile_model": True})  # type: ignore[method-assign]


def compile_cache(path: Path, slow_s: float = 20.0) -> None:
    """Carry torch.compile's work from one device call to the next: load the artifacts (inductor's
    kernels and graphs, AOTAutograd's) saved at `path` by an earlier run, and save them again
    (gzipped) after every step slower than `slow_s`, that is one that compiled something, so a run
    cut off by the call's limit still leaves what it compiled. Dynamo traces again either way."""
    import functools
    import gzip

    import torch

    from sam3ft.train.trainer import Trainer

    if path.exists():
        info = torch.compiler.load_cache_artifacts(gzip.decompress(path.read_bytes()))
        print(f"compile cache: loaded {path} ({path.stat().st_size >> 20} MiB): {info}", file=sys.stderr)
    run_step = Trainer._run_step
    steps = 0

    @functools.wraps(run_step)
    def step(self: Any, *a: Any, **k: Any) -> Any:
        nonlocal steps
        t0 = time.perf_counter()
        out = run_step(self, *a, **k)
        took, steps = time.perf_counter() - t0, steps + 1
        print(f"step {steps}: {took:.1f} s", file=sys.stderr, flush=True)
        saved = torch.compiler.save_cache_artifacts() if took > slow_s else None
        if saved is not None:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(gzip.compress(saved[0], compresslevel=6))
            tmp.replace(path)
            print(f"compile cache: saved {path} ({path.stat().st_size >> 20} MiB)", file=sys.stderr)
        return out

    Trainer._run_step = step  # type: ignore[method-assign]


def trainer_params(
    path: Path, recipe: str, batch: int, workers: int | None = None, overrides: dict[str, Any] | None = None
) -> Params:
    import yaml

    from sam3ft import params
    from sam3ft.stages import train as stage

    data = params.read_params(path)
    data["trainer"].update(recipe=recipe, batch_size=batch)
    data["trainer"].update({key: None for key in params.RECIPE_KEYS})  # all from the recipe
    for key, value in (overrides or {}).items():  # `key=value` fields of the run spec, YAML values
        if key not in BENCH_KEYS:
            data["trainer"][key] = yaml.safe_load(value)
    if workers is not None:
        data["trainer"]["num_workers"] = workers
    preset = params.trainer_preset(data)
    return params.Params(
        {
            name: params.section_from_dict(params.SECTIONS[name], data[name], name, preset)
            for name in stage.SECTIONS
        }
    )


def one(args: argparse.Namespace) -> dict[str, Any]:
    """Run one recipe:batch in this process; returns its figures."""
    import gc

    import torch
    from hydra.utils import instantiate

    from sam3ft.stages import train as stage
    from sam3ft.train import logging as step_logging
    from sam3ft.train.compose import compose_trainer_config
    from sam3ft.train.optim import InBackward
    from sam3ft.train.run import setup_process

    recipe, batch, *rest = args.one.split(":")
    overrides = dict(field.split("=", 1) for field in rest if "=" in field)
    bench_only(overrides)
    if args.compile_cache:
        compile_cache(Path(args.compile_cache))
    rest = [field for field in rest if "=" not in field]
    if rest and rest[0]:
        args.steps = int(rest[0])
    loader = rest[1] if len(rest) > 1 and rest[1] else "stream"
    if loader not in ("stream", "per-epoch"):  # per-epoch: upstream's, a new DataLoader (and workers) each
        raise SystemExit(f"{args.one}: loader must be stream or per-epoch")
    p = trainer_params(Path(args.params), recipe, int(batch), args.workers, overrides)
    paths = p.paths
    base_dir, data_dir = Path(paths.base), Path(paths.prepared)
    manifest, spec = stage.load_base(base_dir, p.model.preset)
    out = Path(args.scratch) / args.one.replace(":", "_").replace("=", "-")
    knobs = stage.trainer_knobs(
        p, spec, manifest, base_dir, data_dir, out, stage.count_images(data_dir / "train")
    )
    cfg = compose_trainer_config(knobs, name=stage.config_name(p.trainer.segmentation))
    setup_process()  # as the train stage's run_trainer: rank 0 of 1, sam3's workarounds, resolvers

    logged: list[tuple[str, float, int]] = []
    original = step_logging.StepLogger.log

    step_ends: list[float] = []  # when each step's time was logged

    def capture(self: Any, name: str, data: Any, step: int) -> None:
        original(self, name, data, step)
        if name == STEP_TIME:
            step_ends.append(time.perf_counter())
        logged.append((name, float(data.detach()) if hasattr(data, "detach") else float(data), step))

    step_logging.StepLogger.log = capture  # type: ignore[method-assign]
    skips: list[int] = []  # read before the trainer's end-of-epoch check resets (or raises on) them
    check_skipped = InBackward.check_skipped

    def count_skips(self: Any, steps: int, epoch: int) -> None:
        skips.append(0 if self.skipped is None else int(self.skipped))
        if WATCH:  # on stdout: the check below may end the run before its RESULT line
            print("WATCH " + json.dumps(watched_figures()), flush=True)
        check_skipped(self, steps, epoch)

    InBackward.check_skipped = count_skips  # type: ignore[method-assign]
    pauses = gc_pauses()
    t0 = time.perf_counter()
    trainer = instantiate(cfg.trainer, _recursive_=False)
    build_s = time.perf_counter() - t0
    trainer.model.train()
    module = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    if "names" in WATCH:
        WATCH["names"].update({id(q): name for name, q in module.named_parameters()})
    if overrides.get("grad_watch") == "true":
        watch_grads(module)
    n_params = sum(q.numel() for q in module.parameters())
    n_train = sum(q.numel() for q in module.parameters() if q.requires_grad)
    dataset = trainer.train_dataset
    batches = Batches(dataset.per_epoch_loader if loader == "per-epoch" else dataset.get_loader)
    trainer.train_epoch(batches.take(args.steps))
    # each measuring pass below is an epoch of its own, so the schedulers' `where` keeps rising
    # (restarting it at 0 with the step count still rising would make the schedule's inferred
    # step count nonsense)
    trainer.max_epochs = trainer.epoch + 5

    def more(n: int) -> Any:
        trainer.epoch += 1
        return batches.take(n)

    timed_logs = list(logged)  # the profiled steps below run slower: not part of the timing
    gc_timed = {gen: list(each) for gen, each in pauses.items()}
    # what one generation-2 collection costs now: a full collection, timed (after gc_freeze's
    # freeze it walks only what was made since); not one of the run's own
    gc.collect()
    _, gc_full_ms = pauses[2][-1]
    for each in pauses.values():
        each.clear()
    figures: dict[str, Any] = watched_figures()
    if skips:  # InBackward: weight updates a non-finite gradient skipped, per bench epoch
        figures["in_backward_skips"] = skips

    def say(what: str) -> None:
        print(f"pass: {what} ({time.perf_counter() - t0:.0f} s in)", file=sys.stderr, flush=True)

    # the unprofiled pass first: the profiler leaves garbage that sets off full collections in the
    # steps after it, which would weigh on the gc_freeze=false runs alone
    if args.nvml:
        say(f"{args.nvml} steps, nvidia-smi")
        before = len(logged)
        figures.update(nvml_busy(trainer, more(LEAD + args.nvml + 1), LEAD, args.nvml))
        figures["nvml_step_s"] = [round(v, 3) for n, v, _ in logged[before:] if n == STEP_TIME]
    if args.profile:
        say(f"profile {args.profile} steps inside an epoch")
        # inside an epoch: LEAD steps before the window and one after it, so the window holds
        # steady-state steps only (no loader hand-over, epoch start or end, final read)
        batches_in = more(LEAD + args.profile + 1)
        figures.update(gpu_busy(trainer, batches_in, LEAD, args.profile))
    if args.profile_epoch:
        say(f"profile an epoch of {args.profile_epoch} steps")
        # the window before the eleventh session: an epoch of its own, start and end included
        own = gpu_busy(trainer, more(args.profile_epoch), 0, args.profile_epoch)
        figures["gpu_busy_own_epoch"], figures["gpu_ms_per_step_own_epoch"] = (
            own["gpu_busy"],
            own["gpu_ms_per_step"],
        )
    if args.hostprof:
        figures["host_top"] = host_profile(trainer, more(args.hostprof))
    if args.syncs:
        figures["sync_sites"] = sync_sites(trainer, more(1))
    if args.timeline:
        trace = None
        if args.trace:
            trace = Path(args.trace) / (args.one.replace(":", "_").replace("=", "-") + ".json.gz")
            trace.parent.mkdir(parents=True, exist_ok=True)
        figures["timeline"] = timeline(trainer, more(args.timeline), trace)
    rows = {name: [(s, v) for n, v, s in timed_logs if n == name] for name in {n for n, _, _ in timed_logs}}
    step_s = [v for _, v in rows[STEP_TIME]]
    mem = [v for _, v in rows["Step_Stats/train/Mem (GB)"]]
    data_s = [v for _, v in rows.get("Step_Stats/train/Data Time", [])][args.warmup :]
    timed = step_s[args.warmup :]
    if "gpu_ms_per_step" in figures:
        # the profiled steps' kernel time against the median unprofiled step: the busy share without
        # the profiled window's own costs (its epoch start and end, the profiler's per-launch work)
        figures["gpu_busy_vs_timed"] = round(figures["gpu_ms_per_step"] / 1e3 / statistics.median(timed), 3)
    return {
        "recipe": recipe,
        "batch": int(batch),
        "optimizer": p.trainer.optimizer,
        "trainable": p.trainer.trainable,
        "lora_rank": p.trainer.lora_rank,
        "autocast_cache": p.trainer.autocast_cache,
        "ddp_one_process": p.trainer.ddp_one_process,
        "sync_once": p.trainer.sync_once,
        "compile_trunk": p.trainer.compile_trunk,
        "compile_layers": p.trainer.compile_layers,
        "act_ckpt_trunk": p.trainer.act_ckpt_trunk,
        "act_ckpt_text": p.trainer.act_ckpt_text,
        "act_ckpt_geometry": p.trainer.act_ckpt_geometry,
        "act_ckpt_detr": p.trainer.act_ckpt_detr,
        "batched_loss": p.trainer.batched_loss,
        "overrides": overrides,
        "ddp": type(trainer.model).__name__ == "DistributedDataParallel",
        "num_workers": p.trainer.num_workers,
        "loader": loader,
        "params": n_params,
        "trainable_params": n_train,
        "build_s": round(build_s, 1),
        "steps": len(step_s),
        "s_per_step": round(statistics.median(timed), 3),
        "step_s": [round(v, 3) for v in step_s],
        "images_per_s": round(int(batch) / statistics.median(timed), 2),
        "data_s_per_step": round(statistics.median(data_s), 3) if data_s else None,
        "peak_gb": round(max(mem), 2),
        "peak_gb_step0": round(mem[0], 2),
        "loss": [round(v, 4) for _, v in sorted(rows[step_logging._LOSS])],
        # each loss term's mean over the run's steps (loss_mask, loss_dice: the mask head trains)
        "loss_terms": {
            name.removeprefix(step_logging._LOSS + "/"): round(statistics.fmean(v for _, v in each), 4)
            for name, each in sorted(rows.items())
            if name.startswith(step_logging._LOSS + "/")
        },
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        # Python's garbage collections by generation (count, total ms, longest ms): in the timed
        # run (its compiling step included), then in the measuring passes after it
        "gc_timed": {gen: summary(each) for gen, each in gc_timed.items()},
        "gc_after": {gen: summary(each) for gen, each in pauses.items()},
        "gc_full_ms": round(gc_full_ms, 1),
        "gc_tracked": len(gc.get_objects()),  # not frozen, after the passes
        "gc_frozen": gc.get_freeze_count(),
        # each generation-2 collection: [the step it ran in, counted over all passes; ms]
        "gc2_steps": [[sum(t < at for t in step_ends), round(ms)] for at, ms in gc_timed[2] + pauses[2]],
        **figures,
    }


STEP_TIME = "Step_Stats/train/Batch Time"


def summary(pauses: list[tuple[float, float]]) -> list[int]:
    """count, total ms, longest ms"""
    ms = [each for _, each in pauses]
    return [len(ms), round(sum(ms)), round(max(ms, default=0))]


def gc_pauses() -> dict[int, list[tuple[float, float]]]:
    """Every garbage collection from now on, by generation (gc.callbacks), as (when it ended, ms).
    A generation-2 collection walks every tracked object, and torch.compile leaves millions."""
    import gc

    pauses: dict[int, list[tuple[float, float]]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def record(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            now = time.perf_counter()
            pauses[info["generation"]].append((now, (now - started[0]) * 1e3))

    gc.callbacks.append(record)
    return pauses


# steps of an in-epoch window's epoch before the window starts
LEAD = 2


class Window:
    """A loader of `len(loader)` batches (one epoch) that calls `start()` before handing over batch
    `lead` and `stop()` before batch `lead + n`: the window spans whole steps lead..lead+n-1, data
    wait included, and with a batch after it, none of the epoch's end. lead=0 and n=len(loader):
    the whole epoch (its start inside the window, its end after it)."""

    def __init__(self, loader: Any, lead: int, n: int, start: Any, stop: Any) -> None:
        if lead + n > len(loader):
            raise ValueError(f"{n} steps after {lead} need {lead + n} batches, not {len(loader)}")
        self.loader, self.lead, self.n, self.start, self.stop = loader, lead, n, start, stop

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        batches = iter(self.loader)
        for i in range(len(self.loader)):
            if i == self.lead:
                self.start()
            if i == self.lead + self.n:
                self.stop()
            yield next(batches)
        if self.lead + self.n == len(self.loader):
            self.stop()


def run_window(trainer: Any, batches: Any, lead: int, n: int, begin: Any, end: Any) -> float:
    """Train one epoch on `batches`; `begin()` and `end()` bracket the window of steps
    lead..lead+n-1, each after a device sync. Returns the window's wall seconds."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # CPU: a dry run
    marks: list[float] = []

    def start() -> None:
        sync()
        begin()
        marks.append(time.perf_counter())

    def stop() -> None:
        sync()
        marks.append(time.perf_counter())
        end()

    trainer.train_epoch(Window(batches, lead, n, start, stop))
    return marks[1] - marks[0]


# kernel-name fragments of each group `gpu_busy` sums; a kernel goes to the first group it matches
KERNEL_GROUPS = {
    "attention": ("flash", "fmha", "sdpa", "dot_do_o", "convert_dq"),
    "matmul": ("nvjet", "gemm", "xmma", "cutlass"),
    "optimizer": ("adamw",),
    "complex": ("complex",),
    "inductor": ("triton_",),
    "norm": ("Moments", "layer_norm", "LayerNorm", "batch_norm"),
    "reduce": ("reduce_kernel", "Reduce", "reduce"),
    "copy": ("copy", "Memcpy", "Memset", "CatArray", "cat_"),
    "index": ("index", "gather", "scatter", "Index", "nonzero", "masked"),
    "sort": ("sort", "Sort", "radix", "cub::", "topk"),
    "elementwise": ("elementwise_kernel", "vectorized", "unrolled"),
}


def kernel_group(name: str) -> str:
    return next((g for g, parts in KERNEL_GROUPS.items() if any(p in name for p in parts)), "other")


def gpu_busy(trainer: Any, batches: Any, lead: int, n: int, top: int = 30) -> dict[str, Any]:
    """Over steps lead..lead+n-1 of an epoch on `batches` (torch profiler, CUDA activity only):
    the share of wall time the GPU spends in kernels (`gpu_busy`), the kernel milliseconds per step
    (against the unprofiled step time, `s_per_step`, the busy share without the profiler's host
    overhead), the `top` kernels by their own time as 'ms per step  launches per step  name', and
    the milliseconds per step of each KERNEL_GROUPS group, over every kernel, and the kernel launches
    per step, all of them and those under 10 us each (`kernel_tiny_*`, launch-bound work)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    # CPU: a dry run (no device time, so 0)
    prof = profile(activities=[ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU])
    wall = run_window(trainer, batches, lead, n, prof.start, prof.stop)
    timed = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    kernel_us = sum(e.self_device_time_total for e in timed)
    timed.sort(key=lambda e: e.self_device_time_total, reverse=True)
    tiny = [e for e in timed if e.self_device_time_total < 10 * e.count]  # under 10 us per launch
    groups: dict[str, float] = {}
    for e in timed:
        group = kernel_group(e.key)
        groups[group] = groups.get(group, 0.0) + e.self_device_time_total / 1e3 / n
    return {
        "gpu_busy": round(kernel_us / 1e6 / wall, 3),
        "gpu_ms_per_step": round(kernel_us / 1e3 / n, 1),
        "kernel_top": [
            f"{e.self_device_time_total / 1e3 / n:.2f}ms {e.count / n:g}x {e.key[:120]}" for e in timed[:top]
        ],
        "kernel_groups": {g: round(ms, 1) for g, ms in sorted(groups.items(), key=lambda kv: -kv[1])},
        "kernel_launches": round(sum(e.count for e in timed) / n),
        "kernel_tiny_ms": round(sum(e.self_device_time_total for e in tiny) / 1e3 / n, 1),
        "kernel_tiny_launches": round(sum(e.count for e in tiny) / n),
    }


def nvml_busy(trainer: Any, batches: Any, lead: int, n: int, period_ms: int = 50) -> dict[str, Any]:
    """GPU busy without a profiler: the driver's own utilization (NVML `utilization.gpu`: the share
    of its sample period in which a kernel ran, the figure nvidia-smi shows), read every
    `period_ms` by nvidia-smi over steps lead..lead+n-1 of an epoch on `batches`. A reading covers
    the period before it (1/6 s to 1 s by product), so readings in the window's first second are
    left out. Device 0 of CUDA_VISIBLE_DEVICES or the first GPU."""
    import datetime
    import threading

    device = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    cmd = ["nvidia-smi", "-i", device, "--query-gpu=timestamp,utilization.gpu"]
    cmd += ["--format=csv,noheader,nounits", "-lms", str(period_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    readings: list[tuple[datetime.datetime, float]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            stamp, _, value = line.strip().rpartition(", ")
            try:
                readings.append((datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f"), float(value)))
            except ValueError:  # "[N/A]" or a partial line
                continue

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    span: list[datetime.datetime] = []

    def mark() -> None:
        span.append(datetime.datetime.now())

    try:
        time.sleep(2 * period_ms / 1e3)  # nvidia-smi's first reading
        wall = run_window(trainer, batches, lead, n, mark, mark)
        time.sleep(2 * period_ms / 1e3)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        reader.join(timeout=10)
    first, last = span[0] + datetime.timedelta(seconds=1), span[1]
    inside = [value for stamp, value in readings if first <= stamp <= last]
    return {
        "gpu_busy_nvml": round(statistics.mean(inside) / 100, 3) if inside else None,
        "nvml_readings": len(inside),
        "nvml_window_s": round(wall, 2),
        "nvml_s_per_step": round(wall / n, 3),
    }


def host_profile(trainer: Any, batches: Any, top: int = 25) -> list[str]:
    """Where the host spends a step: cProfile over the steps of `batches`, the top functions by own
    time, then by time with callees, as 'seconds per step  calls per step  file:line(function)'."""
    import cProfile
    import pstats

    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # CPU: a dry run
    sync()
    prof = cProfile.Profile()
    prof.enable()
    trainer.train_epoch(batches)
    sync()
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    steps = len(batches)

    def listed(column: int) -> list[str]:
        rows = sorted(stats.items(), key=lambda kv: kv[1][column], reverse=True)[:top]
        return [
            f"{row[column] / steps:.4f}s {row[1] / steps:.0f}x {Path(f).name}:{line}({fn})"
            for (f, line, fn), row in rows
        ]

    # own time first, then time including callees ("cum"), e.g. the optimizer's whole step
    return [*listed(2), "cum:", *listed(3)]


def timeline(trainer: Any, batches: Any, trace: Path | None = None) -> dict[str, dict[str, float]]:
    """Per step, for each phase: host wall ms (its CPU window) and how many of those ms the GPU ran
    kernels. A phase whose GPU ms is far below its wall ms leaves the GPU idle while the host works
    (host-bound); the last phase before a sync shows the wait. Phases: sam3's own record_function
    markers (_run_encoder, _run_decoder, ...) plus forward, trunk, text, matching (the model's
    matcher), loss, backward, clip, optimizer and the whole step, wrapped here on this trainer
    instance. With `compile_model` the trunk and text are not wrapped (dynamo would compile the
    forward again) and sam3's markers inside the compiled forward are gone."""
    import functools

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    def mark(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def run(*a: Any, **k: Any) -> Any:
            with record_function(name):
                return fn(*a, **k)

        return run

    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    wrapped = [
        (model, "forward", "forward"),
        (model.matcher, "forward", "matching"),
        (trainer, "_run_step", "step"),
        (trainer.scaler, "step", "optimizer"),
    ]
    if not getattr(trainer, "compile_model", False):
        wrapped += [(model.backbone, "forward_image", "trunk"), (model.backbone, "forward_text", "text")]
    originals = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in wrapped]
    for obj, attr, name in wrapped:
        setattr(obj, attr, mark(name, getattr(obj, attr)))
    losses = dict(trainer.loss)
    trainer.loss = {k: mark("loss", v) for k, v in losses.items()}
    clipper = trainer.gradient_clipper
    trainer.gradient_clipper = mark("clip", clipper) if clipper is not None else None
    backward = torch.Tensor.backward
    torch.Tensor.backward = mark("backward", backward)  # type: ignore[method-assign]
    steps = len(batches)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # CPU: a dry run
    sync()
    try:
        # "all": the whole loop (data, step, clip, optimizer, logging)
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with profile(activities=activities) as prof, record_function("all"):
            trainer.train_epoch(batches)
            sync()
    finally:
        for obj, attr, fn in originals:
            setattr(obj, attr, fn)
        trainer.loss, trainer.gradient_clipper = losses, clipper
        torch.Tensor.backward = backward  # type: ignore[method-assign]
    if trace is not None:  # the whole profile as a gzipped Chrome trace, for a look by op and thread
        import gzip

        raw = trace.with_suffix("")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    events = prof.events()
    names = {"all", "forward", "trunk", "text", "matching", "loss", "backward", "clip", "optimizer", "step"}
    names |= {e.name for e in events if e.name.startswith("SAM3Image.")}
    # kernels, copies and memsets; not the GPU-side spans kineto draws for each record_function
    kernels = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type.name == "CUDA" and not e.is_user_annotation and e.name not in names
    )
    merged: list[list[float]] = []  # union of kernel intervals (µs)
    for start, end in kernels:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])

    def busy(start: float, end: float) -> float:
        return sum(max(0.0, min(end, b) - max(start, a)) for a, b in merged if a < end and b > start)

    out: dict[str, dict[str, float]] = {}
    for e in events:
        if e.device_type.name == "CPU" and e.name in names:
            row = out.setdefault(e.name.removeprefix("SAM3Image."), {"wall_ms": 0.0, "gpu_ms": 0.0, "n": 0})
            row["wall_ms"] += (e.time_range.end - e.time_range.start) / 1e3 / steps
            row["gpu_ms"] += busy(e.time_range.start, e.time_range.end) / 1e3 / steps
            row["n"] += 1 / steps
    return {k: {m: round(v, 1) for m, v in row.items()} for k, row in out.items()}


def sync_sites(trainer: Any, batches: Any, top: int = 25) -> dict[str, int]:
    """Host-device synchronisations of one step, counted by the innermost sam3 (or our) frame
    that caused them (torch's sync debug mode warns at each)."""
    import collections
    import traceback
    import warnings

    import torch

    counts: collections.Counter[str] = collections.Counter()
    original = warnings.showwarning

    def record(message: Any, category: Any, filename: str, lineno: int, *a: Any, **k: Any) -> None:
        frames = traceback.extract_stack()[:-1]
        mine = [f for f in frames if "sam3" in f.filename and "bench" not in f.filename]
        site = mine[-1] if mine else frames[-1]
        counts[f"{Path(site.filename).parent.name}/{Path(site.filename).name}:{site.lineno}"] += 1

    warnings.showwarning = record  # type: ignore[assignment]
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        trainer.train_epoch(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = original
    return {"total": sum(counts.values()), **dict(counts.most_common(top))}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "runs",
        nargs="*",
        help="recipe:batch[:steps[:loader]][:key=value...], e.g. stock:1:50 lean:8 stock:4:12:per-epoch "
        "lean:8:10:sync_once=false (loader: stream, ours, the default; per-epoch, upstream's new "
        "loader every epoch; key=value: a trainer param over the recipe's, or one of BENCH_KEYS, "
        "see bench_only)",
    )
    parser.add_argument(
        "--params", required=True, help="params file (sam3 preset, paths to fetched base/prepared)"
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument(
        "--profile", type=int, default=0, help="then profile this many steps for GPU busy (inside an epoch)"
    )
    parser.add_argument(
        "--profile-epoch",
        type=int,
        default=0,
        help="then profile an epoch of this many steps, its start and end included (the old window)",
    )
    parser.add_argument(
        "--nvml", type=int, default=0, help="then this many steps unprofiled, GPU busy read by nvidia-smi"
    )
    parser.add_argument("--hostprof", type=int, default=0, help="then cProfile this many steps (host time)")
    parser.add_argument("--syncs", action="store_true", help="then count device syncs of one step by site")
    parser.add_argument(
        "--timeline", type=int, default=0, help="then profile this many steps: host ms vs GPU ms per phase"
    )
    parser.add_argument("--trace", help="with --timeline: also write each run's Chrome trace here (.json.gz)")
    parser.add_argument("--scratch", default="/tmp/gpu-recipes")
    parser.add_argument("--workers", type=int, help="override trainer.num_workers (data-loader processes)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per run")
    parser.add_argument(
        "--compile-cache", help="torch.compile artifacts: loaded if the file exists, saved after compiling"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="-", help="JSON lines file ('-': stdout)")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return
    sink = sys.stdout if args.out == "-" else open(args.out, "a")  # noqa: SIM115
    for run in args.runs:
        cmd = [sys.executable, __file__, "--one", run, *sys.argv[1:]]
        cmd = [c for c in cmd if c not in args.runs or c == run]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            # the log without tqdm's progress lines
            kept = [ln for ln in err.replace("\r", "\n").splitlines() if "/s]" not in ln and "/s," not in ln]
            proc = subprocess.CompletedProcess(
                cmd, -9, "", "\n".join(kept)[-2500:] + f"\ntimeout after {args.timeout} s"
            )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout)[-3000:]
            oom = "OutOfMemoryError" in tail or "CUDA out of memory" in tail
            result = {
                "run": run,
                "error": "out of memory" if oom else f"exit {proc.returncode}",
                "tail": tail,
            }
            watched = [ln for ln in (proc.stdout or "").splitlines() if ln.startswith("WATCH ")]
            if watched:  # nan_watch=true: what it saw before the run ended
                result["watch"] = json.loads(watched[-1][len("WATCH ") :])
        else:
            result = json.loads(lines[-1][len("RESULT ") :])
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        sink.write(json.dumps(result) + "\n")
        sink.flush()
        print(
            run, {k: v for k, v in result.items() if k not in ("loss", "tail")}, file=sys.stderr, flush=True
        )


if __name__ == "__main__":
    main()
