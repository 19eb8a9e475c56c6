"""fetch: resolve the base model into paths.base (BPE vocab, model spec, weights, manifest.json).

`fetch.weights: none` means sam3's architecture at the chosen preset, randomly initialised by the
trainer from `base.seed`. Any other source is downloaded into paths.base/weights/ (a DVC output, so
`dvc pull` restores it from the team's remote instead of the hub), hashed, and checked key by key
against the preset before any training: the manifest records what loads and what does not.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from sam3ft import params as params_module
from sam3ft.io import atomic_dir, sha256_file, write_json
from sam3ft.layout import MANIFEST, SPEC_FILE, VOCAB_NAME
from sam3ft.model.build import build_model, bundled_vocab, empty_weights
from sam3ft.model.spec import ModelSpec, load_preset
from sam3ft.model.weights import check_report, match_weights, read_weights_file
from sam3ft.remote.weights import WeightsSource, download, parse_source

log = logging.getLogger(__name__)
SECTIONS = ["paths", "base", "model", "fetch"]


def verify_weights(path: Path, spec: ModelSpec, vocab: Path, min_loaded: float) -> dict[str, Any]:
    """Key-by-key check of a weights file against the preset, on a parameter-free (meta) model."""
    with empty_weights():
        model = build_model(spec, str(vocab), training=False, coord_cache=False)
    report = match_weights(model, read_weights_file(path))
    check_report(report, str(path), min_loaded)
    return report.summary()


def fetch_weights(source: WeightsSource, out: Path, spec: ModelSpec, min_loaded: float) -> dict[str, Any]:
    if source.kind == "none":
        return {"source": "none", "init": "random (seeded by base.seed in the trainer)"}
    target = out / "weights" / source.filename
    identity = download(source, target)
    return {
        "source": source.kind,
        "location": source.location,
        **identity,
        "file": target.relative_to(out).as_posix(),
        "sha256": sha256_file(target),
        "bytes": target.stat().st_size,
        "verification": verify_weights(target, spec, out / VOCAB_NAME, min_loaded),
    }


def run(p: params_module.Params) -> None:
    paths, model, fetch, base = p.paths, p.model, p.fetch, p.base
    spec = load_preset(model.preset)
    source = parse_source(fetch.weights)  # bad values fail here, before any download
    with atomic_dir(Path(paths.base)) as out:
        shutil.copyfile(bundled_vocab(), out / VOCAB_NAME)
        write_json(out / SPEC_FILE, spec.to_dict())  # JSON is valid YAML
        manifest = {
            "preset": spec.name,
            "spec_file": SPEC_FILE,
            "seed": base.seed,
            "min_loaded": fetch.min_loaded,
            "vocab": {"file": VOCAB_NAME, "sha256": sha256_file(out / VOCAB_NAME)},
            "weights": fetch_weights(source, out, spec, fetch.min_loaded),
        }
        write_json(out / MANIFEST, manifest)
    log.info("base model %s, weights %s -> %s", spec.name, fetch.weights, paths.base)


def main() -> None:
    from sam3ft.stages import stage_main

    stage_main("fetch", SECTIONS, run)


if __name__ == "__main__":
    main()
