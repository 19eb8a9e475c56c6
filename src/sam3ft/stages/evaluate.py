"""evaluate: predict every image of each split with the trained model; COCO box metrics.

Outputs (paths.eval): metrics.json keyed by split (a DVC metrics file), predictions/<split>.json
(COCO results records). Predictions use the prepared categories' prompts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from sam3ft.errors import ConfigError
from sam3ft.io import atomic_dir, write_json
from sam3ft.layout import ANNOTATIONS_FILE, CHECKPOINT
from sam3ft.metrics.coco import coco_box_metrics
from sam3ft.model.load import device_for, load_trained
from sam3ft.model.predict import Predictor
from sam3ft.stages import pin_threads

log = logging.getLogger(__name__)
SECTIONS = ["paths", "base", "trainer", "evaluate"]


def predict_split(predictor: Predictor, split_dir: Path, max_dets: int) -> list[dict[str, Any]]:
    """COCO results records (bbox xywh, original pixels) for every image of a prepared split."""
    coco = json.loads((split_dir / ANNOTATIONS_FILE).read_text())
    prompts = {c["id"]: c["name"] for c in coco["categories"]}
    results = []
    for record in coco["images"]:
        with Image.open(split_dir / record["file_name"]) as image:
            detections = predictor.predict(image, prompts, max_dets)
        for det in detections:
            x0, y0, x1, y1 = det.box_xyxy
            results.append(
                {
                    "image_id": record["id"],
                    "category_id": det.category_id,
                    "bbox": [round(v, 3) for v in (x0, y0, x1 - x0, y1 - y0)],
                    "score": round(det.score, 6),
                }
            )
    return results


def run(p: dict[str, Any]) -> None:
    paths, evaluate = p["paths"], p["evaluate"]
    pin_threads(p["base"].threads)
    prepared = Path(paths.prepared)
    missing = [s for s in evaluate.splits if not (prepared / s / ANNOTATIONS_FILE).is_file()]
    if missing:
        present = sorted(d.name for d in prepared.iterdir() if d.is_dir())
        raise ConfigError(
            f"params.yaml: evaluate.splits names {missing}, not in {prepared}",
            fix=f"use splits the export has: {present}",
        )
    model, spec = load_trained(Path(paths.base), Path(paths.train) / CHECKPOINT)
    predictor = Predictor(model, spec.image_size, device_for(p["trainer"].accelerator))
    metrics = {}
    with atomic_dir(Path(paths.eval)) as out:
        (out / "predictions").mkdir()
        for split in evaluate.splits:
            results = predict_split(predictor, prepared / split, evaluate.max_dets)
            write_json(out / "predictions" / f"{split}.json", results)
            metrics[split] = coco_box_metrics(prepared / split / ANNOTATIONS_FILE, results)
            log.info(
                "%s: AP %.4f AP50 %.4f AR@100 %.4f",
                split,
                metrics[split]["AP"],
                metrics[split]["AP50"],
                metrics[split]["AR@100"],
            )
        write_json(out / "metrics.json", metrics)


def main() -> None:
    from sam3ft.stages import stage_main

    stage_main("evaluate", SECTIONS, run)


if __name__ == "__main__":
    main()
