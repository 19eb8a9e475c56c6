"""The export stage on a small artifact tree: exact reload, bf16 parity, delta, upstream's loader."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import SAMPLE, write_params
from sam3ft import params
from sam3ft.errors import ConfigError
from sam3ft.io import write_json
from sam3ft.model.build import build_model
from sam3ft.model.export import load_export
from sam3ft.model.spec import load_preset
from sam3ft.stages import export, fetch

VOCAB = fetch.bundled_vocab()


@pytest.fixture
def tree(tmp_path, shipped_params):
    """artifacts/{base,prepared/valid,train,eval} as the earlier stages leave them (tiny model)."""
    spec = load_preset("tiny")
    art = tmp_path / "artifacts"
    for sub in ("base/weights", "prepared", "train/run", "eval"):
        (art / sub).mkdir(parents=True)
    shutil.copyfile(VOCAB, art / "base" / VOCAB.name)
    write_json(art / "base" / "model_spec.yaml", spec.to_dict())
    torch.manual_seed(1)
    base = build_model(spec, str(VOCAB), training=False).state_dict()
    torch.save({"model": {f"detector.{k}": v for k, v in base.items()}}, art / "base/weights/sam3.pt")
    trained = {k: v.clone() for k, v in base.items()}
    trained["dot_prod_scoring.hs_proj.weight"] += 0.01  # "fine-tuned" heads, frozen rest
    trained["transformer.decoder.bbox_embed.layers.0.weight"] -= 0.02
    torch.save({"model": trained, "epoch": 1}, art / "train" / "checkpoint.pt")
    manifest = {
        "preset": "tiny",
        "spec_file": "model_spec.yaml",
        "seed": 0,
        "min_loaded": 0.95,
        "weights": {
            "source": "path",
            "location": "x",
            "file": "weights/sam3.pt",
            "sha256": fetch.sha256_file(art / "base/weights/sam3.pt"),
        },
    }
    write_json(art / "base" / "manifest.json", manifest)
    valid = art / "prepared" / "valid"
    shutil.copytree(SAMPLE / "valid", valid)
    coco = json.loads((valid / "_annotations.coco.json").read_text())
    coco["images"] = coco["images"][:2]
    coco["categories"] = [{"id": 1, "name": "fuse neutrals"}]
    write_json(valid / "_annotations.coco.json", coco)
    write_json(art / "train/run/dataset.json", {"prepared_sha256": "abc", "path": "x"})
    write_json(art / "train/run/selection.json", {"epoch": 0, "weights": "ema", "ema_decay": 0.99})
    write_json(
        art / "eval/metrics.json",
        {"valid": {"AP": 0.5, "AP50": 0.9, "AR@100": 0.6, "image_level": {"threshold": 0.4}}},
    )
    for key in ("base", "prepared", "train", "eval", "export"):
        shipped_params["paths"][key] = str(art / key)

    def run(**changes):
        shipped_params["export"].update(changes)
        path = write_params(tmp_path / "params.yaml", shipped_params)
        export.run(params.load(export.SECTIONS, path))
        return art / "export"

    return run, trained, art


def test_bf16_export_reloads_exactly_and_stays_close(tree):
    run, trained, _ = tree
    out = run(dtype="bfloat16", mode="full")
    parity = json.loads((out / "parity.json").read_text())
    assert 0 < parity["max_score_error"] <= 0.05 and parity["images"] == 2
    model, spec, info = load_export(out / "model")
    assert info["dtype"] == "bfloat16" and spec.name == "tiny"
    assert info["threshold"] == 0.4  # evaluate's operating threshold: predict's and serve's default
    state = model.state_dict()
    rounded = {k: v.to(torch.bfloat16).float() if v.is_floating_point() else v for k, v in trained.items()}
    assert all(torch.equal(state[k], v) for k, v in rounded.items())  # RoPE's complex tables kept exact
    card = (out / "model" / "README.md").read_text()
    assert "fuse neutrals" in card and info["checkpoint_sha256"] in card and "| valid | 0.5 |" in card
    assert info["ema"] == {"weights": "ema", "decay": 0.99}  # train's selection.json: EMA weights tracked
    assert "moving average of the training weights (trainer.ema_decay 0.99)" in card


def test_fp32_export_is_bit_identical(tree):
    run, trained, _ = tree
    out = run(dtype="float32", mode="full")
    parity = json.loads((out / "parity.json").read_text())
    assert parity["max_box_error"] == 0.0 and parity["max_score_error"] == 0.0
    state = load_export(out / "model")[0].state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())


def test_delta_holds_only_changed_tensors_and_needs_its_base(tree):
    run, trained, art = tree
    out = run(dtype="float32", mode="delta")
    from safetensors.torch import load_file

    stored = load_file(out / "model" / "model.safetensors")
    assert sorted(stored) == [
        "detector.dot_prod_scoring.hs_proj.weight",
        "detector.transformer.decoder.bbox_embed.layers.0.weight",
    ]
    with pytest.raises(Exception, match="needs its base weights"):
        load_export(out / "model")
    state = load_export(out / "model", art / "base/weights/sam3.pt")[0].state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())


def test_delta_without_base_weights_is_refused(tree):
    run, _, art = tree
    manifest = json.loads((art / "base/manifest.json").read_text())
    manifest["weights"] = {"source": "none"}
    write_json(art / "base/manifest.json", manifest)
    with pytest.raises(ConfigError, match="needs fetched base weights"):
        run(mode="delta")
    assert not (art / "export").exists()


def test_torch_file_loads_with_upstreams_own_loader(tree):
    """build_sam3_image_model(checkpoint_path=...) calls _load_checkpoint: our file feeds it fully."""
    from sam3.model_builder import _load_checkpoint

    run, trained, _ = tree
    out = run(dtype="float32", mode="full", torch_file=True)
    fresh = build_model(load_preset("tiny"), str(VOCAB), training=False)
    _load_checkpoint(fresh, str(out / "model" / "model.pt"))
    state = fresh.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())


def test_parity_images_bounds_the_checks(tree):
    run, _, _ = tree
    out = run(dtype="bfloat16", mode="full", parity_images=1)
    assert json.loads((out / "parity.json").read_text())["images"] == 1
    with pytest.raises(ConfigError, match=r"export\.parity_images=0"):
        run(parity_images=0)


def test_a_gpu_sized_preset_checks_two_images_on_a_cpu_by_default():
    assert export.parity_image_count(None, "sam3", "cpu", 6) == 2
    assert export.parity_image_count(None, "sam3", "cuda", 6) == 6
    assert export.parity_image_count(None, "tiny", "cpu", 6) == 6
    assert export.parity_image_count(4, "sam3", "cpu", 6) == 4  # asked for: as asked
    assert export.parity_image_count(9, "tiny", "cpu", 6) == 6
