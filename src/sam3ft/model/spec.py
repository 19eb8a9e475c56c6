"""The architecture of a SAM3 image model as data, loaded from `configs/model/<preset>.yaml`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sam3ft.errors import ConfigError
from sam3ft.layout import CONFIGS_DIR

PATCH_SIZE = 14  # SAM3's ViT patch size; every resolution must be a multiple of it
# A preset file's `train:` block: trainer values that follow the preset where params.yaml leaves
# them null (sam3ft.params.PRESET_KEYS; resolution is the preset's image_size). Not architecture.
TRAIN_BLOCK = "train"
TRAIN_KEYS = ("resize_min", "amp", "lr_scale", "o2m_weight")


@dataclass(frozen=True)
class ModelSpec:
    """Every architecture choice of a SAM3 image model; `sam3.yaml` reproduces upstream's builder exactly."""

    name: str
    """Preset name (`tiny`, `sam3`, ...), recorded in manifests and model cards."""
    image_size: int
    """Input side in pixels; the ViT's RoPE tables are built for exactly this size."""
    vit_dim: int
    """ViT trunk embedding width."""
    vit_depth: int
    """Number of ViT blocks."""
    vit_heads: int
    """Attention heads per ViT block."""
    vit_mlp_ratio: float
    """ViT MLP hidden width / embedding width."""
    vit_window_size: int
    """Window side (tokens) of windowed-attention blocks; also RoPE's pretraining size."""
    vit_global_blocks: tuple[int, ...]
    """Indices of ViT blocks with global attention."""
    vit_pretrain_size: int
    """Image size the absolute position embedding was trained at (tiled to `image_size`)."""
    vit_drop_path: float
    """Stochastic depth rate of the trunk."""
    text_width: int
    """Text transformer width."""
    text_heads: int
    """Text transformer attention heads."""
    text_layers: int
    """Text transformer depth."""
    d_model: int
    """Width of the neck, encoder, decoder and heads."""
    heads: int
    """Attention heads in encoder, decoder and geometry encoder."""
    ffn_dim: int
    """Feed-forward width in encoder, decoder and geometry encoder."""
    encoder_layers: int
    """Fusion encoder depth."""
    decoder_layers: int
    """DETR decoder depth."""
    geometry_layers: int
    """Geometry (box/point prompt) encoder depth."""
    num_queries: int
    """Object queries of the decoder: the most detections one prompt can give."""
    segmentation: bool = False
    """Build the mask head (needed for segmentation training and mask outputs)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes kept with the preset; never read by the builder."""

    def __post_init__(self) -> None:
        if self.image_size % PATCH_SIZE:
            raise ConfigError(
                f"model.image_size={self.image_size} is not a multiple of {PATCH_SIZE}",
                fix=f"use e.g. {self.image_size // PATCH_SIZE * PATCH_SIZE}",
            )
        for index in self.vit_global_blocks:
            if not 0 <= index < self.vit_depth:
                raise ConfigError(
                    f"model.vit_global_blocks has {index}, outside 0..{self.vit_depth - 1}",
                    fix="list block indices smaller than vit_depth",
                )
        for name in ("vit_dim", "text_width", "d_model"):
            if getattr(self, name) % 2:
                raise ConfigError(f"model.{name} must be even", fix="use an even width")

    def with_mask_head(self, on: bool = True) -> ModelSpec:
        """This architecture plus the mask head when `on` (mask training adds it to tiny)."""
        return dataclasses.replace(self, segmentation=True) if on else self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["vit_global_blocks"] = list(self.vit_global_blocks)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> ModelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model key(s) {unknown}", fix=f"use only {sorted(known)}")
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ConfigError(f"{source}: missing model key(s) {missing}", fix="add them")
        values = dict(data)
        values["vit_global_blocks"] = tuple(values.get("vit_global_blocks", ()))
        return cls(**values)


def load_spec_file(path: str | Path) -> ModelSpec:
    """Read a ModelSpec from a YAML (or JSON) file; a preset's `train:` block is not part of it."""
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    architecture = {k: v for k, v in data.items() if k != TRAIN_BLOCK} if isinstance(data, dict) else data
    return ModelSpec.from_dict(architecture, source=str(path))


def presets_dir() -> Path:
    """`configs/model/` of the repository (the package lives in `src/sam3ft`)."""
    return CONFIGS_DIR / "model"


def preset_file(name: str, directory: Path | None = None) -> Path:
    """`configs/model/<name>.yaml`, which must exist."""
    directory = directory or presets_dir()
    path = directory / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in directory.glob("*.yaml"))
        raise ConfigError(f"model preset {name!r} not found ({path})", fix=f"use one of {choices}")
    return path


def load_preset(name: str, directory: Path | None = None) -> ModelSpec:
    """Read `configs/model/<name>.yaml` into a ModelSpec."""
    return load_spec_file(preset_file(name, directory))


def preset_train_defaults(name: str, directory: Path | None = None) -> dict[str, Any]:
    """The preset's `train:` block: some of TRAIN_KEYS (values are checked as trainer values)."""
    path = preset_file(name, directory)
    block = (yaml.safe_load(path.read_text()) or {}).get(TRAIN_BLOCK) or {}
    if not isinstance(block, dict) or not set(block) <= set(TRAIN_KEYS):
        found = sorted(block) if isinstance(block, dict) else type(block).__name__
        raise ConfigError(
            f"{path}: {TRAIN_BLOCK}: keys {found} are wrong", fix=f"use only {list(TRAIN_KEYS)}"
        )
    return block
