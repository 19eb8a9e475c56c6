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
