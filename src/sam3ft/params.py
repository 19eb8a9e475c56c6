"""params.yaml, section by section, as typed dataclasses; every key and type is checked.

A stage loads only the sections dvc.yaml declares for it, so unrelated edits never re-run it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sam3ft.errors import ConfigError, Sam3ftError
from sam3ft.layout import CONFIGS_DIR, DEFAULT_PARAMS
from sam3ft.model.spec import PATCH_SIZE, load_preset, preset_train_defaults

IN_BACKWARD = "_in_backward"  # suffix of the optimizers that step each parameter inside the backward pass
# built by sam3ft.train.optim.make_optimizer
OPTIMIZERS = ("adamw", "adamw_fused", "adamw_bf16", "adamw" + IN_BACKWARD, "adamw_bf16" + IN_BACKWARD)
# bytes per trainable parameter of each optimizer's state (AdamW's two moments: fp32, or bf16)
STATE_BYTES = {name: 4 if "bf16" in name else 8 for name in OPTIMIZERS}
WEIGHT_BYTES = {"float32": 4, "bfloat16": 2}  # trainer.weight_dtype: bytes per weight (and gradient)
# box metrics the trainer's validation logs every epoch (named as sam3ft.train.logging.val_metrics
# names them) that trainer.select may pick; the per-size ones are left out (-1 without such objects)
SELECT_METRICS = ("AP", "AP50", "AP75", "AR@1", "AR@10", "AR@100")
# trainer keys a recipe (configs/recipes/<trainer.recipe>.yaml) may set, each where it differs from
# Trainer's default (upstream's recipe). The chosen ones are in params.yaml, null = the recipe's; a value
# set there wins.
CHOSEN_RECIPE_KEYS = (
    "optimizer",
    "trainable",
    "lora_rank",
    "lora_alpha",
    "compile_trunk",
    "compile_layers",
    "compile_model",
    "weight_dtype",
    "act_ckpt_trunk",
    "act_ckpt_detr",
)
# Recipe-only: switches that keep the numbers (memory, host waits; docs/training.md), set by the
# recipes, absent from params.yaml; a params file may still set one for an A/B run (tests, bench/).
SWITCH_KEYS = (
    "autocast_cache",
    "ddp_one_process",
    "sync_once",
    "act_ckpt_text",
    "act_ckpt_geometry",
    "batched_loss",
)
RECIPE_KEYS = CHOSEN_RECIPE_KEYS + SWITCH_KEYS
# trainer keys that follow model.preset where params.yaml leaves them null: resolution is the preset's
# image_size, the others its `train:` block (configs/model/<preset>.yaml); amp only on a GPU
PRESET_KEYS = ("resolution", "resize_min", "amp", "lr_scale", "o2m_weight")
AUTO = "auto"  # trainer.num_gpus: the CUDA devices visible here
GROUPS = ("trunk", "neck", "text", "encoder", "decoder", "geometry", "heads")  # trainer.trainable
T = TypeVar("T")
CARVED_SPLITS = {"valid": 0.2, "test": 0.1}  # prepare.split default: what prepare carves from train
GPU_PREDICT_BATCH = 8  # images per predict batch on a GPU where none is given (evaluate, serve)


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes, relative to the repository root."""

    data: str
    """Roboflow COCO exports, one folder per dataset (tracked by data.dvc)."""
    base: str
    """fetch output: BPE vocabulary, base weights, manifest.json."""
    prepared: str
    """prepare output: the dataset in sam3's layout, stats.json, preview.png."""
    train: str
    """train output: trainer checkpoint, run record, dvclive logs."""
    eval: str
    """evaluate output: metrics.json and COCO predictions."""
    baseline: str
    """baseline output: metrics.json of the base model (fetch's weights, before any training)."""
    export: str
    """export output: safetensors weights and model.json."""
    check: str
    """check output: a small JSON file every other stage depends on, so the check runs first."""
    scratch: str
    """Trainer working directory (logs with timestamps, tensorboard); never tracked."""


@dataclass(frozen=True)
class Base:
    """Settings every stage shares."""

    seed: int
    """Seed for model init, data order and augmentation."""
    threads: int
    """torch CPU threads (1 is fastest and deterministic on 2-core machines)."""

    def __post_init__(self) -> None:
        _check(self.threads >= 1, "base.threads", self.threads, "an integer >= 1")
        _check(self.seed >= 0, "base.seed", self.seed, "an integer >= 0")


@dataclass(frozen=True)
class Model:
    """Which architecture to build."""

    preset: str
    """Name of a file in configs/model/ (tiny, sam3)."""


@dataclass(frozen=True)
class Fetch:
    """Where the base weights come from."""

    weights: str
    """none (seeded random init) | hf://owner/repo[/file][@revision] | s3://bucket/key | local path."""
    min_loaded: float = 0.95
    """Fail unless the weights cover at least this share of the model's parameters."""

    def __post_init__(self) -> None:
        _check(0.0 < self.min_loaded <= 1.0, "fetch.min_loaded", self.min_loaded, "a share in (0, 1]")


@dataclass(frozen=True)
class Prepare:
    """Which export to use and how its classes are prompted."""

    dataset: str
    """Folder under paths.data holding the Roboflow COCO export."""
    prompts: dict[str, str] = field(default_factory=dict)
    """Category name -> text prompt, for exports whose class names read badly."""
    preview_images: int = 4
    """How many images preview.png shows."""
    split: dict[str, float] = field(default_factory=lambda: dict(CARVED_SPLITS))
    """Share of train's source photos carved into each of valid/test when the export lacks that
    split folder (at least one photo each while train keeps one); an exported split is kept as is."""
    seed: int = 0
    """Seed of the carving: the same export and seed always give the same splits. Apart from
    base.seed, so retraining with another seed is measured on the same validation images."""
    allow_leakage: bool = False
    """Accept the same image file (by content) in two splits, with a warning instead of an error."""

    def __post_init__(self) -> None:
        _check(self.preview_images >= 0, "prepare.preview_images", self.preview_images, ">= 0")
        _check(self.seed >= 0, "prepare.seed", self.seed, "an integer >= 0")
        _check(
            set(self.split) <= set(CARVED_SPLITS),
            "prepare.split",
            self.split,
            f"shares for {list(CARVED_SPLITS)} only, e.g. {CARVED_SPLITS}",
        )
        for name, share in self.split.items():
            _check(0 <= share < 1, f"prepare.split.{name}", share, "a share in [0, 1)")
        _check(sum(self.split.values()) < 1, "prepare.split", self.split, "shares summing to less than 1")
        for name, prompt in self.prompts.items():
            _check(bool(prompt.strip()), f"prepare.prompts.{name}", prompt, "a non-empty text")


@dataclass(frozen=True)
class Trainer:
    """Knobs of sam3's Trainer; each one is read by configs/train/sam3ft.yaml (checked), except
    num_gpus and num_nodes, which the launcher (sam3ft.train.launch) consumes."""

    num_gpus: int
    """GPUs per node, one training process each; 0 trains on the CPU. `auto` in params.yaml: the
    CUDA devices visible where the stage runs (0 on a CPU machine), resolved when params load."""
    max_epochs: int
    """Epochs to train (the trainer runs exactly this many, or fewer when `patience` stops it)."""
    batch_size: int
    """Images per batch."""
    grad_accum: int
    """Batches accumulated per optimizer step."""
    num_workers: int
    """Data-loader worker processes."""
    resolution: int
    """Training and evaluation image side in px; must equal the preset's image_size (null: it)."""
    resize_min: int
    """Smallest side of random-resize augmentation, px (null: the preset's)."""
    max_ann_per_img: int
    """Queries with more objects than this are dropped."""
    lr_scale: float
    """Multiplies the three base learning rates (null: the preset's; 0.1 for released sam3 weights)."""
    lr_transformer: float
    """Base learning rate of encoder, decoder and heads."""
    lr_vision: float
    """Base learning rate of the vision backbone."""
    lr_text: float
    """Base learning rate of the text backbone."""
    layer_decay: float
    """Per-block learning-rate decay in the ViT trunk."""
    weight_decay: float
    """AdamW weight decay (not applied to biases and LayerNorms)."""
    grad_clip: float
    """Max gradient norm (global L2 over the trainable weights; per weight tensor with an
    *_in_backward optimizer)."""
    warmup_steps: int
    """Linear warm-up, optimizer steps."""
    cooldown_steps: int
    """Linear cool-down at the end, optimizer steps."""
    timescale: int
    """Inverse-square-root schedule timescale, steps."""
    val_epoch_freq: int
    """Validate every N epochs (and always after the last); 1 when `select` is a metric."""
    checkpoint_freq: int
    """Keep checkpoint_<epoch>.pt every N epochs; 0 keeps only the latest."""
    amp: bool
    """Mixed precision autocast (CUDA only; null: the preset's on a GPU, off on the CPU)."""
    amp_dtype: str
    """bfloat16 | float16."""
    trainable: list[str] = field(default_factory=lambda: list(GROUPS))
    """Parameter groups that train: trunk, neck, text, encoder, decoder, geometry, heads; others frozen.
    From the recipe when params.yaml leaves it null."""
    segmentation: bool = False
    """Train masks too: COCO polygons/RLE of the train split, mask + semantic losses, a mask head
    (added to presets without one) and the neck levels feeding it. false: boxes only, those frozen."""
    select: str = "AP50"
    """The epoch whose checkpoint is tracked (and so evaluated and exported): `last`, or the best
    validation value of a metric in SELECT_METRICS (ties: the earliest epoch)."""
    min_delta: float = 0.0
    """A later epoch is better only when it beats the best so far by more than this."""
    patience: int = 0
    """Stop after this many validated epochs without improvement of `select`; 0 = off."""
    o2m_weight: float = 2.0
    """Weight of the loss on sam3's one-to-many queries (DAC; upstream 2.0, 0 = one-to-one loss only);
    null in params.yaml = the preset's."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay (0 = off): validation,
    `select`, evaluate and export then use the averaged weights."""
    num_nodes: int = 1
    """Machines (SLURM nodes) with num_gpus each; more than 1 needs launcher.kind: slurm."""
    allow_cpu: bool = False
    """Let a preset sized for GPUs (sam3) train with num_gpus 0: hours per step on a CPU, so it is
    refused unless asked for here."""
    recipe: str = "stock"
    """configs/recipes/<name>.yaml: its values for RECIPE_KEYS (those differing from the defaults
    below) apply where params.yaml leaves a key null or out."""
    optimizer: str = "adamw"
    """adamw (torch, as upstream) | adamw_fused | adamw_bf16 (bf16 moments: half the optimizer memory)
    | adamw_in_backward | adamw_bf16_in_backward (each parameter stepped in the backward pass as its
    gradient is produced, then the gradient freed: no whole-model gradients; grad_clip then scales
    by the previous backward's global norm; needs grad_accum 1, one process without DDP, and no
    fp16 autocast)."""
    weight_dtype: str = "float32"
    """float32 | bfloat16: the dtype every weight is held in while training. bfloat16 halves the
    weights' memory (and the gradients'); each optimizer step computes in float32 and rounds the
    new weight onto bf16 stochastically, so updates smaller than bf16's step still move it in
    expectation. Needs adamw_bf16 or adamw_bf16_in_backward, bf16 autocast, and no EMA."""
    lora_rank: int = 0
    """LoRA rank on the ViT trunk's attention (qkv, proj); 0 = off. Needs trunk frozen."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: adapters add (alpha / rank) * B A to each adapted weight."""
    autocast_cache: bool = True
    """Keep autocast's bf16 copies of the weights for the whole forward (torch default); false
    casts per use: same numbers, up to 1.7 GB less peak memory for the full model."""
    ddp_one_process: bool = True
    """Wrap the model in DDP even when one process trains (as upstream); false: same numbers, and
    gradients are allocated only from the backward pass on (3.3 GB less for the full model)."""
    sync_once: bool = False
    """Read a training step's loss values from the GPU once, copied after the backward pass and
    read in the next step; false: once per term and logger, a host wait each (as upstream).
    Same values and logs; a non-finite loss stops training one step later, before the next
    optimizer step."""
    compile_trunk: bool = False
    """torch.compile the ViT trunk's forward (activation checkpointing inside, as sam3's own
    `compile_mode` does) for training: compiles on the first step (minutes for the full model)."""
    compile_layers: bool = False
    """torch.compile each layer of the DETR encoder and decoder for training (they stay
    checkpointed): their small kernels cost host time, not GPU time. Compiles on the first step;
    inductor draws the layers' dropout masks from its own generator (other masks, same seed)."""
    compile_model: bool = False
    """torch.compile the model's whole training forward with CUDA graphs (mode reduce-overhead;
    train/model.compile_training_forward): the first step runs eager, the second compiles (4-5
    minutes for the full model), validation stays eager; same peak memory, the host's kernel
    launches replayed as graphs (speed-ups measured in bench/README.md). With batched_loss, the
    loss's batched terms are compiled too (dynamic shapes, no CUDA graphs: their sizes change with
    the objects in a batch). Under DDP (several training processes) each process compiles its own
    copy, DDP's all-reduce stays outside the graphs. Instead of compile_trunk and compile_layers,
    not with them."""
    act_ckpt_trunk: bool = True
    """Activation checkpointing in the ViT trunk (as upstream); false: each of its blocks keeps its
    activations and the backward pass stops re-running the blocks' forwards, the largest share of a
    step's compute that checkpointing repeats. Same numbers; several GB more per image at the sam3
    preset's 1008 px (train/memory.py models it), so for cards with room to spare. Changes nothing
    when no gradient flows through the trunk (frozen, no LoRA)."""
    act_ckpt_text: bool = True
    """Activation checkpointing in the text encoder (as upstream); false: its activations are kept
    and the backward pass skips re-running its blocks. Same numbers; less step time for a little
    more memory per image (train/memory.py models it)."""
    act_ckpt_geometry: bool = True
    """Activation checkpointing in the geometry encoder (as upstream); false: its activations are
    kept and the backward pass skips re-running its layers in Python. Same numbers; a little more
    memory per image (train/memory.py models it), and the step's host time drops by the recompute,
    which matters most with compile_model, where the host sets the step time."""
    act_ckpt_detr: bool = True
    """Activation checkpointing in the DETR encoder's and decoder's layers (as upstream); false:
    they keep their activations (train/model.keep_detr_activations) and the backward pass stops
    re-running their forwards, the six encoder layers' attention over every image token among them.
    Same numbers; about a GB more per image at the sam3 preset's 1008 px (train/memory.py models
    it), so for cards with room to spare, like act_ckpt_trunk."""
    batched_loss: bool = False
    """Compute sam3's box and classification loss terms for all decoder layers at once
    (train/loss.py) instead of once per layer and query set (upstream: 12 passes for SAM3), and
    match the layers' outputs in one Hungarian matcher call per matcher (train/matching.py;
    upstream: 11 calls, four host waits each). Same terms and logs up to float summation order, the
    same matches; ~1750 fewer small GPU kernels per step."""

    def _check_bf16_weights(self) -> None:
        """What training with bf16 weights needs: an optimizer that rounds onto them stochastically
        (round-to-nearest drops every update below half a bf16 step), autocast to feed the bf16
        layers, and no EMA (an average held in bf16 would drop the same small updates)."""
        why = "with trainer.weight_dtype bfloat16"
        _check(
            self.accelerator == "cuda",
            "trainer.weight_dtype",
            self.weight_dtype,
            "float32 on the CPU (bf16 weights need bf16 autocast, which sam3 runs on CUDA only): "
            "another trainer.recipe, or train on a GPU (trainer.num_gpus >= 1)",
        )
        _check(
            self.optimizer in ("adamw_bf16", "adamw_bf16" + IN_BACKWARD),
            "trainer.optimizer",
            self.optimizer,
            f"adamw_bf16 or adamw_bf16{IN_BACKWARD} {why} (they round each update onto the bf16 "
            "weights stochastically), or trainer.weight_dtype: float32",
        )
        _check(
            self.amp and self.amp_dtype == "bfloat16",
            "trainer.amp",
            self.amp,
            f"true with trainer.amp_dtype bfloat16 {why} (autocast feeds the bf16 layers), or "
            "trainer.weight_dtype: float32",
        )
        _check(
            self.ema_decay == 0,
            "trainer.ema_decay",
            self.ema_decay,
            f"0 {why} (a bf16 average would drop the small updates), or trainer.weight_dtype: float32",
        )

    def _check_in_backward(self) -> None:
        """What an optimizer stepping inside the backward pass cannot do: each gradient is applied
        and freed as it is produced, so no step sees all gradients at once."""
        why = f"with trainer.optimizer {self.optimizer} (each gradient is applied and freed as the backward "
        why += "pass "
        _check(
            self.grad_accum == 1,
            "trainer.grad_accum",
            self.grad_accum,
            f"1 {why}produces it, so gradients cannot add up over batches), or another optimizer",
        )
        _check(
            not (self.amp and self.amp_dtype == "float16"),
            "trainer.amp_dtype",
            self.amp_dtype,
            f"bfloat16 {why}produces it, before fp16's GradScaler could check all gradients for "
            "overflow), or another optimizer",
        )
        _check(
            self.world_size == 1,
            "trainer.num_gpus",
            self.num_gpus,
            f"0 or 1 with trainer.num_nodes 1 {why}produces it, before any all-reduce across "
            "processes), or another optimizer",
        )
        _check(
            not self.ddp_one_process,
            "trainer.ddp_one_process",
            self.ddp_one_process,
            f"false {why}produces it; DDP's buckets expect every gradient to stay until its "
            "all-reduce), or another optimizer",
        )

    @classmethod
    def with_recipe(cls, data: dict[str, Any]) -> dict[str, Any]:
        """`data` with every recipe key that is absent or null taken from the named recipe file,
        when it sets one; the rest keep the defaults."""
        name = data.get("recipe", "stock")
        if not isinstance(name, str):
            raise ConfigError(
                f"trainer.recipe={name!r} is invalid", fix=f"use one of {recipes()}", key="trainer.recipe"
            )
        chosen = {k: v for k, v in data.items() if not (k in RECIPE_KEYS and v is None)}
        return {**load_recipe(name), **chosen}

    @classmethod
    def with_preset(cls, data: dict[str, Any], preset: str) -> dict[str, Any]:
        """`data` with num_gpus `auto` counted here and each of PRESET_KEYS that is absent or null
        taken from the model preset."""
        out = dict(data)
        if out.get("num_gpus") == AUTO:
            out["num_gpus"] = visible_gpus()
        unset = [k for k in PRESET_KEYS if out.get(k) is None]
        if not unset:
            return out
        defaults = {"resolution": load_preset(preset).image_size, **preset_train_defaults(preset)}
        on_gpu = isinstance(out.get("num_gpus"), int) and out["num_gpus"] > 0
        for key in unset:
            if key not in defaults:
                raise ConfigError(
                    f"trainer.{key} is null (= the preset's), but preset {preset!r} sets no train.{key}",
                    fix=f"set trainer.{key}, or add {key} under train: in configs/model/{preset}.yaml",
                    key=f"trainer.{key}",
                )
            out[key] = defaults[key]
        if "amp" in unset and out["amp"] is True and not on_gpu:
            out["amp"] = False  # sam3 autocasts on CUDA only
        return out

    @property
    def accelerator(self) -> str:
        """cuda with at least one GPU, else cpu (what sam3's trainer calls `accelerator`)."""
        return "cuda" if self.num_gpus > 0 else "cpu"

    @property
    def world_size(self) -> int:
        """Training processes in all: one per GPU on every node (1 on the CPU)."""
        return max(self.num_gpus, 1) * self.num_nodes

    def __post_init__(self) -> None:
        _check(self.num_gpus >= 0, "trainer.num_gpus", self.num_gpus, ">= 0 (0 = CPU)")
        _check(self.num_nodes >= 1, "trainer.num_nodes", self.num_nodes, ">= 1")
        _check(
            self.num_nodes == 1 or self.num_gpus >= 1,
            "trainer.num_nodes",
            self.num_nodes,
            "1 when trainer.num_gpus is 0 (CPU training is single-process)",
        )
        for name in (
            "max_epochs",
            "batch_size",
            "grad_accum",
            "val_epoch_freq",
            "resize_min",
            "max_ann_per_img",
            "timescale",
        ):
            _check(getattr(self, name) >= 1, f"trainer.{name}", getattr(self, name), ">= 1")
        for name in ("num_workers", "warmup_steps", "cooldown_steps", "checkpoint_freq"):
            _check(getattr(self, name) >= 0, f"trainer.{name}", getattr(self, name), ">= 0")
        for name in ("lr_scale", "lr_transformer", "lr_vision", "lr_text", "grad_clip"):
            _check(getattr(self, name) > 0, f"trainer.{name}", getattr(self, name), "> 0")
        _check(0 < self.layer_decay <= 1, "trainer.layer_decay", self.layer_decay, "in (0, 1]")
        _check(
            self.select in ("last", *SELECT_METRICS),
            "trainer.select",
            self.select,
            f"last or one of {list(SELECT_METRICS)}",
        )
        _check(
            self.select == "last" or self.val_epoch_freq == 1,
            "trainer.val_epoch_freq",
            self.val_epoch_freq,
            f"1 while trainer.select is {self.select!r} (the best epoch is chosen among validated "
            "epochs), or set trainer.select: last",
        )
        _check(self.min_delta >= 0, "trainer.min_delta", self.min_delta, ">= 0")
        _check(self.patience >= 0, "trainer.patience", self.patience, ">= 0 (0 = off)")
        _check(self.o2m_weight >= 0, "trainer.o2m_weight", self.o2m_weight, ">= 0 (0 = off)")
        _check(0 <= self.ema_decay < 1, "trainer.ema_decay", self.ema_decay, "a decay in [0, 1) (0 = off)")
        _check(
            self.patience == 0 or self.select != "last",
            "trainer.patience",
            self.patience,
            "0 while trainer.select is last (early stopping watches the selected metric; set "
            "trainer.select: AP50, say)",
        )
        _check(self.weight_decay >= 0, "trainer.weight_decay", self.weight_decay, ">= 0")
        _check(
            self.resolution % PATCH_SIZE == 0 and self.resolution > 0,
            "trainer.resolution",
            self.resolution,
            f"a positive multiple of {PATCH_SIZE}",
        )
        _check(
            self.resize_min <= self.resolution,
            "trainer.resize_min",
            self.resize_min,
            f"<= trainer.resolution ({self.resolution})",
        )
        _check(
            self.amp_dtype in ("bfloat16", "float16"),
            "trainer.amp_dtype",
            self.amp_dtype,
            "bfloat16 or float16",
        )
        _check(
            bool(self.trainable) and set(self.trainable) <= set(GROUPS),
            "trainer.trainable",
            self.trainable,
            f"a non-empty list of {list(GROUPS)}",
        )
        _check(
            self.optimizer in OPTIMIZERS, "trainer.optimizer", self.optimizer, f"one of {list(OPTIMIZERS)}"
        )
        if self.optimizer.endswith(IN_BACKWARD):
            self._check_in_backward()
        _check(
            self.weight_dtype in ("float32", "bfloat16"),
            "trainer.weight_dtype",
            self.weight_dtype,
            "float32 or bfloat16",
        )
        if self.weight_dtype == "bfloat16":
            self._check_bf16_weights()
        _check(self.lora_rank >= 0, "trainer.lora_rank", self.lora_rank, ">= 0 (0 = no LoRA)")
        _check(self.lora_alpha > 0, "trainer.lora_alpha", self.lora_alpha, "> 0")
        _check(
            self.lora_rank == 0 or "trunk" not in self.trainable,
            "trainer.lora_rank",
            self.lora_rank,
            "0 while 'trunk' is in trainer.trainable (LoRA adapts a frozen trunk; drop 'trunk' to use it)",
        )
        _check(
            not (self.compile_model and (self.compile_trunk or self.compile_layers)),
            "trainer.compile_model",
            self.compile_model,
            "false with trainer.compile_trunk or trainer.compile_layers true (it compiles the whole "
            "forward; set those two false)",
        )
        _check(
            not (self.amp and self.accelerator == "cpu"),
            "trainer.amp",
            self.amp,
            "false when trainer.num_gpus is 0 (sam3 autocasts on CUDA only)",
        )


@dataclass(frozen=True)
class Augment:
    """Augmentation of the training images (the train split only; sam3ft.train.augment), each
    image with its boxes (and masks), drawn from the data loader's RNG (reseeded per base.seed and
    epoch, and per image with workers: a resume draws what an unbroken run did)."""

    hflip: float
    """Probability of a horizontal flip."""
    brightness: float
    """Colour jitter: brightness factor drawn from [1 - x, 1 + x]; 0 = off."""
    contrast: float
    """Colour jitter: contrast factor drawn from [1 - x, 1 + x]; 0 = off."""
    saturation: float
    """Colour jitter: saturation factor drawn from [1 - x, 1 + x]; 0 = off."""
    crop_min: float
    """Random crop: each side at least this share of the image's, every object kept whole; 1 = off."""
    rotate: float
    """Rotation by an angle drawn from [-x, x] degrees (boxes: the rotated box's enclosing box); 0 = off."""

    def __post_init__(self) -> None:
        _check(0 <= self.hflip <= 1, "augment.hflip", self.hflip, "a probability in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"augment.{name}", value, "a jitter in [0, 1) (0 = off)")
        _check(0 < self.crop_min <= 1, "augment.crop_min", self.crop_min, "a share in (0, 1] (1 = off)")
        _check(0 <= self.rotate <= 45, "augment.rotate", self.rotate, "degrees in [0, 45] (0 = off)")


@dataclass(frozen=True)
class Evaluate:
    """What the evaluate stage measures."""

    splits: list[str] | None
    """Prepared splits to evaluate (each gets its own metrics block); null: every split prepare
    wrote except train (valid, test when exported or carved, negatives)."""
    max_dets: int
    """Detections kept per image and prompt, best first."""
    threshold: float | str
    """Operating score threshold (image-level metrics, overlays, and predict's and serve's default
    through the export), or `auto`: the score with the best detection F1 on valid."""
    overlays: int
    """Images per split drawn with ground truth and predictions (dvclive images)."""
    batch_size: int | None = None
    """Images per model batch when predicting a split; null: 8 on a GPU, 1 on the CPU (where a
    batch is no faster). Detections agree across batch sizes up to float rounding."""

    def __post_init__(self) -> None:
        if self.splits is not None:
            _check(len(self.splits) > 0, "evaluate.splits", self.splits, "null or at least one split")
            _check(len(set(self.splits)) == len(self.splits), "evaluate.splits", self.splits, "no duplicates")
        _check(self.max_dets >= 1, "evaluate.max_dets", self.max_dets, ">= 1")
        _check(
            self.threshold == "auto" if isinstance(self.threshold, str) else 0.0 <= self.threshold <= 1.0,
            "evaluate.threshold",
            self.threshold,
            "a score in [0, 1] or auto",
        )
        _check(self.overlays >= 0, "evaluate.overlays", self.overlays, ">= 0")
        if self.batch_size is not None:
            _check(self.batch_size >= 1, "evaluate.batch_size", self.batch_size, "null or >= 1")

    def images_per_batch(self, device: str) -> int:
        """`batch_size` resolved for the device the model runs on."""
        return self.batch_size if self.batch_size is not None else predict_batch_size(device)


def predict_batch_size(device: str) -> int:
    """Images per predict batch where none is given: GPU_PREDICT_BATCH on a GPU, 1 on the CPU
    (where a batch is no faster)."""
    return GPU_PREDICT_BATCH if device.startswith("cuda") else 1


@dataclass(frozen=True)
class Export:
    """How the model is shipped."""

    dtype: str
    """bfloat16 (half the size) | float32 weights in the safetensors file."""
    mode: str
    """full | delta (only tensors that differ from the fetched base weights; loads on top of them)."""
    torch_file: bool
    """Also write model.pt, loadable by upstream's build_sam3_image_model(checkpoint_path=...)."""
    tolerance: float
    """Max |box or score difference| between export and trained model on valid; above it, fail."""
    parity_images: int | None = None
    """Validation images the reload and parity checks run on; null: all, except for a preset sized
    for GPUs (sam3) on a CPU, where 2 (three full-size float32 forwards per image)."""

    def __post_init__(self) -> None:
        _check(
            self.parity_images is None or self.parity_images >= 1,
            "export.parity_images",
            self.parity_images,
            "null (all; 2 for sam3 on a CPU) or >= 1",
        )
        _check(self.dtype in ("float32", "bfloat16"), "export.dtype", self.dtype, "float32 or bfloat16")
        _check(self.mode in ("full", "delta"), "export.mode", self.mode, "full or delta")
        _check(self.tolerance >= 0, "export.tolerance", self.tolerance, ">= 0")


@dataclass(frozen=True)
class Launcher:
    """Where training processes run: this machine, or a SLURM cluster through submitit."""

    kind: str
    """local (one process per GPU here, as sam3's trainer spawns them) | slurm (submitit)."""
    partition: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account."""
    qos: str | None = None
    """SLURM quality of service."""
    timeout_min: int = 24 * 60
    """SLURM time limit, minutes."""
    cpus_per_task: int = 8
    """CPUs per training process (data loading)."""
    mem_gb: int | None = None
    """Memory per node, GB (None: the partition's default)."""

    def __post_init__(self) -> None:
        _check(self.kind in ("local", "slurm"), "launcher.kind", self.kind, "local or slurm")
        _check(self.timeout_min >= 1, "launcher.timeout_min", self.timeout_min, ">= 1")
        _check(self.cpus_per_task >= 1, "launcher.cpus_per_task", self.cpus_per_task, ">= 1")


@dataclass(frozen=True)
class Params:
    """The params.yaml sections a stage loaded (`load`), each as its typed dataclass. Reading a
    section the stage did not load is a bug in the stage's SECTIONS: it raises KeyError."""

    sections: dict[str, object]

    def _get(self, name: str, cls: type[T]) -> T:
        value = self.sections.get(name)
        if not isinstance(value, cls):
            raise KeyError(f"params section {name!r} was not loaded; add it to the stage's SECTIONS")
        return value

    @property
    def paths(self) -> Paths:
        return self._get("paths", Paths)

    @property
    def base(self) -> Base:
        return self._get("base", Base)

    @property
    def model(self) -> Model:
        return self._get("model", Model)

    @property
    def fetch(self) -> Fetch:
        return self._get("fetch", Fetch)

    @property
    def prepare(self) -> Prepare:
        return self._get("prepare", Prepare)

    @property
    def trainer(self) -> Trainer:
        return self._get("trainer", Trainer)

    @property
    def augment(self) -> Augment:
        return self._get("augment", Augment)

    @property
    def launcher(self) -> Launcher:
        return self._get("launcher", Launcher)

    @property
    def evaluate(self) -> Evaluate:
        return self._get("evaluate", Evaluate)

    @property
    def export(self) -> Export:
        return self._get("export", Export)

    def replace(self, **sections: object) -> Params:
        """A copy with the given sections replaced (tests and benchmarks vary one section)."""
        return Params({**self.sections, **sections})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every loaded section as plain data, e.g. for a run record."""
        return {name: dataclasses.asdict(v) for name, v in self.sections.items()}  # type: ignore[call-overload]


def recipes_dir() -> Path:
    """`configs/recipes/` of the repository (the package lives in `src/sam3ft`)."""
    return CONFIGS_DIR / "recipes"


def recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def load_recipe(name: str) -> dict[str, Any]:
    """configs/recipes/<name>.yaml: values for some of RECIPE_KEYS (where the recipe differs from
    the defaults), nothing else; an empty file is upstream's recipe."""
    path = recipes_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"trainer.recipe={name!r} has no file {path}", fix=f"use one of {recipes()}", key="trainer.recipe"
        )
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not set(data) <= set(RECIPE_KEYS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{path}: keys {found} are wrong", fix=f"set only some of {sorted(RECIPE_KEYS)}")
    return data


SECTIONS: dict[str, type] = {
    "paths": Paths,
    "base": Base,
    "model": Model,
    "fetch": Fetch,
    "prepare": Prepare,
    "trainer": Trainer,
    "augment": Augment,
    "launcher": Launcher,
    "evaluate": Evaluate,
    "export": Export,
}


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid", fix=f"use {allowed}", key=key)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key_t, val_t = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _matches(k, key_t) and _matches(v, val_t) for k, v in value.items()
        )
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    return isinstance(value, hint)


def section_from_dict(cls: type[T], data: Any, name: str, preset: str | None = None) -> T:
    """Build one section, naming the exact key on any unknown key, missing key or wrong type.
    `preset`: model.preset, which the trainer's PRESET_KEYS follow where they are null."""
    if not isinstance(data, dict):
        raise ConfigError(f"section '{name}' is not a mapping", fix="see README", key=name)
    if cls is Trainer:
        if preset is None:
            raise TypeError("the trainer section needs model.preset (preset=...)")
        data = Trainer.with_preset(Trainer.with_recipe(data), preset)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[f'{name}.{k}' for k in unknown]}",
            fix=f"'{name}' accepts only {sorted(fields)}",
            key=f"{name}.{unknown[0]}",
        )
    for key, f in fields.items():
        if key not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing key '{name}.{key}'", fix="add it", key=f"{name}.{key}")
            continue
        if not _matches(data[key], hints[key]):
            kind = getattr(hints[key], "__name__", hints[key])
            raise ConfigError(
                f"{name}.{key}={data[key]!r} has the wrong type",
                fix=f"use a value of type {kind}"
                + (f" or {AUTO}" if (cls, key) == (Trainer, "num_gpus") else ""),
                key=f"{name}.{key}",
            )
    values = {k: float(v) if hints[k] is float else v for k, v in data.items()}
    return cls(**values)


def in_file(exc: Sam3ftError, path: Path) -> str:
    """`exc`'s message as printed: after the params file's name when it is about a value there
    (ConfigError with a `key`), so a run on another file (`--params`) names that file."""
    if isinstance(exc, ConfigError) and exc.key is not None:
        return f"{path}: {exc.message}"
    return exc.message


def read_params(path: Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """The raw YAML mapping of params.yaml."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} not found", fix="run from the repository root") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}", fix="fix the syntax") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a mapping", fix="see README")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}", fix=f"use {sorted(SECTIONS)}")
    return data


def visible_gpus() -> int:
    """CUDA devices this process sees: what trainer.num_gpus `auto` becomes (0 without torch, so
    `sam3ft doctor` can still load params and report the missing package)."""
    if importlib.util.find_spec("torch") is None:
        return 0
    import torch

    return torch.cuda.device_count()


def load(names: list[str], path: Path = DEFAULT_PARAMS) -> Params:
    """Typed sections `names` of params.yaml (the trainer's defaults follow model.preset)."""
    data = read_params(path)
    out: dict[str, object] = {}
    for name in names:
        if name not in data:
            raise ConfigError(f"{path}: missing section '{name}'", fix="add it (see README)")
        preset = trainer_preset(data) if name == "trainer" else None
        out[name] = section_from_dict(SECTIONS[name], data[name], name, preset=preset)
    return Params(out)


def trainer_preset(data: dict[str, Any]) -> str:
    """model.preset of a raw params mapping, which the trainer's defaults follow; `num_gpus: auto`
    counts this machine's GPUs, so a SLURM job (GPUs on other machines) must say how many."""
    trainer, launcher = data.get("trainer"), data.get("launcher")
    auto = isinstance(trainer, dict) and trainer.get("num_gpus") == AUTO
    if auto and isinstance(launcher, dict) and launcher.get("kind") == "slurm":
        raise ConfigError(
            "trainer.num_gpus=auto counts the GPUs of this machine, not of the SLURM nodes",
            fix="set trainer.num_gpus to the GPUs per node",
            key="trainer.num_gpus",
        )
    return section_from_dict(Model, data.get("model"), "model").preset
