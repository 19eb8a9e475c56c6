"""Compose sam3's Trainer config from configs/train/*.yaml with hydra, our params as overrides.

Guarantees, checked before any compute: every knob the config declares is set, params set no knob
the config lacks, and every knob is read by the trainer subtree (no silently ignored values).
"""

from __future__ import annotations

import re
from collections import deque
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

from sam3ft.errors import ConfigError
from sam3ft.layout import CONFIGS_DIR

CONFIG_NAME = "sam3ft"
KNOBS = "knobs"
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def config_dir() -> Path:
    """`configs/train/` of the repository."""
    return CONFIGS_DIR / "train"


def _override_value(value: Any) -> str:
    """A value in hydra's override grammar (strings quoted, so paths with spaces survive)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    raise ConfigError(
        f"knob value {value!r} has unsupported type {type(value).__name__}",
        fix="use a number, bool, string or null",
    )


def _interpolations(node: Any) -> list[str]:
    """Every `${a.b}` reference inside a raw (unresolved) config container."""
    if isinstance(node, dict):
        return [ref for v in node.values() for ref in _interpolations(v)]
    if isinstance(node, list):
        return [ref for v in node for ref in _interpolations(v)]
    return _INTERPOLATION.findall(node) if isinstance(node, str) else []


def knobs_read_by_trainer(cfg: DictConfig) -> set[str]:
    """Knob names the `trainer` subtree reaches, following interpolations through other nodes."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(raw, dict)
    seen_nodes: set[str] = set()
    found: set[str] = set()
    queue: deque[str] = deque(["trainer"])
    while queue:
        path = queue.popleft()
        if path in seen_nodes:
            continue
        seen_nodes.add(path)
        node: Any = raw
        for part in path.split("."):
            node = node[part]
        for ref in _interpolations(node):
            if ref.startswith(KNOBS + "."):
                found.add(ref.split(".", 1)[1])
            else:
                queue.append(ref)
    return found


def compose_trainer_config(
    knobs: dict[str, Any], directory: Path | None = None, name: str = CONFIG_NAME
) -> DictConfig:
    """The full trainer config with `knobs` applied; raises ConfigError on any dead or unset knob."""
    directory = directory or config_dir()
    with initialize_config_dir(config_dir=str(directory.resolve()), version_base="1.3"):
        declared_cfg = compose(config_name=name)
        declared = set(declared_cfg[KNOBS])
        unknown = sorted(set(knobs) - declared)
        if unknown:
            raise ConfigError(
                f"{directory / name}.yaml: no knob(s) {unknown}",
                fix=f"declare them under '{KNOBS}:' and use them, or drop them",
            )
        overrides = [f"{KNOBS}.{k}={_override_value(v)}" for k, v in sorted(knobs.items())]
        cfg = compose(config_name=name, overrides=overrides)
    unset = sorted(k for k in declared if OmegaConf.is_missing(cfg[KNOBS], k))
    if unset:
        raise ConfigError(
            f"{directory / name}.yaml: knob(s) {unset} left unset",
            fix="set them from params.yaml (sam3ft.stages.train.trainer_knobs)",
        )
    dead = sorted(declared - knobs_read_by_trainer(cfg))
    if dead:
        raise ConfigError(
            f"{directory / name}.yaml: knob(s) {dead} are never read by the trainer",
            fix="reference them as ${knobs.<name>} under 'trainer:' or remove them",
        )
    return cfg


def resolved_yaml(cfg: DictConfig | ListConfig) -> str:
    """The config with every interpolation resolved, as the trainer will see it."""
    from sam3.train.utils.train_utils import register_omegaconf_resolvers

    if not OmegaConf.has_resolver("times"):
        register_omegaconf_resolvers()
    return OmegaConf.to_yaml(cfg, resolve=True)
