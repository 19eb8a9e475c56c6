"""export: the model to ship, in paths.export/model/, proven equal to what was trained.

Writes `model.safetensors` (bf16 or fp32, sam3.pt's key layout; `delta` mode: only what changed
against the fetched base weights), optionally `model.pt` for upstream's loader, `model.json` (how
to rebuild it), the vocab and a model card (README.md). Two checks, on the validation images
(all of them, unless export.parity_images or a GPU-sized preset on a CPU says fewer):
- reload: a fresh model built from the export alone must reproduce the trained model with its
  weights rounded to the export dtype *exactly* (else the stage fails: the files are wrong);
- parity: the export vs the trained float32 model; the max box and score differences (and mask
  probability differences, with a mask head) go to parity.json (a DVC metric) and the stage fails
  above `export.tolerance`.
Both checks run float32 forwards on the GPU when one is visible (the device training used), else on
the CPU.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sam3ft import params as params_module
from sam3ft.errors import ConfigError, WeightsError
from sam3ft.io import atomic_dir, atomic_write_text, sha256_file, write_json
from sam3ft.layout import (
    ANNOTATIONS_FILE,
    BASE_BLOCK,
    CHECKPOINT,
    MANIFEST,
    MODEL_DIR,
    MODEL_JSON,
    VOCAB_NAME,
)
from sam3ft.model.build import build_to_load
from sam3ft.model.export import FORMAT, cast, delta_state, load_export, write_weights
from sam3ft.model.load import load_trained
from sam3ft.model.predict import Predictor
from sam3ft.model.weights import image_model_state, read_weights_file
from sam3ft.preflight import CPU_PRESET_PARAMS, preset_params
from sam3ft.stages import pin_threads

log = logging.getLogger(__name__)
SECTIONS = ["paths", "base", "export"]
CPU_PARITY_IMAGES = 2  # export.parity_images null: a GPU-sized preset's checks on a CPU


def validation_images(prepared: Path, split: str = "valid") -> tuple[list[Image.Image], dict[int, str]]:
    coco = json.loads((prepared / split / ANNOTATIONS_FILE).read_text())
    images = []
    for record in coco["images"]:
        with Image.open(prepared / split / record["file_name"]) as image:
            images.append(image.convert("RGB"))
    return images, {c["id"]: c["name"] for c in coco["categories"]}


def parity_image_count(asked: int | None, preset: str, device: str, available: int) -> int:
    """How many validation images the two checks run on: `asked` (export.parity_images) where set,
    else all of them, except for a preset sized for GPUs on a CPU: CPU_PARITY_IMAGES, since each of
    its full-size float32 forwards there is slow (bench/README.md has the stage's time)."""
    if asked is not None:
        return min(asked, available)
    big = (preset_params(preset) or 0) > CPU_PRESET_PARAMS
    return min(CPU_PARITY_IMAGES, available) if big and device == "cpu" else available


def model_outputs(
    model: torch.nn.Module, resolution: int, images: list[Image.Image], prompts: dict[int, str], device: str
) -> list[dict[str, torch.Tensor]]:
    """Raw outputs (boxes, scores, mask logits where the model has a mask head) of `model`, moved
    to `device` and run there in float32, for each image and prompt; kept on the CPU."""
    predictor = Predictor(model, resolution, device)
    return [
        {key: value.cpu() for key, value in predictor.outputs(image, prompt).items()}
        for image in images
        for prompt in prompts.values()
    ]


def max_differences(
    outs_a: list[dict[str, torch.Tensor]], outs_b: list[dict[str, torch.Tensor]]
) -> dict[str, float]:
    """Max |difference| of raw boxes (normalised cxcywh) and scores of two models' outputs
    (model_outputs), and of mask probabilities (sigmoid of the logits) when they have a mask head."""
    errors: dict[str, float] = {"max_box_error": 0.0, "max_score_error": 0.0}
    for out_a, out_b in zip(outs_a, outs_b, strict=True):
        if set(out_a) != set(out_b):
            raise WeightsError(
                f"one model has outputs {sorted(out_a)}, the other {sorted(out_b)}",
                fix="report this as a bug: the export lost or gained the mask head",
            )
        for key, name in (("boxes", "max_box_error"), ("scores", "max_score_error")):
            errors[name] = max(errors[name], (out_a[key] - out_b[key]).abs().max().item())
        if "masks" in out_a:
            diff = (out_a["masks"].sigmoid() - out_b["masks"].sigmoid()).abs().max().item()
            errors["max_mask_error"] = max(errors.get("max_mask_error", 0.0), diff)
    return {name: round(value, 8) for name, value in errors.items()}


def operating_threshold(metrics: dict[str, Any]) -> float:
    """evaluate.threshold, as evaluate recorded it beside the metrics it computed at it (every split
    carries the same one): `sam3ft predict` and `serve` use it as their default score threshold."""
    found = {
        m["image_level"]["threshold"] for m in metrics.values() if "threshold" in m.get("image_level", {})
    }
    if len(found) != 1:
        raise ConfigError(
            f"evaluate's metrics.json records {len(found)} operating thresholds ({sorted(found)}), not one",
            fix="re-run evaluate (dvc repro) so metrics.json matches evaluate.threshold",
        )
    return float(found.pop())


def ema_record(run: Path) -> dict[str, Any]:
    """Whether the tracked (so exported) weights are the EMA of the training weights, from the
    train stage's selection.json (a run made before EMA existed: no)."""
    selection = json.loads((run / "selection.json").read_text())
    return {"weights": selection.get("weights", "regular"), "decay": selection.get("ema_decay", 0.0)}


def ema_line(ema: dict[str, Any]) -> str:
    if ema["weights"] == "ema":
        return f"the exponential moving average of the training weights (trainer.ema_decay {ema['decay']})"
    return "the training weights themselves (no EMA, trainer.ema_decay 0)"


def model_card(info: dict[str, Any], metrics: dict[str, Any], run: Path) -> str:
    """README.md next to the weights: what it is, where it came from, how well it does, how to load it."""
    dataset = json.loads((run / "dataset.json").read_text())
    rows = "\n".join(
        f"| {split} | {m.get('AP', '-')} | {m.get('AP50', '-')} | {m.get('AR@100', '-')} |"
        for split, m in metrics.items()
    )
    if any("segm" in m for m in metrics.values()):  # a model with a mask head: its mask AP too
        rows += "\n" + "\n".join(
            f"| {split} (masks) | {m['segm']['AP']} | {m['segm']['AP50']} | {m['segm']['AR@100']} |"
            for split, m in metrics.items()
            if "segm" in m
        )
    prompt = next(iter(info["prompts"].values()))
    base = info["base"]
    origin = " ".join(str(base[k]) for k in ("source", "location") if base.get(k))
    base_hash = base.get("sha256", "none: seeded random init")
    return f"""# SAM3 fine-tuned with sam3ft ({info["spec"]["name"]} preset)

Finds: {", ".join(f"`{p}`" for p in info["prompts"].values())} (text prompts).
Operating score threshold: {info["threshold"]} (evaluate.threshold, chosen on valid when auto;
`sam3ft predict` and `sam3ft serve` default to it).
Weights: `{info["weights"]}`, {info["dtype"]}, mode `{info["mode"]}`, keys in sam3.pt's layout (`detector.`).

- Base weights: {origin}; sha256 `{base_hash}`
- Trained weights: {ema_line(info["ema"])}
- Trainer checkpoint sha256: `{info["checkpoint_sha256"]}`
- Dataset (prepared) sha256: `{dataset["prepared_sha256"]}`
- Params and resolved trainer config: `artifacts/train/run/` of the commit that made this export

| split | AP | AP50 | AR@100 |
|---|---|---|---|
{rows}

Load it (a delta export also needs `base_weights=` the file above):

```python
from sam3ft.model.export import load_export  # + Path (pathlib), Image (PIL)
from sam3ft.model.predict import Predictor
model, spec, info = load_export(Path("{info["dir"]}"))
found = Predictor(model, spec.image_size).predict(Image.open("a.jpg"), {{1: {prompt!r}}}, max_dets=10)
```
"""


def run(p: params_module.Params) -> None:
    paths, export = p.paths, p.export
    pin_threads(p.base.threads)
    base_dir, checkpoint = Path(paths.base), Path(paths.train) / CHECKPOINT
    manifest = json.loads((base_dir / MANIFEST).read_text())
    base_file = base_dir / manifest["weights"]["file"] if "file" in manifest["weights"] else None
    if export.mode == "delta" and base_file is None:
        raise ConfigError(
            "export.mode=delta needs fetched base weights (fetch.weights is none)",
            fix="use export.mode: full, or fine-tune from pretrained weights",
            key="export.mode",
        )
    trained, spec = load_trained(base_dir, checkpoint)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, export.dtype)
    state = cast(trained.state_dict(), dtype)
    if base_file is not None and export.mode == "delta":
        state = delta_state(state, image_model_state(read_weights_file(base_file))[0])
    images, prompts = validation_images(Path(paths.prepared))
    available = len(images)
    images = images[: parity_image_count(export.parity_images, spec.name, device, available)]
    if len(images) < available:
        log.info(
            "parity checks on %d of %d validation images: %s on the %s runs 3 float32 forwards per "
            "image and prompt (export.parity_images sets the count)",
            len(images),
            available,
            spec.name,
            device,
        )
    metrics = json.loads((Path(paths.eval) / "metrics.json").read_text())
    metrics.pop(BASE_BLOCK, None)  # the base model's numbers: the card and threshold are the fine-tuned's
    with atomic_dir(Path(paths.export)) as out:
        model_dir = out / MODEL_DIR
        model_dir.mkdir()
        info = {
            "format": FORMAT,
            "spec": spec.to_dict(),
            "dtype": export.dtype,
            "mode": export.mode,
            "vocab": VOCAB_NAME,
            "resolution": spec.image_size,
            "dir": Path(paths.export, MODEL_DIR).as_posix(),
            "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3},
            "prompts": {str(k): v for k, v in prompts.items()},
            "threshold": operating_threshold(metrics),
            "checkpoint_sha256": sha256_file(checkpoint),
            "ema": ema_record(Path(paths.train) / "run"),
            "base": {k: v for k, v in manifest["weights"].items() if k in ("source", "location", "sha256")},
            **write_weights(model_dir, state, "model", export.torch_file),
        }
        shutil.copyfile(base_dir / VOCAB_NAME, model_dir / VOCAB_NAME)
        write_json(model_dir / MODEL_JSON, info)
        reloaded, _, _ = load_export(model_dir, base_file)
        reloaded_outs = model_outputs(reloaded, spec.image_size, images, prompts, device)
        del reloaded  # one model in (device) memory at a time
        rounded = build_to_load(spec, str(base_dir / VOCAB_NAME))
        rounded.load_state_dict(cast(cast(trained.state_dict(), dtype), torch.float32))
        reload_err = max_differences(
            model_outputs(rounded, spec.image_size, images, prompts, device), reloaded_outs
        )
        del rounded
        if max(reload_err.values()) != 0.0:
            raise WeightsError(
                f"the export does not reload exactly: {reload_err}",
                fix="report this as a bug; nothing was written",
            )
        parity = max_differences(
            model_outputs(trained, spec.image_size, images, prompts, device), reloaded_outs
        )
        if max(parity.values()) > export.tolerance:
            raise WeightsError(
                f"{export.dtype} export differs from the trained model by {parity}, above "
                f"export.tolerance={export.tolerance}",
                fix="export float32, or raise the tolerance",
            )
        atomic_write_text(model_dir / "README.md", model_card(info, metrics, Path(paths.train) / "run"))
        write_json(
            out / "parity.json",
            {
                **parity,
                "tolerance": export.tolerance,
                "images": len(images),
                "weights_bytes": (model_dir / info["weights"]).stat().st_size,
            },
        )
    log.info(
        "exported %s (%s, %s) -> %s; parity (on %s) %s",
        spec.name,
        export.dtype,
        export.mode,
        paths.export,
        device,
        parity,
    )


def main() -> None:
    from sam3ft.stages import stage_main

    stage_main("export", SECTIONS, run)


if __name__ == "__main__":
    main()
