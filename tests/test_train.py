"""The train stage on CPU: exact epochs, gradient accumulation, frozen groups, and a run killed with
SIGKILL that resumes under `dvc repro` to the very same checkpoint as an unbroken run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, write_params
from sam3ft import params
from sam3ft.stages import fetch, prepare
from sam3ft.train.run import prepare_scratch, read_stats

pytestmark = pytest.mark.slow


def workspace(tmp_path: Path, shipped: dict, data: Path = REPO / "data", **trainer) -> Path:
    """params.yaml with every path under tmp_path, fetch and prepare done; returns the params file."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for key in ("base", "prepared", "train", "eval", "export", "scratch"):
        shipped["paths"][key] = str(tmp_path / key)
    shipped["paths"]["data"] = str(data)
    shipped["trainer"].update(trainer)
    path = write_params(tmp_path / "params.yaml", shipped)
    fetch.run(params.load(fetch.SECTIONS, path))
    prepare.run(params.load(prepare.SECTIONS, path))
    return path


def train(path: Path, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sam3ft.stages.train", "--params", str(path)]
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs
    )


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_accumulation_and_frozen_groups(tmp_path, shipped_params):
    path = workspace(
        tmp_path, shipped_params, max_epochs=1, batch_size=1, grad_accum=2, trainable=["decoder", "heads"]
    )
    finish(train(path))
    ckpt = torch.load(tmp_path / "train" / "checkpoint.pt", weights_only=True)
    # sam3's trainer counts forward passes: 24 images, 1 per micro-batch, 2 micro-batches per update
    assert ckpt["steps"]["train"] == 24
    trainable = [k for k in ckpt["model"] if k.startswith(("transformer.decoder.", "dot_prod_scoring."))]
    # AdamW only keeps moments for parameters that received gradients: the two unfrozen groups
    n_params_trained = len(ckpt["optimizer"]["state"])
    assert 0 < n_params_trained <= len(trainable)
    steps = (tmp_path / "train/dvclive-steps/plots/metrics/step/loss.tsv").read_text().splitlines()
    assert len(steps) == 1 + 24
    lr = (tmp_path / "train/dvclive-steps/plots/metrics/step/lr_group0.tsv").read_text().splitlines()
    assert len(lr) == 1 + 12  # the learning rate moves once per optimizer step
    assert not (tmp_path / "scratch/train/checkpoints").exists()  # tracked copy made, scratch freed


def test_killed_run_resumes_to_the_same_checkpoint(tmp_path, shipped_params):
    ref = workspace(tmp_path / "ref", json.loads(json.dumps(shipped_params)), max_epochs=3)
    finish(train(ref))
    path = workspace(tmp_path / "cut", shipped_params, max_epochs=3)
    proc = train(path, start_new_session=True)
    stats = tmp_path / "cut/scratch/train/logs/train_stats.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (stats.is_file() and len(stats.read_text().splitlines()) >= 2):
        time.sleep(0.2)  # epoch 2 logged: its checkpoint is being written or written, epoch 3 running
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut/train").exists()  # nothing half-written in the tracked output
    finish(train(path))
    log = (tmp_path / "cut/scratch/train/logs/log.txt").read_text()
    assert "Resuming training from" in log
    assert sha(tmp_path / "cut/train/checkpoint.pt") == sha(tmp_path / "ref/train/checkpoint.pt")
    for name in ("dvclive/metrics.json", "run/train_stats.json", "run/val_stats.json"):
        assert (tmp_path / "cut/train" / name).read_text() == (tmp_path / "ref/train" / name).read_text()


def test_scratch_from_another_config_is_never_resumed(tmp_path):
    scratch = tmp_path / "s"
    assert prepare_scratch(scratch, {"cfg": 1}) is False
    (scratch / "checkpoints").mkdir()
    (scratch / "checkpoints" / "checkpoint.pt").write_bytes(b"x")
    assert prepare_scratch(scratch, {"cfg": 1}) is True
    assert prepare_scratch(scratch, {"cfg": 2}) is False
    assert not (scratch / "checkpoints").exists()


def test_epoch_logged_twice_keeps_the_last_line(tmp_path):
    lines = [{"Trainer/epoch": 0, "x": 1}, {"Trainer/epoch": 1, "x": 2}, {"Trainer/epoch": 1, "x": 3}]
    (tmp_path / "train_stats.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [r["x"] for r in read_stats(tmp_path, "train_stats.json")] == [1, 3]


def test_every_parameter_has_a_group_and_masks_freeze_only_mask_inputs():
    from sam3ft.model.build import build_model, empty_weights
    from sam3ft.model.spec import load_preset
    from sam3ft.train.data import GROUPS, frozen_prefixes

    with empty_weights():
        model = build_model(load_preset("sam3"), str(fetch.bundled_vocab()), training=True, coord_cache=False)
    names = [k for k, _ in model.named_parameters()]
    every = tuple(p for prefixes in GROUPS.values() for p in prefixes)
    assert [k for k in names if not k.startswith(every)] == []
    no_masks = frozen_prefixes(["trunk", "neck", "text", "encoder", "decoder", "geometry", "heads"])
    frozen = {k.split(".")[0] + "." + k.split(".")[1] for k in names if k.startswith(no_masks)}
    assert frozen == {
        "segmentation_head.pixel_decoder",
        "segmentation_head.mask_predictor",
        "segmentation_head.cross_attend_prompt",
        "segmentation_head.instance_seg_head",
        "segmentation_head.cross_attn_norm",
        "segmentation_head.semantic_seg_head",
        "backbone.vision_backbone",
    }
    frozen_neck = sorted({k.split(".")[3] for k in names if k.startswith(no_masks) and ".convs." in k})
    assert frozen_neck == ["0", "1"]


def test_several_classes_and_negative_images_train_and_evaluate(tmp_path, shipped_params):
    """Two categories, each its own text prompt (one renamed by prepare.prompts), and a training
    image without annotations (kept: it teaches the presence head that the object can be absent)."""
    import shutil

    from sam3ft.stages import evaluate

    data = tmp_path / "data" / "two-class"
    shutil.copytree(REPO / "data" / "find-fuse-neutrals-v5", data)
    for split in ("train", "valid", "test"):
        path = data / split / "_annotations.coco.json"
        coco = json.loads(path.read_text())
        coco["categories"].append({"id": 1, "name": "fuse holder", "supercategory": "none"})
        for ann in coco["annotations"][::2]:
            ann["category_id"] = 1
        if split == "train":
            first = coco["images"][0]
            shutil.copyfile(data / split / first["file_name"], data / split / "empty.jpg")
            coco["images"].append({**first, "id": 999, "file_name": "empty.jpg"})
        path.write_text(json.dumps(coco))
    shipped_params["prepare"].update(dataset="two-class", prompts={"fuse holder": "fuse carrier"})
    shipped_params["evaluate"]["splits"] = ["valid"]
    path = workspace(tmp_path, shipped_params, data=tmp_path / "data", max_epochs=1)
    stats = json.loads((tmp_path / "prepared" / "stats.json").read_text())["splits"]["train"]
    assert stats["images"] == 25 and stats["negative_images"] == 1
    assert stats["annotations_per_class"] == {"fuse neutrals": 12, "fuse holder": 12}
    finish(train(path))
    steps = torch.load(tmp_path / "train" / "checkpoint.pt", weights_only=True)["steps"]["train"]
    assert steps == 25 // 2  # the negative image is trained on, not dropped
    evaluate.run(params.load(evaluate.SECTIONS, path))
    predictions = json.loads((tmp_path / "eval" / "predictions" / "valid.json").read_text())
    assert {p["category_id"] for p in predictions} == {1, 2}
    prompts = {
        c["id"]: c["name"]
        for c in json.loads((tmp_path / "prepared/valid/_annotations.coco.json").read_text())["categories"]
    }
    assert prompts == {1: "fuse neutrals", 2: "fuse carrier"}
