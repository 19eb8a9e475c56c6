"""The export stage of the `sam3` preset on a CPU-only machine: wall time and what it spends it on.

Builds the artifact tree the earlier stages would leave (a seeded random-init `sam3` model saved
as a trainer checkpoint, fetch's spec and vocab with `fetch.weights: none`, the bundled sample's
prepared valid split, an evaluate metrics file), then runs the export stage's own `run` with the
shipped params (export.parity_images null: 2 images for a GPU-sized preset on a CPU) and times it,
then one float32 forward of the trained model on one image (what each parity image costs 3 of).
Needs ~14 GB of memory and ~7 GB of disk under --work.

    PYTHONPATH=src python bench/cpu_sam3_export.py --work /tmp/sam3-export \\
        --out bench/results/cpu_sam3_export.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from sam3ft import params
from sam3ft.io import write_json
from sam3ft.model.build import build_model
from sam3ft.model.spec import load_preset
from sam3ft.stages import export, fetch, pin_threads

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import cpuinfo  # noqa: E402


def tree(work: Path, prepared_valid: Path) -> Path:
    """The artifact tree and a params file pointing at it; returns the params file."""
    spec = load_preset("sam3")
    art = work / "artifacts"
    shutil.rmtree(art, ignore_errors=True)
    for sub in ("base", "prepared", "train/run", "eval"):
        (art / sub).mkdir(parents=True)
    shutil.copyfile(fetch.bundled_vocab(), art / "base" / fetch.bundled_vocab().name)
    write_json(art / "base" / "model_spec.yaml", spec.to_dict())
    write_json(
        art / "base" / "manifest.json",
        {
            "preset": "sam3",
            "spec_file": "model_spec.yaml",
            "seed": 0,
            "min_loaded": 0.95,
            "weights": {"source": "none"},
        },
    )
    torch.manual_seed(0)
    model = build_model(spec, str(fetch.bundled_vocab()), training=False)
    torch.save({"model": model.state_dict(), "epoch": 0}, art / "train" / "checkpoint.pt")
    del model
    shutil.copytree(prepared_valid, art / "prepared" / "valid")
    write_json(art / "train/run/selection.json", {"epoch": 0, "weights": "regular"})
    write_json(art / "train/run/dataset.json", {"prepared_sha256": "-", "path": str(prepared_valid.parent)})
    write_json(
        art / "eval/metrics.json", {"valid": {"AP": 0.0, "AP50": 0.0, "image_level": {"threshold": 0.5}}}
    )
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for key in ("base", "prepared", "train", "eval", "export"):
        data["paths"][key] = str(art / key)
    data["base"]["threads"] = os.cpu_count()
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (~7 GB)")
    parser.add_argument(
        "--prepared", type=Path, default=REPO / "artifacts/prepared/valid", help="a prepared valid split"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    path = tree(args.work, args.prepared)
    setup_s = time.perf_counter() - start
    p = params.load(export.SECTIONS, path)
    start = time.perf_counter()
    export.run(p)
    stage_s = time.perf_counter() - start
    parity = json.loads((Path(p.paths.export) / "parity.json").read_text())
    pin_threads(p.base.threads)
    trained, spec = export.load_trained(Path(p.paths.base), Path(p.paths.train) / "checkpoint.pt")
    images, prompts = export.validation_images(Path(p.paths.prepared))
    export.model_outputs(trained, spec.image_size, images[:1], prompts, "cpu")  # warm-up
    start = time.perf_counter()
    export.model_outputs(trained, spec.image_size, images[:1], prompts, "cpu")
    forward_s = time.perf_counter() - start
    result = {
        "date": datetime.date.today().isoformat(),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU",
        "cpu": cpuinfo().get("model name", "?"),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "setup_s (build, save checkpoint)": round(setup_s, 1),
        "export_stage_s": round(stage_s, 1),
        "parity": parity,
        "valid_images_available": len(images),
        "one_forward_s (float32, 1008 px, one prompt)": round(forward_s, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
