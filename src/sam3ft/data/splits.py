"""Splits of an export: carve the missing valid/test from train (seeded), and catch leakage.

Roboflow writes each augmented copy of a source photo as `<stem>_<ext>.rf.<hash>.<ext>`; copies of one
photo (and byte-identical files) form one group that lands in one split, so no photo is on both sides.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from sam3ft.data.coco import SHA256, Split
from sam3ft.errors import DatasetError
from sam3ft.layout import ANNOTATIONS_FILE

ROBOFLOW_COPY = re.compile(r"(.+)\.rf\.[0-9a-fA-F]+\.\w+")  # `Image-35_jpg.rf.66ee...b4f5.jpg`


def photo_key(file_name: str) -> str:
    """The source photo an image comes from: Roboflow's stem for its augmented copies, else the name."""
    match = ROBOFLOW_COPY.fullmatch(Path(file_name).name)
    return match.group(1) if match else file_name


def photo_groups(images: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of `images` grouped by source photo or identical content, in first-seen order."""
    parent = list(range(len(images)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for index, image in enumerate(images):
        keys = [("photo", photo_key(image["file_name"]))]
        if image.get(SHA256):
            keys.append(("content", image[SHA256]))
        for key in keys:
            if key in first:
                parent[root(index)] = root(first[key])
            else:
                first[key] = index
    groups: dict[int, list[int]] = defaultdict(list)
    for index in range(len(images)):
        groups[root(index)].append(index)
    return sorted(groups.values(), key=lambda g: g[0])


def subset(split: Split, name: str, indices: set[int]) -> Split:
    """A split holding the images at `indices` of `split` (in their order) and their annotations."""
    images = [img for i, img in enumerate(split.images) if i in indices]
    ids = {img["id"] for img in images}
    annotations = [a for a in split.annotations if a["image_id"] in ids]
    return Split(name, split.directory, images, annotations, split.categories)


def carve(
    train: Split, missing: list[str], shares: dict[str, float], seed: int
) -> tuple[Split, list[Split], dict[str, Any]]:
    """(train left, carved splits, record for stats.json): each split in `missing` gets
    round(share x photos), at least one photo, drawn by a seeded shuffle while train keeps one photo.

    `valid` is required (training validates on it); a missing `test` too few photos allow is skipped.
    """
    groups = photo_groups(train.images)
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    taken: dict[str, set[int]] = {}
    record: dict[str, Any] = {}
    for name in missing:
        share = shares.get(name, 0.0)
        want = max(1, int(share * len(groups) + 0.5)) if share > 0 else 0
        count = min(want, len(order) - 1)
        if count < 1:
            if name == "valid":
                raise DatasetError(
                    f"{train.directory}: no 'valid' split exported, and "
                    + (
                        "prepare.split.valid is 0"
                        if want == 0
                        else f"train holds {len(groups)} source photo(s): too few to carve one off"
                    ),
                    fix="export a 'valid' split, or add photos to train and set prepare.split.valid "
                    "(e.g. 0.2)",
                )
            if want:  # a share of 0 (or none) for test is the user's choice: nothing to report
                record[name] = {"skipped": f"train keeps too few photos ({len(order)})"}
            continue
        picked, order = order[:count], order[count:]
        taken[name] = {i for g in picked for i in groups[g]}
        record[name] = {
            "from": "train",
            "share": share,
            "seed": seed,
            "photos": count,
            "images": sorted(train.images[i]["file_name"] for i in taken[name]),
        }
    carved_indices = set().union(*taken.values()) if taken else set()
    rest = subset(train, "train", set(range(len(train.images))) - carved_indices)
    rest.warnings = train.warnings
    return rest, [subset(train, name, indices) for name, indices in taken.items()], record


def carve_messages(record: dict[str, Any], train_dir: Path, photos: int) -> dict[str, str]:
    """Per carved (or skipped) split, one line naming the images and the params that made it."""
    lines = {}
    for name, entry in record.items():
        if "skipped" in entry:
            lines[name] = f"{train_dir}: no '{name}' split exported and none carved ({entry['skipped']})"
            continue
        names = entry["images"]
        lines[name] = (
            f"{train_dir}: no '{name}' split exported: carved {entry['photos']} of {photos} source "
            f"photo(s), {len(names)} image(s), from train (prepare.split.{name}={entry['share']}, "
            f"prepare.seed={entry['seed']}): {names[:5]}{' ...' if len(names) > 5 else ''}"
        )
    return lines


def leakage(splits: list[Split]) -> tuple[list[str], list[str]]:
    """(within-split duplicates, cross-split duplicates) by file content, one line each."""
    where: dict[str, list[tuple[Split, dict[str, Any]]]] = defaultdict(list)
    for split in splits:
        for image in split.images:
            if image.get(SHA256):
                where[image[SHA256]].append((split, image))
    within, across = [], []
    for places in where.values():
        if len(places) < 2:
            continue
        names = sorted({s.name for s, _ in places})
        listed = ", ".join(f"{s.name}: image id={img['id']} ({img['file_name']})" for s, img in places)
        json_path = places[0][0].directory / ANNOTATIONS_FILE
        if len(names) == 1:
            within.append(
                f"{json_path}: the same image twice in '{names[0]}': {listed}; it weighs double; "
                "fix: drop all but one record and file, unless intended"
            )
        else:
            across.append(f"the same image in splits {names}: {listed}")
    return within, across
