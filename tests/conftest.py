"""Shared fixtures: the repository root and a loaded copy of the shipped params.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "find-fuse-neutrals-v5"


@pytest.fixture
def shipped_params() -> dict[str, Any]:
    """params.yaml as committed (a fresh dict per test, safe to mutate)."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


def write_params(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
