"""Shared fixtures: the repository root and a loaded copy of the shipped params.yaml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "find-fuse-neutrals-v5"


@pytest.fixture(scope="session", autouse=True)
def sample_dataset() -> Path:
    """The bundled sample, restored from the in-repo DVC store if this checkout lacks it (offline)."""
    if not SAMPLE.is_dir():
        subprocess.run([sys.executable, "-m", "dvc", "pull", "data.dvc"], cwd=REPO, check=True)
    assert SAMPLE.is_dir(), f"{SAMPLE} missing after dvc pull"
    return SAMPLE


@pytest.fixture
def shipped_params() -> dict[str, Any]:
    """params.yaml as committed (a fresh dict per test, safe to mutate)."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


def write_params(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_tiny_export(
    out: Path, *, masks: bool = False, threshold: float | None = 0.4, seed: int = 0
) -> Path:
    """A real sam3ft export folder of a seeded random tiny model (bf16, full), as the export stage
    writes it; the box head's last layer is drawn at random (not DETR's zero init) so boxes depend on
    the image. `threshold=None`: an export from before model.json stored the operating threshold."""
    import shutil

    import torch

    from sam3ft.io import write_json
    from sam3ft.model.build import build_model
    from sam3ft.model.export import FORMAT, cast, write_weights
    from sam3ft.model.spec import load_preset
    from sam3ft.stages.fetch import bundled_vocab

    spec = load_preset("tiny").with_mask_head(masks)
    torch.manual_seed(seed)
    model = build_model(spec, str(bundled_vocab()), training=False, coord_cache=False)
    torch.nn.init.normal_(model.transformer.decoder.bbox_embed.layers[-1].weight, std=0.05)
    out.mkdir(parents=True, exist_ok=True)
    info = {"format": FORMAT, "spec": spec.to_dict(), "dtype": "bfloat16", "mode": "full"}
    info |= {"vocab": bundled_vocab().name, "prompts": {"1": "fuse neutrals"}, "checkpoint_sha256": "0" * 64}
    info |= write_weights(out, cast(model.state_dict(), torch.bfloat16), "model", torch_file=False)
    if threshold is not None:
        info["threshold"] = threshold
    shutil.copyfile(bundled_vocab(), out / bundled_vocab().name)
    write_json(out / "model.json", info)
    return out
