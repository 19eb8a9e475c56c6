"""baseline: the base model's metrics, zero-shot, on the splits evaluate scores the fine-tuned one.

The base is what the train stage starts from (`load_base`): fetch's weights, or with
`fetch.weights: none` the preset's init seeded by base.seed. It is scored with evaluate's own code
and settings (evaluate.*), and evaluate copies the result into its metrics.json as the `base` block.
Its own stage, without trainer params, so changing a trainer setting does not re-evaluate the base.

Output (paths.baseline): metrics.json, per split the same keys as evaluate's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sam3ft import params as params_module
from sam3ft.io import atomic_dir, write_json
from sam3ft.layout import METRICS_FILE
from sam3ft.model.load import device_for, load_base
from sam3ft.model.predict import Predictor
from sam3ft.stages import pin_threads
from sam3ft.stages.evaluate import eval_splits, evaluate_splits

log = logging.getLogger(__name__)
SECTIONS = ["paths", "base", "evaluate"]


def run(p: params_module.Params) -> None:
    paths, evaluate = p.paths, p.evaluate
    pin_threads(p.base.threads)
    prepared = Path(paths.prepared)
    splits = eval_splits(prepared, evaluate.splits)
    model, spec = load_base(Path(paths.base), p.base.seed)
    # no trainer params here (trainer.num_gpus picks evaluate's device): the GPU when there is one
    predictor = Predictor(model, spec.image_size, device_for("cuda"))
    metrics = {ev.split: ev.metrics for ev in evaluate_splits(predictor, prepared, splits, evaluate)}
    with atomic_dir(Path(paths.baseline)) as out:
        write_json(out / METRICS_FILE, metrics)
    log.info("base model's metrics -> %s", Path(paths.baseline) / METRICS_FILE)


def main() -> None:
    from sam3ft.stages import stage_main

    stage_main("baseline", SECTIONS, run)


if __name__ == "__main__":
    main()
