"""check: every params section, and the combinations between them, before any other stage runs.

DVC deletes a stage's outputs just before it runs that stage's command. Every other stage depends
on this stage's output, so it runs first: a bad `-S` value is refused here, within seconds, while
every output of the last good run is still in place. The dataset is loaded and split as prepare
will (the batch is checked against the train split it will have). The output is the same bytes whenever params
are valid, so passing the check re-runs nothing downstream.

Output (paths.check): check.json, the list of checks passed.
"""

from __future__ import annotations

from pathlib import Path

from sam3ft import params as params_module
from sam3ft.data.roboflow import check_eval_splits, plan_dataset
from sam3ft.io import write_json
from sam3ft.layout import ANNOTATIONS_FILE
from sam3ft.preflight import check_devices, check_preset, check_steps, preset_params, visible_gpus

SECTIONS = list(params_module.SECTIONS)  # every section: each has its validator
CHECKS = ["params", "devices", "preset", "dataset", "evaluate splits", "batch"]


def run(p: params_module.Params) -> None:
    model, trainer = p.model, p.trainer
    # where the run can train at all comes first: a GPU-sized preset on a CPU is the news, not its resolution
    check_devices(model, trainer, p.launcher, preset_params(model.preset), visible_gpus())
    check_preset(model, trainer)
    prepare = p.prepare
    root = Path(p.paths.data) / prepare.dataset
    plan = plan_dataset(root, prepare.split, prepare.seed, prepare.allow_leakage)  # what prepare will write
    check_eval_splits(p.evaluate.splits, plan.names, root)
    train = plan.splits[0]
    check_steps(trainer, len(train.images), train.directory / ANNOTATIONS_FILE)
    out = Path(p.paths.check)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"passed": CHECKS})


def main() -> None:
    from sam3ft.stages import stage_main

    stage_main("check", SECTIONS, run)


if __name__ == "__main__":
    main()
