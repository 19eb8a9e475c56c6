"""export: model-only safetensors + model.json (how to rebuild it), checked by reloading.

The reload check builds a fresh model from the export alone, predicts one validation image with
it and with the trained checkpoint, and fails the stage unless the outputs agree (exactly, for
float32; within bf16 rounding for bfloat16). The differences go to parity.json (a DVC metric).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sam3ft.errors import WeightsError
from sam3ft.io import atomic_dir, sha256_file, write_json
from sam3ft.layout import ANNOTATIONS_FILE, CHECKPOINT, MODEL_JSON, VOCAB_NAME, WEIGHTS_FILE
from sam3ft.model.build import build_model
from sam3ft.model.load import load_trained
from sam3ft.model.predict import Predictor
from sam3ft.model.spec import ModelSpec
from sam3ft.model.weights import load_safetensors, save_safetensors, verify_and_load
from sam3ft.stages import pin_threads

log = logging.getLogger(__name__)
SECTIONS = ["paths", "base", "export"]
# Max |difference| allowed between the trained model and its export, per export dtype.
TOLERANCE = {"float32": 0.0, "bfloat16": 0.05}


def load_export(export_dir: Path) -> tuple[torch.nn.Module, ModelSpec, dict[str, Any]]:
    """A fresh eval-mode model from an export directory alone (float32 compute)."""
    info = json.loads((export_dir / MODEL_JSON).read_text())
    spec = ModelSpec.from_dict(info["spec"], source=str(export_dir / MODEL_JSON))
    model = build_model(spec, str(export_dir / info["vocab"]), training=False, coord_cache=False)
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in load_safetensors(export_dir / info["weights"]).items()
    }
    verify_and_load(model, state, str(export_dir / info["weights"]))
    return model.eval(), spec, info


def first_image(prepared: Path, split: str = "valid") -> tuple[Image.Image, dict[int, str]]:
    coco = json.loads((prepared / split / ANNOTATIONS_FILE).read_text())
    with Image.open(prepared / split / coco["images"][0]["file_name"]) as image:
        return image.convert("RGB"), {c["id"]: c["name"] for c in coco["categories"]}


def parity(
    a: torch.nn.Module, b: torch.nn.Module, resolution: int, image: Image.Image, prompts: dict[int, str]
) -> dict[str, float]:
    """Max absolute difference of raw boxes and scores of two models on one image."""
    box_err = score_err = 0.0
    for prompt in prompts.values():
        boxes_a, scores_a = Predictor(a, resolution).raw_outputs(image, prompt)
        boxes_b, scores_b = Predictor(b, resolution).raw_outputs(image, prompt)
        box_err = max(box_err, (boxes_a - boxes_b).abs().max().item())
        score_err = max(score_err, (scores_a - scores_b).abs().max().item())
    return {"max_box_error": box_err, "max_score_error": score_err}


def write_model_dir(
    out: Path,
    model: torch.nn.Module,
    spec: ModelSpec,
    dtype: torch.dtype,
    base_dir: Path,
    checkpoint: Path,
    prompts: dict[int, str],
) -> None:
    """Everything needed to rebuild the model: weights, vocab, and model.json describing both."""
    save_safetensors(
        # a single metadata key: safetensors writes several in hash-map order (not reproducible)
        model.state_dict(),
        out / WEIGHTS_FILE,
        dtype,
        metadata={"sam3ft_preset": spec.name},
    )
    shutil.copyfile(base_dir / VOCAB_NAME, out / VOCAB_NAME)
    write_json(
        out / MODEL_JSON,
        {
            "format": "sam3ft-export/1",
            "spec": spec.to_dict(),
            "dtype": str(dtype).split(".")[1],
            "weights": WEIGHTS_FILE,
            "weights_sha256": sha256_file(out / WEIGHTS_FILE),
            "vocab": VOCAB_NAME,
            "checkpoint_sha256": sha256_file(checkpoint),
            "resolution": spec.image_size,
            "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3},
            "prompts": {str(k): v for k, v in prompts.items()},  # category id -> text prompt
        },
    )


def run(p: dict[str, Any]) -> None:
    paths, export = p["paths"], p["export"]
    pin_threads(p["base"].threads)
    base_dir, checkpoint = Path(paths.base), Path(paths.train) / CHECKPOINT
    trained, spec = load_trained(base_dir, checkpoint)
    dtype = getattr(torch, export.dtype)
    with atomic_dir(Path(paths.export)) as out:
        model_dir = out / "model"
        model_dir.mkdir()
        image, prompts = first_image(Path(paths.prepared))
        write_model_dir(model_dir, trained, spec, dtype, base_dir, checkpoint, prompts)
        reloaded, _, _ = load_export(model_dir)
        errors = parity(trained, reloaded, spec.image_size, image, prompts)
        limit = TOLERANCE[export.dtype]
        if max(errors.values()) > limit:
            raise WeightsError(
                f"export does not reproduce the trained model: {errors} > {limit}",
                fix="report this as a bug; the export was not written",
            )
        write_json(out / "parity.json", {**errors, "tolerance": limit})
    log.info("exported %s (%s) -> %s; parity %s", spec.name, export.dtype, paths.export, errors)


def main() -> None:
    from sam3ft.stages import stage_main

    stage_main("export", SECTIONS, run)


if __name__ == "__main__":
    main()
