"""evaluate: predict every image of each split with the trained model; the numbers and pictures.

Outputs (paths.eval):
- summary.json: the decision metrics (metrics/summary.py), the pipeline's one DVC metrics file;
per split:
- metrics.json: COCO box metrics (pycocotools) and image-level detection at `evaluate.threshold`
  (TP/FP/FN/TN counting images without annotations as negatives, precision, recall, F1, specificity);
  with a mask head (a `trainer.segmentation: true` run, or the sam3 preset), `segm`: the same COCO
  metrics on masks, for splits whose annotations all carry masks; `base`: the baseline stage's
  metrics of the base model on the same splits (a warning when the fine-tuned valid AP50 or AP is
  below it);
- predictions/<split>.json: COCO results records (`segmentation` RLE too, with a mask head);
- plots/<split>_threshold.json (precision/recall/F1 vs score threshold), plots/<split>_pr.json
  (PR curve at IoU 0.5), plots/<split>_confusion.json (image-level confusion matrix rows);
  plots/selected_epoch.json: the epoch train kept (from its run/selection.json), for the charts;
- live/: dvclive images, ground truth (green) vs predictions above the threshold (red), masks tinted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sam3ft import params as params_module
from sam3ft.errors import ConfigError
from sam3ft.io import atomic_dir, atomic_write_text, write_json
from sam3ft.layout import ANNOTATIONS_FILE, BASE_BLOCK, CHECKPOINT, METRICS_FILE, SELECTION, SUMMARY_FILE
from sam3ft.live import open_live
from sam3ft.metrics.coco import coco_box_metrics, coco_mask_metrics, has_masks, pr_curve
from sam3ft.metrics.image_level import best_scores, confusion, confusion_rows, threshold_sweep
from sam3ft.metrics.operating import best_threshold
from sam3ft.metrics.summary import decision_metrics
from sam3ft.model.load import device_for, load_trained
from sam3ft.model.predict import Predictor
from sam3ft.stages import pin_threads
from sam3ft.viz import GROUND_TRUTH, PREDICTION, draw_boxes, draw_masks, segmentation_mask, xywh_to_xyxy

log = logging.getLogger(__name__)
SECTIONS = ["paths", "base", "trainer", "evaluate"]
EVAL_ORDER = ("valid", "test", "negatives")  # report order of prepared splits (evaluate.splits: null)
SWEEP = [i / 20 for i in range(21)]  # score thresholds 0.00, 0.05, ..., 1.00
WATCHED = ("AP50", "AP")  # valid metrics where a fine-tuned model below the base gets a warning


def predict_split(
    predictor: Predictor, split_dir: Path, coco: dict[str, Any], max_dets: int, batch_size: int = 1
) -> list[dict[str, Any]]:
    """COCO results records (bbox xywh, original pixels; `segmentation` RLE when the model has a
    mask head) for every image of a prepared split, `batch_size` images per model batch."""
    prompts = {c["id"]: c["name"] for c in coco["categories"]}
    records = coco["images"]
    results = []
    for first in range(0, len(records), batch_size):
        batch = records[first : first + batch_size]
        images = []
        for record in batch:
            with Image.open(split_dir / record["file_name"]) as opened:
                images.append(opened.convert("RGB"))  # a copy in memory: the file closes here
        found = predictor.predict_batch(images, prompts, max_dets, [0.0] * len(images))
        for record, detections in zip(batch, found, strict=True):
            for det in detections:
                x0, y0, x1, y1 = det.box_xyxy
                result = {
                    "image_id": record["id"],
                    "category_id": det.category_id,
                    "bbox": [round(v, 3) for v in (x0, y0, x1 - x0, y1 - y0)],
                    "score": round(det.score, 6),
                }
                if det.mask is not None:
                    result["segmentation"] = det.mask
                results.append(result)
    return results


def overlay(
    split_dir: Path,
    record: dict[str, Any],
    coco: dict[str, Any],
    results: list[dict[str, Any]],
    threshold: float,
) -> Image.Image:
    """One image with its ground truth (green) and detections scoring >= threshold (red); masks
    are drawn when the predictions have them."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    gt = [a for a in coco["annotations"] if a["image_id"] == record["id"]]
    dets = [r for r in results if r["image_id"] == record["id"] and r["score"] >= threshold]
    with Image.open(split_dir / record["file_name"]) as opened:
        image: Image.Image = opened
        if any("segmentation" in r for r in results):
            height, width = record["height"], record["width"]
            gt_masks = [
                segmentation_mask(a["segmentation"], height, width) for a in gt if a.get("segmentation")
            ]
            image = draw_masks(draw_masks(image, gt_masks, GROUND_TRUTH), mask_arrays(dets), PREDICTION)
        out = draw_boxes(
            image, [xywh_to_xyxy(a["bbox"]) for a in gt], [names[a["category_id"]] for a in gt], GROUND_TRUTH
        )
    return draw_boxes(
        out,
        [xywh_to_xyxy(r["bbox"]) for r in dets],
        [f"{names[r['category_id']]} {r['score']:.2f}" for r in dets],
        PREDICTION,
    )


def mask_arrays(results: list[dict[str, Any]]) -> list[Any]:
    """The (H, W) bool masks of results that carry one."""
    return [
        segmentation_mask(r["segmentation"], *r["segmentation"]["size"])
        for r in results
        if "segmentation" in r
    ]


def split_report(
    gt_path: Path, coco: dict[str, Any], results: list[dict[str, Any]], threshold: float
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """(metrics, plots) of one split."""
    with_gt = {a["image_id"] for a in coco["annotations"]}
    positive = {img["id"]: img["id"] in with_gt for img in coco["images"]}
    best = best_scores(results)
    metrics: dict[str, Any] = coco_box_metrics(gt_path, results) if with_gt else {}
    if with_gt and any("segmentation" in r for r in results):
        if has_masks(coco):
            metrics["segm"] = coco_mask_metrics(gt_path, results)
        else:
            log.warning("%s: some annotations have no mask: no mask metrics (segm) for this split", gt_path)
    metrics["image_level"] = {"threshold": threshold, **confusion(positive, best, threshold).summary()}
    plots: dict[str, list[dict[str, Any]]] = {
        "threshold": threshold_sweep(positive, best, SWEEP),
        "pr": pr_curve(gt_path, results) if with_gt else [],
        "confusion": confusion_rows(positive, best, threshold),
    }
    return metrics, plots


def prepared_eval_splits(prepared: Path) -> list[str]:
    """Every split prepare wrote (stats.json) except train: valid first, then test, then the rest."""
    names = [s for s in json.loads((prepared / "stats.json").read_text())["splits"] if s != "train"]
    return sorted(names, key=lambda s: (EVAL_ORDER.index(s) if s in EVAL_ORDER else len(EVAL_ORDER), s))


def eval_splits(prepared: Path, named: list[str] | None) -> list[str]:
    """`evaluate.splits` resolved against what prepare wrote: null is every split but train; a
    named split prepare did not write is an error naming the ones it did."""
    splits = named if named is not None else prepared_eval_splits(prepared)
    missing = [s for s in splits if not (prepared / s / ANNOTATIONS_FILE).is_file()]
    if missing:
        present = sorted(d.name for d in prepared.iterdir() if d.is_dir())
        raise ConfigError(
            f"evaluate.splits names {missing}, not in {prepared}",
            fix=f"use splits the export has: {present}, or null for all but train",
            key="evaluate.splits",
        )
    return splits


@dataclass
class SplitEval:
    """One split's ground truth, predictions, metrics and plot rows."""

    split: str
    coco: dict[str, Any]
    results: list[dict[str, Any]]
    metrics: dict[str, Any]
    plots: dict[str, list[dict[str, Any]]]
    predict_s: float  # wall time of predicting the split


def evaluate_splits(
    predictor: Predictor, prepared: Path, splits: list[str], evaluate: params_module.Evaluate
) -> Iterator[SplitEval]:
    """Predict and score each prepared split: what evaluate does with the trained model and baseline
    with the base model, so their numbers compare. `evaluate.threshold` "auto" is chosen on the
    first split with objects (valid comes first) and used on every split."""
    batch_size = evaluate.images_per_batch(predictor.device)
    predicted = []
    for split in splits:
        coco = json.loads((prepared / split / ANNOTATIONS_FILE).read_text())
        start = time.perf_counter()
        results = predict_split(predictor, prepared / split, coco, evaluate.max_dets, batch_size)
        seconds, images = time.perf_counter() - start, len(coco["images"])
        predicted.append((split, coco, results, seconds))
        log.info(
            "%s: %d images predicted in %.1f s (%.2f images/s, batches of %d)",
            split,
            images,
            seconds,
            images / seconds,
            batch_size,
        )
    operating = resolve_threshold(evaluate.threshold, [entry[:3] for entry in predicted])
    for split, coco, results, seconds in predicted:
        metrics, plots = split_report(prepared / split / ANNOTATIONS_FILE, coco, results, operating)
        log.info("%s: %s", split, {k: v for k, v in metrics.items() if k in ("AP", "AP50")})
        yield SplitEval(split, coco, results, metrics, plots, seconds)


def resolve_threshold(threshold: float | str, predicted: list[tuple[str, dict[str, Any], Any]]) -> float:
    """`evaluate.threshold` as a number: "auto" is the sweep value with the best detection F1 on the
    first split that has objects (metrics/operating.py); a number is used as it is."""
    if not isinstance(threshold, str):
        return threshold
    for split, coco, results in predicted:
        if coco["annotations"]:
            chosen = best_threshold(coco, results, SWEEP[1:-1])
            log.info(
                "operating threshold %.2f: the best detection F1 on %s (evaluate.threshold: auto)",
                chosen,
                split,
            )
            return chosen
    raise ConfigError(
        "evaluate.threshold is auto, but no evaluated split has objects to choose it on",
        fix="set evaluate.threshold to a score, or evaluate a split with objects (valid)",
        key="evaluate.threshold",
    )


def worse_than_base(
    tuned: dict[str, Any], base: dict[str, Any], split: str = "valid", keys: tuple[str, ...] = WATCHED
) -> list[str]:
    """One line per metric of `keys` where the fine-tuned model scores below the base on `split`."""
    if split not in tuned or split not in base:
        return []
    return [
        f"{split} {key}: the fine-tuned model ({tuned[split][key]}) is below the base model "
        f"({base[split][key]}): training made it worse"
        for key in keys
        if key in tuned[split] and key in base[split] and tuned[split][key] < base[split][key]
    ]


def read_base_metrics(baseline: Path, splits: list[str]) -> dict[str, Any] | None:
    """baseline's metrics, for the same splits; None (with a warning) when baseline has not run."""
    path = baseline / METRICS_FILE
    if not path.is_file():
        log.warning(
            "%s missing: no base block in metrics.json; fix: `dvc repro` runs the baseline stage", path
        )
        return None
    base: dict[str, Any] = json.loads(path.read_text())
    if set(base) != set(splits):  # write_json sorts keys: compare as sets
        raise ConfigError(
            f"{path} has the base model's metrics on {sorted(base)}, evaluate.splits gives {sorted(splits)}",
            fix="run the baseline stage again (`dvc repro` does)",
        )
    return base


def run(p: params_module.Params) -> None:
    paths, evaluate = p.paths, p.evaluate
    pin_threads(p.base.threads)
    prepared = Path(paths.prepared)
    splits = eval_splits(prepared, evaluate.splits)
    base = read_base_metrics(Path(paths.baseline), splits)
    start = time.perf_counter()
    model, spec = load_trained(Path(paths.base), Path(paths.train) / CHECKPOINT)
    predictor = Predictor(model, spec.image_size, device_for(p.trainer.accelerator))
    loaded = time.perf_counter()
    log.info("trained model loaded onto %s in %.1f s", predictor.device, loaded - start)
    metrics: dict[str, Any] = {}
    predicting = 0.0
    with atomic_dir(Path(paths.eval)) as out:
        (out / "predictions").mkdir()
        (out / "plots").mkdir()
        with open_live(out / "live") as live:
            for ev in evaluate_splits(predictor, prepared, splits, evaluate):
                split_dir = prepared / ev.split
                predicting += ev.predict_s
                write_json(out / "predictions" / f"{ev.split}.json", ev.results)
                metrics[ev.split] = ev.metrics
                for kind, rows in ev.plots.items():
                    write_json(out / "plots" / f"{ev.split}_{kind}.json", rows)
                for record in ev.coco["images"][: evaluate.overlays]:
                    name = f"{ev.split}/{Path(record['file_name']).stem}.jpg"
                    threshold = ev.metrics["image_level"]["threshold"]
                    live.log_image(name, overlay(split_dir, record, ev.coco, ev.results, threshold))
        if base is not None:
            for line in worse_than_base(metrics, base):
                log.warning("%s", line)
            metrics[BASE_BLOCK] = base
        write_json(out / METRICS_FILE, metrics)
        selection = Path(paths.train) / SELECTION
        chosen = json.loads(selection.read_text()) if selection.is_file() else None
        # the epoch train kept, drawn as a rule on the validation chart (.dvc/plots/linear_marked.json)
        kept = [] if chosen is None else [{"step": chosen["epoch"], "AP50": chosen["value"]}]
        write_json(out / "plots" / "selected_epoch.json", kept)
        # insertion order, not sorted: `dvc exp show` puts the columns in file order, valid first
        atomic_write_text(out / SUMMARY_FILE, json.dumps(decision_metrics(metrics, chosen), indent=2) + "\n")
    done = time.perf_counter()
    log.info(
        "%.1f s from loading the model to the last file: loading %.1f s, predicting %.1f s, "
        "metrics, plots and overlays %.1f s",
        done - start,
        loaded - start,
        predicting,
        done - loaded - predicting,
    )


def main() -> None:
    from sam3ft.stages import stage_main

    stage_main("evaluate", SECTIONS, run)


if __name__ == "__main__":
    main()
