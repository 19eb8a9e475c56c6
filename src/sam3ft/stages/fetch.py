"""fetch: resolve the base model into paths.base (BPE vocab, optional weights, manifest.json).

For `fetch.weights: none` the base model is sam3's architecture at the chosen preset, randomly
initialised by the trainer from `base.seed`; the manifest records exactly that.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from sam3ft.errors import ConfigError
from sam3ft.io import atomic_dir, sha256_file, write_json
from sam3ft.layout import MANIFEST, SPEC_FILE, VOCAB_NAME
from sam3ft.model.spec import load_preset

log = logging.getLogger(__name__)
SECTIONS = ["paths", "base", "model", "fetch"]


def bundled_vocab() -> Path:
    """sam3 0.1.4 ships no BPE vocab; open_clip_torch ships the identical file."""
    import open_clip

    path = Path(open_clip.__file__).parent / VOCAB_NAME
    if not path.is_file():
        raise ConfigError(f"{path} missing from open_clip_torch", fix="pip install open_clip_torch")
    return path


def resolve_weights(spec: str) -> dict[str, Any]:
    """Describe the base weights named by `fetch.weights`.

    Only `none` is accepted so far: a value that fetch accepted but training then ignored would be
    exactly the silent failure this tool exists to prevent.
    """
    if spec == "none":
        return {"source": "none", "init": "random (seeded by base.seed in the trainer)"}
    raise ConfigError(
        f"params.yaml: fetch.weights={spec!r}: loading pretrained weights is not implemented yet",
        fix="use fetch.weights: none (seeded random init)",
    )


def run(p: dict[str, Any]) -> None:
    paths, model, fetch, base = p["paths"], p["model"], p["fetch"], p["base"]
    spec = load_preset(model.preset)
    with atomic_dir(Path(paths.base)) as out:
        shutil.copyfile(bundled_vocab(), out / VOCAB_NAME)
        write_json(out / SPEC_FILE, spec.to_dict())  # JSON is valid YAML
        manifest = {
            "preset": spec.name,
            "spec_file": SPEC_FILE,
            "seed": base.seed,
            "vocab": {"file": VOCAB_NAME, "sha256": sha256_file(out / VOCAB_NAME)},
            "weights": resolve_weights(fetch.weights),
        }
        write_json(out / MANIFEST, manifest)
    log.info("base model %s (weights: %s) -> %s", spec.name, fetch.weights, paths.base)


def main() -> None:
    from sam3ft.stages import stage_main

    stage_main("fetch", SECTIONS, run)


if __name__ == "__main__":
    main()
