"""An export's model.json, read without torch: what `sam3ft predict` and `serve` check before loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sam3ft.errors import WeightsError
from sam3ft.layout import MODEL_JSON

FORMAT = "sam3ft-export/1"
# score threshold for exports made before model.json stored evaluate's operating threshold
FALLBACK_THRESHOLD = 0.5


def read_info(export_dir: Path) -> dict[str, Any]:
    """model.json of an export folder, checked: the format, and that its weights and vocab are there."""
    path = export_dir / MODEL_JSON
    if not path.is_file():
        what = "is not a folder" if not export_dir.is_dir() else f"has no {MODEL_JSON}"
        raise WeightsError(
            f"{export_dir} {what}: not a sam3ft export",
            fix="pass --model DIR, an export folder (artifacts/export/model after `dvc repro`)",
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})", fix="re-export the model") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a {FORMAT} export", fix="export with sam3ft")
    for key in ("weights", "vocab"):
        if not (export_dir / str(info.get(key))).is_file():
            raise WeightsError(
                f"{path}: its {key} file {info.get(key)!r} is missing from {export_dir}",
                fix="copy the whole export folder (or re-export)",
            )
    return info


def operating_threshold(info: dict[str, Any]) -> tuple[float, str | None]:
    """The score threshold evaluate reported its metrics at (stored by export), and a note when an
    older export lacks it and the fallback is used."""
    threshold = info.get("threshold")
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0 <= threshold <= 1:
        return float(threshold), None
    return FALLBACK_THRESHOLD, (
        f"this export's model.json stores no operating threshold (exported before sam3ft recorded it): "
        f"using {FALLBACK_THRESHOLD}; pass --threshold, or re-export to store evaluate.threshold"
    )


def model_version(info: dict[str, Any]) -> dict[str, Any]:
    """What identifies the model behind a prediction: preset, weights hash, trainer checkpoint hash."""
    return {
        "preset": info.get("spec", {}).get("name"),
        "weights_sha256": info.get("weights_sha256"),
        "checkpoint_sha256": info.get("checkpoint_sha256"),
        "format": info.get("format"),
    }
