"""Peak GPU memory of a training run, estimated per recipe before any GPU work.

peak = weights (4 B x all params; 2 B with trainer.weight_dtype bfloat16)
     + grads (the weights' bytes per element x trainable; DDP keeps them in its buckets for the whole
       run; with an *_in_backward optimizer, which frees each gradient once its weight stepped, x the
       largest trainable tensor)
     + optimizer moments (8 B x trainable for adamw/adamw_fused, 4 B for adamw_bf16)
     + autocast's bf16 weight copies (2 B x all params) while trainer.autocast_cache is true and the
       weights are fp32
     + with bf16 weights, the torch-ops update's temporaries for one bucket (STEP_TEMPORARIES_GB;
       adamw_bf16's Triton kernel, which allocates nothing, updates fp32 weights only)
     + activations: a measured GB per image at the preset's resolution, one figure when the backward
       pass runs through the ViT trunk (trunk trains, or LoRA adapts it), one when it stops above it;
       a little more per image when the text encoder, the geometry encoder or the DETR layers train
       without activation checkpointing
     + a small measured constant (CUDA workspaces, loss and matcher buffers).
Without the DDP wrapper (one process, trainer.ddp_one_process: false) gradients exist only from the
backward pass on, so the peak is the larger of: the above less the gradients (the forward pass's
activations, large batches), and weights + gradients + moments + a measured working set at the end
of the backward pass (small batches).
The per-image figures and the constant were fitted on the stock and frozen-trunk rows of
bench/results/gpu_recipes.jsonl (H100, bf16 autocast); the other recipes' peaks there are predictions
(tests/test_doctor.py checks every row).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sam3ft.model.build import build_model, empty_weights
from sam3ft.model.spec import ModelSpec
from sam3ft.params import IN_BACKWARD, WEIGHT_BYTES, Trainer
from sam3ft.preflight import GB, weights_and_states_bytes
from sam3ft.train.model import freeze_and_adapt

# adamw_bf16's torch-ops update of one CHUNK bucket (16.8 M elements): 352 MB measured for the
# moments' part (bench/optim_step.py); the fp32 copy of the bucket's weights and its stochastic
# rounding add ~64 MB (computed from train/optim.py AdamWBf16._update)
STEP_TEMPORARIES_GB = 0.42


@dataclass(frozen=True)
class Activations:
    """Measured activation memory of one preset at its image_size with bf16 autocast."""

    trunk_backward_gb: float
    """GB per image when the backward pass goes through the ViT trunk (trunk trains, or LoRA)."""
    frozen_trunk_gb: float
    """GB per image when trunk and text encoder are frozen."""
    constant_gb: float
    """GB independent of batch and parameters."""
    trunk_kept_gb: float
    """GB more per image when the backward runs through the ViT trunk with `act_ckpt_trunk: false`."""
    text_kept_gb: float
    """GB more per image when the text encoder trains with `act_ckpt_text: false`."""
    geometry_kept_gb: float
    """GB more per image when the backward runs through the geometry encoder with
    `act_ckpt_geometry: false`."""
    detr_kept_gb: float
    """GB more per image when the backward runs through the DETR encoder and decoder with
    `act_ckpt_detr: false`."""
    backward_end_gb: float
    """GB in use besides weights, gradients and moments when the backward pass ends (no DDP)."""


MEASURED = {
    # text_kept_gb: lean batch 9, 23.36 GB without the text encoder's checkpointing, 22.73 with it;
    # geometry_kept_gb: lean batch 9, 23.60 GB with the geometry encoder unchecked too,
    # (23.60 - 23.36) / 9; backward_end_gb: lean batch 1, 10.59 GB with an optimizer step that
    # allocates nothing; trunk_kept_gb: lean batch 4, 41.99 GB with the ViT unchecked, 14.69 with it
    # checked, (41.99 - 14.69) / 4 (one call); detr_kept_gb: lean batch 4 with the trunk unchecked,
    # eager, 45.84 GB with the DETR layers unchecked too, 41.99 without, (45.84 - 41.99) / 4 (one
    # call; compiled keeps less: 0.63 per image, so the estimate errs high there).
    # Rows of bench/results/gpu_recipes.jsonl
    "sam3": Activations(
        trunk_backward_gb=1.77,
        frozen_trunk_gb=0.90,
        constant_gb=0.15,
        trunk_kept_gb=6.83,
        text_kept_gb=0.07,
        geometry_kept_gb=0.027,
        detr_kept_gb=0.96,
        backward_end_gb=0.40,
    ),
}


def param_counts(spec: ModelSpec, vocab: Path, trainable: list[str], lora_rank: int) -> tuple[int, int]:
    """(all, trainable) parameters of the model the trainer builds, counted on the meta device."""
    total, trained, _ = param_sizes(spec, vocab, trainable, lora_rank)
    return total, trained


def param_sizes(spec: ModelSpec, vocab: Path, trainable: list[str], lora_rank: int) -> tuple[int, int, int]:
    """(all, trainable, largest trainable tensor) parameter counts of the model the trainer builds,
    on the meta device."""
    with empty_weights():
        model = build_model(spec, str(vocab), training=True, coord_cache=False)
        freeze_and_adapt(model, trainable, lora_rank, lora_alpha=1.0)  # alpha changes no count
    params = list(model.parameters())
    trained = [p.numel() for p in params if p.requires_grad]
    return sum(p.numel() for p in params), sum(trained), max(trained, default=0)


def training_peak_gb(
    spec: ModelSpec, total: int, trainable: int, trainer: Trainer, largest: int | None = None
) -> tuple[float, str]:
    """Estimated peak allocated GPU memory in GB for `trainer` (params.Trainer), and how it was made.
    `largest`: parameters of the largest trainable tensor (None: `trainable`, an upper bound), the
    only gradient an *_in_backward optimizer holds at once."""
    in_backward = trainer.optimizer.endswith(IN_BACKWARD)
    weight_bytes = WEIGHT_BYTES[getattr(trainer, "weight_dtype", "float32")]
    bf16_weights = weight_bytes == 2
    grads = weight_bytes * (trainable if largest is None or not in_backward else largest)
    temporaries = STEP_TEMPORARIES_GB * GB if bf16_weights else 0.0
    weights_grads_states = weights_and_states_bytes(trainer, total, trainable) + grads + temporaries
    cached = trainer.amp and trainer.autocast_cache and not bf16_weights
    static = weights_grads_states + (2 * total if cached else 0)
    how = f"{total / 1e6:.0f} M params, {trainable / 1e6:.1f} M trainable, {trainer.optimizer}"
    if bf16_weights:
        how += ", bf16 weights"
    act = MEASURED.get(spec.name)
    if act is None:
        return static / GB, how + "; activations of this preset not measured (a lower bound)"
    through_trunk = "trunk" in trainer.trainable or trainer.lora_rank > 0
    per_image = act.trunk_backward_gb if through_trunk else act.frozen_trunk_gb
    if through_trunk and getattr(trainer, "act_ckpt_trunk", True) is False:
        per_image += act.trunk_kept_gb
    if "text" in trainer.trainable and getattr(trainer, "act_ckpt_text", True) is False:
        per_image += act.text_kept_gb
    through_geometry = through_trunk or bool({"neck", "geometry"} & set(trainer.trainable))
    if through_geometry and getattr(trainer, "act_ckpt_geometry", True) is False:
        per_image += act.geometry_kept_gb
    # a gradient reaches the DETR layers unless only the scoring heads train
    through_detr = through_trunk or bool(set(trainer.trainable) - {"heads"})
    if through_detr and getattr(trainer, "act_ckpt_detr", True) is False:
        per_image += act.detr_kept_gb
    how += f", {per_image:.2f} GB activations per image (measured)"
    if not trainer.amp:
        per_image, how = 2 * per_image, how + " x 2 for fp32 (amp off; assumed, not measured)"
    peak = static / GB + act.constant_gb + per_image * trainer.batch_size
    if uses_ddp(trainer):
        return peak, how
    # The optimizer step allocates nothing on CUDA with adamw_bf16's Triton kernel or torch's fused
    # AdamW (bench/optim_step.py), so its temporaries are not a term. Not modelled: adamw_bf16 on torch
    # ops, as on cards without native bf16 such as a T4 (352 MB more, ~3% of lean's batch-1 peak);
    # torch's foreach AdamW's group-sized temporary (runs with it had DDP, whose peak comes earlier).
    step_end = weights_grads_states / GB + act.backward_end_gb
    return max(peak - grads / GB, step_end + act.constant_gb), how + ", no DDP wrapper"


def uses_ddp(trainer: Trainer) -> bool:
    """Whether sam3's trainer wraps the model in DDP: always with several processes; with one,
    unless trainer.ddp_one_process is false (sam3ft.train.trainer.Trainer)."""
    processes = max(1, getattr(trainer, "num_gpus", 1)) * getattr(trainer, "num_nodes", 1)
    return processes > 1 or getattr(trainer, "ddp_one_process", True) is not False
