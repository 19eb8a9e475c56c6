"""A Roboflow export as a whole: its split folders, the splits carved for it, leakage between them.

`plan_dataset` is everything prepare decides before writing a byte; `sam3ft doctor` shows the same plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sam3ft.data.coco import Split, load_image_folder, load_split
from sam3ft.data.splits import carve, carve_messages, leakage, photo_groups
from sam3ft.errors import ConfigError, DatasetError
from sam3ft.layout import ANNOTATIONS_FILE

log = logging.getLogger(__name__)
EVAL_SPLITS = ("valid", "test")  # exported, or carved from train when missing (prepare.split)
NEGATIVES = "negatives"  # optional folder of images without the object (no JSON needed)
SPLIT_ORDER = ("train", *EVAL_SPLITS, NEGATIVES)


@dataclass
class Plan:
    """The splits prepare will write, and what it changed or noticed on the way."""

    splits: list[Split]
    carved: dict[str, Any] = field(default_factory=dict)
    """Per carved split: source, share, seed, photos and image names (stats.json `carved`)."""
    carve_notes: list[str] = field(default_factory=list)
    """One line per carved split: what was carved and why."""
    warnings: list[str] = field(default_factory=list)
    """Export-wide warnings: unknown folders, a split too few photos left uncarved, duplicates."""

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.splits]


def load_dataset(root: Path) -> list[Split]:
    """Every split folder of the export, validated: train must exist; valid, test, negatives may."""
    if not root.is_dir():
        raise DatasetError(
            f"{root}: dataset folder not found", fix="set prepare.dataset to a folder under paths.data"
        )
    splits = [load_split(root / "train", "train")]
    splits += [load_split(root / name, name) for name in EVAL_SPLITS if (root / name).is_dir()]
    if (root / NEGATIVES).is_dir():
        splits.append(load_image_folder(root / NEGATIVES, NEGATIVES, splits[0].categories))
    return splits


def unknown_folders(root: Path) -> list[str]:
    """A warning per folder prepare does not read (e.g. a Roboflow 'validation' or a typo)."""
    return [
        f"{path}: folder ignored: prepare reads only {list(SPLIT_ORDER)}; rename it to one of them "
        "(or move it out of the dataset) if it holds images to use"
        for path in sorted(root.iterdir())
        if path.is_dir() and path.name not in SPLIT_ORDER and not path.name.startswith(".")
    ]


def check_train_annotated(train: Split, carved: bool) -> None:
    """A train split without any object trains the model to find nothing (loss falls, AP stays 0)."""
    if not train.annotations:
        after = " after carving valid/test from it" if carved else ""
        raise DatasetError(
            f"{train.directory / ANNOTATIONS_FILE}: 'train' has {len(train.images)} image(s) and no "
            f"annotation{after}: nothing to learn",
            fix="annotate objects in the train images (Roboflow: export after labelling), or check "
            "that the right dataset is named in prepare.dataset",
        )


def plan_dataset(root: Path, shares: dict[str, float], seed: int, allow_leakage: bool) -> Plan:
    """Load and check the export at `root`, carve each missing valid/test split from train."""
    splits = load_dataset(root)
    plan = Plan(splits, warnings=unknown_folders(root))
    present = {s.name for s in splits}
    missing = [name for name in EVAL_SPLITS if name not in present]
    if missing:
        train = splits[0]
        rest, new, plan.carved = carve(train, missing, shares, seed)
        messages = carve_messages(plan.carved, train.directory, len(photo_groups(train.images)))
        for name, line in messages.items():
            (plan.warnings if "skipped" in plan.carved[name] else plan.carve_notes).append(line)
        plan.splits = sorted([rest, *splits[1:], *new], key=lambda s: SPLIT_ORDER.index(s.name))
    check_train_annotated(plan.splits[0], bool(plan.carved))
    within, across = leakage(plan.splits)
    plan.warnings += within
    if across and not allow_leakage:
        raise DatasetError(
            f"{root}: {len(across)} image(s) in more than one split, so evaluation would score images "
            f"the model trained on: {across[0]}"
            + (f" (and {len(across) - 1} more)" if len(across) > 1 else ""),
            fix="remove each duplicate from all splits but one, or set prepare.allow_leakage: true to "
            "accept it",
        )
    plan.warnings += [f"{root}: leakage accepted (prepare.allow_leakage): {line}" for line in across]
    return plan


def check_eval_splits(requested: list[str] | None, produced: list[str], root: Path) -> None:
    """An evaluate.splits entry prepare will not produce fails now, not after training."""
    missing = [s for s in requested or [] if s not in produced]
    if missing:
        raise ConfigError(
            f"evaluate.splits names {missing}, but prepare produces only {produced} from {root}",
            fix="set evaluate.splits: null (every prepared split but train), or list some of "
            f"{[s for s in produced if s != 'train']}; a missing valid/test is carved when prepare.split "
            "gives it a share",
            key="evaluate.splits",
        )
