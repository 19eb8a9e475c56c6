"""`sam3ft doctor`'s dataset checks: the export prepare will read, its splits and counts, what
prepare would carve, and the DVC pin of the data folder.

Beside the data package it checks with (sam3ft.doctor holds the machine and params checks); the
report line type is sam3ft.preflight's `Check`.
"""

from __future__ import annotations

from pathlib import Path

from sam3ft import params as params_module
from sam3ft.data.coco import check_objects_per_image, resolve_categories
from sam3ft.data.dvc_pin import check_pinned_remote, dvc_file_for, unpin_command, unpinned_entries
from sam3ft.data.roboflow import Plan, check_eval_splits, plan_dataset
from sam3ft.errors import ConfigError, DatasetError
from sam3ft.preflight import Check

SECTIONS = ["paths", "prepare", "evaluate", "trainer"]


def describe(plan: Plan) -> str:
    """`train 24 (20 annotated), valid 5, ...` plus what prepare carves, one line."""
    parts = []
    for split in plan.splits:
        annotated = len({a["image_id"] for a in split.annotations})
        origin = " carved from train" if split.name in plan.carved else ""
        parts.append(f"{split.name} {len(split.images)} image(s), {annotated} annotated{origin}")
    return "; ".join(parts)


def plan_checks(plan: Plan, root: Path, p: params_module.Params) -> list[Check]:
    """What the plan says: splits and counts (OK), carving (OK, named), warnings (WARN)."""
    checks = [Check("OK", "dataset", f"{root}: {describe(plan)}")]
    for name, entry in plan.carved.items():
        if "skipped" not in entry:
            detail = (
                f"no '{name}' split exported: prepare carves {entry['photos']} source photo(s), "
                f"{len(entry['images'])} image(s), from train (prepare.split.{name}={entry['share']}, "
                f"prepare.seed={entry['seed']}): {entry['images'][:5]}"
            )
            checks.append(Check("OK", f"dataset {name}", detail))
    fix = "see the message; prepare continues with this warning"
    warnings = plan.warnings + [w for split in plan.splits for w in split.warnings]
    checks += [Check("WARN", "dataset", warning, fix) for warning in warnings]
    train = next(s for s in plan.splits if s.name == "train")
    coco = {"images": train.images, "annotations": train.annotations, "categories": train.categories}
    limit = p.trainer.max_ann_per_img
    for warning in check_objects_per_image(coco, limit, train.directory):
        fix = "set trainer.max_ann_per_img to at least the count named, or tile the image"
        checks.append(Check("WARN", "dataset objects", warning, fix))
    return checks


def dataset_checks(params_path: Path, repo_root: Path) -> list[Check]:
    """The dataset checks for the run `params_path` configures ([] when params are invalid: the
    params check reports that)."""
    try:
        p = params_module.load(SECTIONS, params_path)
    except ConfigError:
        return []
    data_dir = repo_root / p.paths.data
    if repo_root.resolve() == Path.cwd().resolve():  # the CLI: name paths as prepare's messages do
        data_dir = Path(p.paths.data)
    checks = pin_checks(data_dir)
    prepare = p.prepare
    root = data_dir / prepare.dataset
    try:
        plan = plan_dataset(root, prepare.split, prepare.seed, prepare.allow_leakage)
        resolve_categories(plan.splits, prepare.prompts)
        check_eval_splits(p.evaluate.splits, plan.names, root)
    except (DatasetError, ConfigError) as exc:
        message = params_module.in_file(exc, params_path)
        return [*checks, Check("FAIL", "dataset", message, exc.fix or "see README")]
    return checks + plan_checks(plan, root, p)


def pin_checks(data_dir: Path) -> list[Check]:
    """The data folder's .dvc pin: FAIL if a push would write into the in-repo store; WARN if the
    dataset is kept out of every remote by the sample's `push: false`, or will be once committed."""
    try:
        warnings = check_pinned_remote(data_dir)
    except DatasetError as exc:
        return [Check("FAIL", "dataset pin", exc.message, exc.fix or "")]
    if warnings:
        return [Check("WARN", "dataset pin", *w.split("; fix: ", 1)) for w in warnings]
    extra = unpinned_entries(data_dir)
    if extra is None:
        return []
    remote, entries = extra
    dvc_file = dvc_file_for(data_dir)
    detail = (
        f"{dvc_file} pins 'remote: {remote}', a store inside this repository, and {entries} in "
        f"{data_dir} are not in its data: `dvc add {data_dir.name}` or `dvc repro` would commit them with "
        "the pin kept, and `dvc push` would then skip them (push: false) or, without that line, be refused"
    )
    fix = f"for your own dataset: {unpin_command(remote, dvc_file)} (push then uses the default remote)"
    return [Check("WARN", "dataset pin", detail, fix)]
