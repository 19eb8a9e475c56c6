"""The model sam3's trainer trains: built from the fetched spec, the groups a run does not train
frozen, LoRA adapters added, and parts compiled (configs/train/sam3ft.yaml's `model`)."""

from __future__ import annotations

from typing import Any

import torch

from sam3ft.model.build import build_model
from sam3ft.model.lora import add_lora
from sam3ft.model.spec import load_spec_file
from sam3ft.train.matching import stacked_matching

# Parameter-name prefixes of the groups `trainer.trainable` can list. Every parameter of a SAM3
# image model belongs to a group (tests/test_train.py checks it on the full model); a parameter is
# frozen when any group it belongs to is. The neck's two finest levels (convs.0: 4x, convs.1: 2x)
# feed only the mask head: without mask losses they get no gradient, which DDP refuses on the second
# step ("Expected to have finished reduction"), so they belong to "masks" too. "masks" is not a
# `trainer.trainable` choice: it trains exactly when `trainer.segmentation` is true (the train stage
# adds it), so the neck's mask levels train only with both "neck" listed and segmentation on.
GROUPS: dict[str, tuple[str, ...]] = {
    "trunk": ("backbone.vision_backbone.trunk.",),
    "neck": ("backbone.vision_backbone.convs.", "backbone.vision_backbone.sam2_convs."),
    "text": ("backbone.language_backbone.",),
    "encoder": ("transformer.encoder.",),
    "decoder": ("transformer.decoder.",),
    "geometry": ("geometry_encoder.",),
    "heads": ("dot_prod_scoring.",),
    "masks": ("segmentation_head.", "backbone.vision_backbone.convs.0.", "backbone.vision_backbone.convs.1."),
}


def frozen_prefixes(trainable: list[str]) -> tuple[str, ...]:
    return tuple(p for group, prefixes in GROUPS.items() if group not in trainable for p in prefixes)


def build_trainable_model(
    spec_path: str,
    bpe_path: str,
    trainable: list[str],
    segmentation: bool = False,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    weight_dtype: str = "float32",
    autocast_cache: bool = True,
    compile_trunk: bool = False,
    compile_layers: bool = False,
    compile_model: bool = False,
    compile_mode: str = "reduce-overhead",
    act_ckpt_trunk: bool = True,
    act_ckpt_text: bool = True,
    act_ckpt_geometry: bool = True,
    act_ckpt_detr: bool = True,
    stacked_matching: bool = False,
    init_seed: int | None = None,
) -> torch.nn.Module:
    """The model for the trainer, with every parameter outside `trainable` groups frozen;
    `segmentation` adds the mask head to a preset built without one (tiny); LoRA adapters
    (trainable) go on the trunk's attention when `lora_rank` > 0; `stacked_matching` matches all
    decoder layers' outputs in one matcher call (train/matching.py); `compile_mode` is torch.compile's
    mode for `compile_model` (not a params key: bench/gpu_scaling.py compares modes through a
    config override). With `init_seed` the preset's random init is drawn from
    `torch.manual_seed(init_seed)` on a forked RNG: sam3's trainer seeds every process with
    (seed + rank) x max_epochs, so without it the init would change with trainer.max_epochs, and
    the baseline stage (`model/load.load_base`) could not build the same start from base.seed alone.
    The process's own RNG stream goes on as sam3 seeded it.

    `autocast_cache` is process-wide: sam3's trainer builds its autocast contexts without
    `cache_enabled`, so they take torch's global default, which is set here, in the training process.
    """
    torch.set_autocast_cache_enabled(autocast_cache)
    spec = load_spec_file(spec_path).with_mask_head(segmentation)
    with torch.random.fork_rng(devices=[]):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        built = build_model(spec, bpe_path)
    model = freeze_and_adapt(built, trainable, lora_rank, lora_alpha)
    if weight_dtype != "float32":
        cast_weights(model, getattr(torch, weight_dtype))
    compile_parts(model, trunk=compile_trunk, layers=compile_layers)
    if compile_model:
        compile_training_forward(model, compile_mode)
    if stacked_matching or compile_model:
        replace_matching(model, stacked=stacked_matching, eager=compile_model)
    if not act_ckpt_trunk:
        # sam3's ViT wraps each block in torch.utils.checkpoint while training when this is set
        # (sam3/model/vitdet.py); cleared, the blocks run plainly and autograd keeps their
        # activations. Read at each forward; torch.compile traces lazily, at the first step.
        vit: Any = model.get_submodule("backbone.vision_backbone.trunk")
        vit.use_act_checkpoint = False
    if not act_ckpt_text:
        # upstream re-runs the text blocks in the backward pass, in Python: host time per step,
        # traded for keeping their activations (bench/LOG.md has the measured trade)
        text: Any = model.get_submodule("backbone.language_backbone.encoder.transformer")
        text.grad_checkpointing = False
    if not act_ckpt_geometry:
        # its layers' recompute runs eager in the backward even under compile_model: host time in
        # every step, which sets the step time of a compiled run at batch 1
        geometry: Any = model.get_submodule("geometry_encoder")
        geometry.use_act_ckpt = False
    if not act_ckpt_detr:
        keep_detr_activations(model)
    return model


# set on a module: sam3's activation_ckpt_wrapper, as keep_activations installs it, runs the
# module plainly; set on that installed wrapper: it is installed
KEEP_ACTIVATIONS = "_sam3ft_keep_activations"


def keep_detr_activations(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The DETR encoder's and decoder's layers and the decoder's box-bias MLPs run without
    activation checkpointing while training (keep_activations). Returns the modules so marked."""
    encoder: Any = model.get_submodule("transformer.encoder")
    decoder: Any = model.get_submodule("transformer.decoder")
    marked = [*encoder.layers, *decoder.layers]
    box_bias = (getattr(decoder, "boxRPB_embed_x", None), getattr(decoder, "boxRPB_embed_y", None))
    marked += [m for m in box_bias if m is not None]
    keep_activations(marked)
    return marked


def keep_activations(modules: list[torch.nn.Module]) -> None:
    """`modules`, each one sam3's DETR encoder or decoder passes to `activation_ckpt_wrapper`, run
    without activation checkpointing while training: autograd keeps their activations and the
    backward pass does not re-run their forwards.

    sam3's encoder and decoder assert their `use_act_checkpoint` whenever they train and pass that
    same flag to `activation_ckpt_wrapper` (sam3/model/act_ckpt_utils.py) as `act_ckpt_enable`, so
    the flag itself cannot be cleared. Instead the modules are marked, and the name
    `activation_ckpt_wrapper` in sam3.model.encoder and sam3.model.decoder, looked up at each call,
    is bound to a wrapper that turns checkpointing off for marked modules only: other models in the
    process are checkpointed as before. Non-reentrant checkpointing restores the RNG state for its
    recompute, so dropout draws the same masks either way."""
    import sam3.model.decoder as decoder_code
    import sam3.model.encoder as encoder_code

    for code in (encoder_code, decoder_code):
        if not getattr(code.activation_ckpt_wrapper, KEEP_ACTIVATIONS, False):
            code.activation_ckpt_wrapper = _sparing_marked(code.activation_ckpt_wrapper)  # type: ignore[attr-defined]
    for module in modules:
        setattr(module, KEEP_ACTIVATIONS, True)


def _sparing_marked(wrapper: Any) -> Any:
    """`wrapper` (sam3's activation_ckpt_wrapper) with act_ckpt_enable forced off for modules that
    carry KEEP_ACTIVATIONS."""

    def wrap(module: Any) -> Any:
        wrapped = wrapper(module)
        if not getattr(module, KEEP_ACTIVATIONS, False):
            return wrapped
        return lambda *args, act_ckpt_enable=True, **kwargs: wrapped(*args, act_ckpt_enable=False, **kwargs)

    setattr(wrap, KEEP_ACTIVATIONS, True)
    return wrap


def compile_parts(model: torch.nn.Module, trunk: bool, layers: bool) -> None:
    """torch.compile the ViT trunk's forward and/or each DETR encoder and decoder layer's forward,
    in place. Both run under activation checkpointing in training, compiled in the forward pass and
    again in the backward's recompute."""
    if trunk:
        # what sam3's ViT does with its own `compile_mode` (sam3/model/vitdet.py:797): the whole
        # forward, activation checkpointing inside
        vit: Any = model.get_submodule("backbone.vision_backbone.trunk")
        vit.forward = torch.compile(vit.forward, fullgraph=True)
    if layers:
        # sam3 calls each through activation_ckpt_wrapper (sam3/model/act_ckpt_utils.py); the
        # decoder layers' Python options (dac, masks) cause graph breaks, so not fullgraph
        for name in ("transformer.encoder.layers", "transformer.decoder.layers"):
            stack: Any = model.get_submodule(name)  # a ModuleList
            for layer in stack:
                layer.forward = torch.compile(layer.forward)
    if trunk or layers:
        torch._dynamo.config.optimize_ddp = False  # DDP's graph splitting cannot split a checkpoint


def compile_training_forward(model: torch.nn.Module, mode: str = "reduce-overhead") -> None:
    """torch.compile the model's whole forward for training, by default in mode "reduce-overhead":
    on CUDA every compiled graph, forward and backward, replays as a CUDA graph, which takes the
    host's kernel launches out of the step.

    - Validation (eval mode) runs the eager forward: a compiled one would compile again.
    - The Hungarian matching stays eager (`replace_matching`).
    - The geometry encoder stays eager: compiled, its box-pooling conv failed inductor's stride
      check in the backward on the CPU.
    - The trainer must run the first training step eager (`Trainer(compile_model=True)`): sam3
      fills device caches lazily on the first forward (sam3/model/position_encoding.py:123,
      sam3/model/decoder.py:336), and one filled inside a CUDA graph is overwritten by the next
      replay (seen on a GPU, bench/LOG.md).
    - Under DDP the wrapper stays outside: DDP calls this module, whose forward is the compiled one.
      Its all-reduce runs from autograd hooks on the gradients the compiled backward hands back, so
      it is never inside a graph (CUDA graphs included); with `gradient_as_bucket_view` the reducer
      copies each gradient into its bucket, so no gradient keeps a CUDA graph's output memory alive.
      `optimize_ddp` is off (below): the backward is one graph per forward graph, and the all-reduce
      of its gradients starts when that graph's backward ends instead of overlapping it. DDP's
      `find_unused_parameters` still works: its walk from the outputs reaches every parameter through
      the compiled graph's autograd node. Validation runs eager, out of the graphs (with CUDA graphs
      trained and replayed under DDP, a compiled evaluation is reported to crash in torch's caching
      allocator: pytorch/pytorch#128218).
    """
    eager = model.forward
    compiled = torch.compile(eager, mode=mode)

    def forward(*args: Any, **kwargs: Any) -> Any:
        return (compiled if model.training else eager)(*args, **kwargs)

    model.forward = forward  # type: ignore[method-assign]
    geometry: Any = model.get_submodule("geometry_encoder")
    geometry.forward = torch.compiler.disable(geometry.forward)
    torch._dynamo.config.optimize_ddp = False  # DDP's graph splitting cannot split a checkpoint


def replace_matching(model: torch.nn.Module, stacked: bool, eager: bool) -> None:
    """The one patch of sam3's `_compute_matching` (sam3/model/sam3_image.py:578): all outputs
    matched in one matcher call (`stacked`, train/matching.py), and/or kept eager under
    `compile_training_forward` (`eager`): sam3's matcher runs scipy on host copies, and dynamo fails
    tracing its index building (sam3/train/matcher.py:651)."""
    matching: Any = stacked_matching(model) if stacked else model._compute_matching
    if eager:
        matching = torch.compiler.disable(matching)
    model._compute_matching = matching  # type: ignore[method-assign]


def trained_groups(trainable: list[str], segmentation: bool) -> list[str]:
    """The groups that train: `trainer.trainable`, plus "masks" exactly when masks train."""
    return list(trainable) + (["masks"] if segmentation else [])


def outside_autocast(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters sam3 uses with CUDA autocast switched off, on float32 inputs: each decoder
    layer's feed-forward linears (`TransformerDecoderLayer.forward_ffn` disables autocast)."""
    from sam3.model.decoder import TransformerDecoderLayer

    return [
        param
        for module in model.modules()
        if isinstance(module, TransformerDecoderLayer)
        for linear in (module.linear1, module.linear2)
        for param in linear.parameters()
    ]


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every parameter (frozen ones too) held in `dtype`, in place, except those sam3 runs outside
    autocast (`outside_autocast`): they stay float32, or their float32 inputs would meet `dtype`
    weights. Buffers keep theirs: RoPE's complex tables and the position encodings' precomputed
    grids stay exact, and autocast casts what meets them."""
    kept = {id(param) for param in outside_autocast(model)}
    for param in model.parameters():
        if id(param) not in kept:
            param.data = param.data.to(dtype)


def freeze_and_adapt(
    model: torch.nn.Module, trainable: list[str], lora_rank: int, lora_alpha: float
) -> torch.nn.Module:
    """Freeze every parameter outside the `trainable` groups; LoRA on the trunk when `lora_rank` > 0."""
    frozen = frozen_prefixes(trainable)
    for name, param in model.named_parameters():
        if name.startswith(frozen):
            param.requires_grad_(False)
    if lora_rank > 0:
        add_lora(model, lora_rank, lora_alpha)
    return model
