"""check: every params section, and the combinations between them, before any other stage runs.

DVC deletes a stage's outputs just before it runs that stage's command. Every other stage depends
on this stage's output, so it runs first: a bad `-S` value is refused here, within seconds, while
every output of the last good run is still in place. The output is the same bytes whenever params
are valid, so passing the check re-runs nothing downstream.

Output (paths.check): check.json, the list of checks passed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sam3ft import params as params_module
from sam3ft.io import write_json
from sam3ft.preflight import (
    check_devices,
    check_preset,
    check_steps,
    count_images,
    preset_params,
    raw_train_annotations,
    visible_gpus,
)

SECTIONS = list(params_module.SECTIONS)  # every section: each has its validator
CHECKS = ["params", "preset", "devices", "batch"]


def run(p: dict[str, Any]) -> None:
    model, trainer = p["model"], p["trainer"]
    check_preset(model, trainer)
    check_devices(model, trainer, p["launcher"], preset_params(model.preset), visible_gpus())
    annotations = raw_train_annotations(p["paths"], p["prepare"])
    train_images = count_images(annotations)
    if train_images is not None:  # an unreadable export is prepare's to explain
        check_steps(trainer, train_images, annotations)
    out = Path(p["paths"].check)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"passed": CHECKS})


def main() -> None:
    from sam3ft.stages import stage_main

    stage_main("check", SECTIONS, run)


if __name__ == "__main__":
    main()
