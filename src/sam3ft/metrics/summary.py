"""The decision metrics: the few numbers of evaluate's report that runs are compared by.

evaluate writes them to `summary.json`, the one DVC metrics file of the pipeline, so `dvc exp show`
and `dvc metrics diff` show a dozen columns: per split box AP and AP50 (mask AP with a mask head),
image-level precision and recall at `evaluate.threshold` (specificity for a split without objects),
the base model's AP and AP50, and the epoch train selected. The full report (AP75, AP/AR by size,
AR@k, TP/FP/FN/TN, F1) stays in evaluate's `metrics.json`, a plain output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from sam3ft.errors import Sam3ftError
from sam3ft.layout import BASE_BLOCK, METRICS_FILE, SUMMARY_FILE

BOX_KEYS = ("AP", "AP50")
FIRST = ("valid", "test")  # column order: the split checkpoints are selected on, then the held-out one


def split_order(split: str) -> tuple[int, str]:
    return (FIRST.index(split) if split in FIRST else len(FIRST), split)


def split_summary(metrics: dict[str, Any]) -> dict[str, float]:
    """One split's decision metrics from its full evaluate metrics."""
    out = {k: metrics[k] for k in BOX_KEYS if k in metrics}
    if "segm" in metrics:
        out["mask_AP"] = metrics["segm"]["AP"]
    image_level = metrics["image_level"]
    if image_level["tp"] + image_level["fn"]:  # the split has images with objects
        out.update(precision=image_level["precision"], recall=image_level["recall"])
    if image_level["specificity"] is not None:  # ... and images without
        out["specificity"] = image_level["specificity"]
    return out


def decision_metrics(metrics: dict[str, Any], selection: dict[str, Any] | None) -> dict[str, Any]:
    """summary.json from evaluate's metrics (with its `base` block) and train's selection.json
    (None: no train run record, e.g. a checkpoint made by hand: no `epoch`)."""
    splits = sorted((s for s in metrics if s != BASE_BLOCK), key=split_order)
    out: dict[str, Any] = {split: split_summary(metrics[split]) for split in splits}
    if BASE_BLOCK in metrics:
        base = metrics[BASE_BLOCK]
        out[BASE_BLOCK] = {
            split: {k: base[split][k] for k in BOX_KEYS if k in base[split]}
            for split in sorted(base, key=split_order)
        }
    if selection is not None:
        out["epoch"] = selection["epoch"]
    return out


def summary_lines(summary: dict[str, Any], threshold: float | None) -> list[str]:
    """A few lines a person reads after a run: one per split, base beside it, the selected epoch."""
    base = summary.get(BASE_BLOCK, {})
    lines = []
    for split, values in summary.items():
        if split in (BASE_BLOCK, "epoch"):
            continue
        line = f"{split:<9}" + "  ".join(f"{k}={v:.3f}" for k, v in values.items())
        if split in base:
            line += "   (base model: " + "  ".join(f"{k}={v:.3f}" for k, v in base[split].items()) + ")"
        lines.append(line)
    at = f"score >= {threshold}" if threshold is not None else "evaluate.threshold"
    lines.append(f"precision/recall: images with a detection at {at}")
    if "epoch" in summary:
        lines.append(f"checkpoint: epoch {summary['epoch']} (0-based; why: train's run/selection.json)")
    return lines


def print_summary(params_file: Path) -> int:
    """`sam3ft summary`: the decision metrics of the checkout's last evaluate run, a few lines."""
    eval_dir = Path(yaml.safe_load(params_file.read_text())["paths"]["eval"])
    path = eval_dir / SUMMARY_FILE
    if not path.is_file():
        raise Sam3ftError(f"{path} does not exist", fix="run `dvc repro` (the evaluate stage writes it)")
    report = eval_dir / METRICS_FILE
    metrics = json.loads(report.read_text()) if report.is_file() else {}
    thresholds = {m["image_level"]["threshold"] for split, m in metrics.items() if split != BASE_BLOCK}
    threshold = thresholds.pop() if len(thresholds) == 1 else None
    print("\n".join(summary_lines(json.loads(path.read_text()), threshold)))
    return 0


# `sam3ft compare`: (header, summary.json column) in print order; widths fit a 160-column terminal
COMPARE = (
    ("valid AP", "valid.AP"),
    ("AP50", "valid.AP50"),
    ("prec", "valid.precision"),
    ("recall", "valid.recall"),
    ("test AP", "test.AP"),
    ("AP50", "test.AP50"),
    ("prec", "test.precision"),
    ("recall", "test.recall"),
    ("epoch", "epoch"),
)


def _cell(value: Any) -> str:
    """A param's value as `-S` takes it (dvc's records hold ints as floats)."""
    if value is None or value == "":
        return "-"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _metric(key: str, value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return str(int(value)) if key == "epoch" else f"{value:.3f}"


def compare_lines(records: list[dict[str, Any]], params: set[str]) -> list[str]:
    """One line per run of `dvc exp show` records: the decision metrics, then the params (of
    `params`) whose value differs between the runs, as key=value."""
    rows = [{k.split(":", 1)[-1]: v for k, v in r.items()} for r in records]  # drop `file:` prefixes
    changed = sorted(p for p in params if len({_cell(r.get(p)) for r in rows}) > 1)
    names = [r.get("Experiment") or str(r.get("rev")) for r in rows]
    width = max([10, *map(len, names)])
    header = f"{'run':<{width}}  " + " ".join(f"{h:>8}" for h, _ in COMPARE) + "  changed params"
    lines = [header]
    for name, row in zip(names, rows, strict=True):
        cells = " ".join(f"{_metric(key, row.get(key)):>8}" for _, key in COMPARE)
        diff = " ".join(f"{p}={_cell(row.get(p))}" for p in changed)
        lines.append(f"{name:<{width}}  {cells}  {diff}")
    return lines


def dotted_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    """{"trainer": {"lr_scale": 1}} -> ["trainer.lr_scale"]: the names `dvc exp show` gives params."""
    return [
        name
        for key, value in data.items()
        for name in (dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])
    ]


def print_compare() -> int:
    """`sam3ft compare`: the workspace, HEAD and its experiments (`dvc exp show`), a line each."""
    import dvc.api
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:  # first: outside a repository exp_show tries to clone "." and fails with "SCM error"
        Repo.find_root()
    except NotDvcRepoError as exc:
        raise Sam3ftError(
            f"{Path.cwd()} is not in a DVC repository", fix="run it in the sam3ft checkout"
        ) from exc
    records = dvc.api.exp_show()
    print("\n".join(compare_lines(records, set(dotted_keys(dvc.api.params_show())))))
    return 0
