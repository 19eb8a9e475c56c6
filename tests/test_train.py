"""The train stage on CPU: exact epochs, gradient accumulation, frozen groups, and a run killed with
SIGKILL that resumes under `dvc repro` to the very same checkpoint as an unbroken run."""

from __future__ import annotations

import hashlib
import json
import math
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
    for key in ("base", "prepared", "train", "baseline", "eval", "export", "scratch"):
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


def test_a_run_as_long_as_its_warmup_trains(tmp_path, shipped_params):
    """24 images at batch 6 for one epoch is 4 steps, as many as warmup_steps: upstream's schedule
    divides by zero there at the second step (train/optim.py InverseSquareRootSchedule)."""
    path = workspace(tmp_path, shipped_params, max_epochs=1, batch_size=6, warmup_steps=4, cooldown_steps=4)
    finish(train(path))
    rows = (tmp_path / "train/dvclive-steps/plots/metrics/step/lr_group0.tsv").read_text().splitlines()[1:]
    lrs = [float(row.split("\t")[1]) for row in rows]
    # warmup s / 4 times cooldown (4 - s) / 4 for s = 0..3, no decay before the warmup ends
    assert lrs == pytest.approx([max(lrs) * x for x in (0.0, 0.75, 1.0, 0.75)], rel=1e-9)
    assert max(lrs) > 0


@pytest.mark.parametrize(
    ("ema_decay", "recipe"),
    [(0.0, "stock"), (0.9, "stock"), (0.0, "lean-in-backward")],
    ids=["plain", "ema", "in-backward"],
)
def test_killed_run_resumes_to_the_same_checkpoint(tmp_path, shipped_params, ema_decay, recipe):
    """Killed after epoch 2's checkpoint of 3 and resumed: the same checkpoint and stats, byte for
    byte; with EMA, the average continues from the checkpoint's (the tracked checkpoint holds it, and
    the validation stats score it); with lean-in-backward, the per-weight optimizer states stepped in the
    backward pass resume too. (This case drifted by float rounding while TorchScript optimized
    sam3's scripted loss helpers after their first calls in a process: see train/run.run_trainer.)"""
    # checkpoint_<epoch>.pt tells the epochs apart
    settings = {"max_epochs": 3, "checkpoint_freq": 1, "ema_decay": ema_decay, "recipe": recipe}
    ref = workspace(tmp_path / "ref", json.loads(json.dumps(shipped_params)), **settings)
    finish(train(ref))
    path = workspace(tmp_path / "cut", shipped_params, **settings)
    proc = train(path, start_new_session=True)
    checkpoints = tmp_path / "cut/scratch/train/checkpoints"
    deadline = time.monotonic() + 300
    # sam3 writes checkpoint.pt (atomically) before checkpoint_2.pt: it holds epoch 2 by then
    while time.monotonic() < deadline and not (checkpoints / "checkpoint_2.pt").is_file():
        time.sleep(0.02)
    assert proc.poll() is None  # killed while epoch 2's validation or epoch 3 runs
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert torch.load(checkpoints / "checkpoint.pt", map_location="cpu", weights_only=False)["epoch"] == 2
    assert not (tmp_path / "cut/train").exists()  # nothing half-written in the tracked output
    finish(train(path))
    log = (tmp_path / "cut/scratch/train/logs/log.txt").read_text()
    assert "Resuming training from" in log
    assert sha(tmp_path / "cut/train/checkpoint.pt") == sha(tmp_path / "ref/train/checkpoint.pt")
    for name in ("dvclive/metrics.json", "run/train_stats.json", "run/val_stats.json"):
        assert (tmp_path / "cut/train" / name).read_text() == (tmp_path / "ref/train" / name).read_text()
    tracked = torch.load(tmp_path / "cut/train/checkpoint.pt", map_location="cpu", weights_only=True)
    assert tracked.get("model_weights", "regular") == ("ema" if ema_decay else "regular")


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
    from sam3ft.train.model import GROUPS, frozen_prefixes

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


def base_weights_with_mask_head(path: Path) -> dict[str, torch.Tensor]:
    """A tiny model's weights, mask head included, saved as a base-weights file: the reference both
    runs start from, so 'changed' and 'unchanged' are exact comparisons."""
    from sam3ft.model.build import build_model
    from sam3ft.model.spec import load_preset

    torch.manual_seed(0)
    spec = load_preset("tiny").with_mask_head()
    state = build_model(spec, str(fetch.bundled_vocab()), training=False, coord_cache=False).state_dict()
    torch.save({"model": state}, path)
    return state


def in_group(key: str, group: str) -> bool:
    from sam3ft.train.model import GROUPS

    return key.startswith(GROUPS[group])


def test_segmentation_trains_the_mask_head_evaluates_and_exports_masks(tmp_path, shipped_params):
    """trainer.segmentation: true on tiny: a mask head is added, the mask losses are logged, every
    "masks" parameter moves (they stay put with segmentation false), evaluate reports `segm`
    metrics and RLE predictions, and the export carries the mask head."""
    from sam3ft.stages import evaluate, export

    base = base_weights_with_mask_head(tmp_path / "base.pt")
    runs = {}
    for seg in (True, False):
        shipped = json.loads(json.dumps(shipped_params))
        shipped["fetch"]["weights"] = str(tmp_path / "base.pt")
        shipped["evaluate"]["splits"] = ["valid"]
        path = workspace(tmp_path / str(seg), shipped, max_epochs=1, segmentation=seg)
        finish(train(path))
        runs[seg] = path
        trained = torch.load(tmp_path / str(seg) / "train/checkpoint.pt", weights_only=True)["model"]
        masks = [k for k in trained if in_group(k, "masks") and trained[k].is_floating_point()]
        changed = [k for k in masks if not torch.equal(trained[k], base[k])]
        if seg:
            assert any(k.startswith("segmentation_head.") for k in masks)
            # The pixel decoder's last stage never runs: it is built with 3 upsampling stages (as
            # upstream's builder does) but gets 3 feature levels, so it loops over 2
            # (sam3/model/maskformer_segmentation.py:206-217). Everything else of the group trained.
            unused = (
                "segmentation_head.pixel_decoder.conv_layers.2.",
                "segmentation_head.pixel_decoder.norms.2.",
            )
            assert changed == [k for k in masks if not k.startswith(unused)]
        else:
            assert all(not k.startswith("segmentation_head.") for k in trained)  # tiny: no mask head
            assert sorted({k.split(".")[3] for k in masks}) == ["0", "1"]  # convs.0/.1 exist, frozen
            assert changed == []
            decoder = [k for k in trained if k.startswith("transformer.decoder.") and "weight" in k]
            assert any(not torch.equal(trained[k], base[k]) for k in decoder)  # the rest did train

    steps = tmp_path / "True/train/dvclive-steps/plots/metrics/step"
    for name in ("loss_mask", "loss_dice", "loss_semantic_seg", "loss_semantic_dice"):
        rows = (steps / f"{name}.tsv").read_text().splitlines()[1:]
        values = [float(r.split("\t")[-1]) for r in rows]
        assert len(values) == 12 and all(math.isfinite(v) for v in values), name  # 24 images / 2
        assert max(values) > 0, name
    assert not (tmp_path / "False/train/dvclive-steps/plots/metrics/step/loss_mask.tsv").exists()
    record = (tmp_path / "True/train/run/trainer_config.yaml").read_text()
    assert "sam3.train.loss.loss_fns.Masks" in record and "- masks" in record

    evaluate.run(params.load(evaluate.SECTIONS, runs[True]))
    metrics = json.loads((tmp_path / "True/eval/metrics.json").read_text())["valid"]
    assert set(metrics["segm"]) == set(metrics) - {"segm", "image_level"}  # AP, AP50, ... as for boxes
    assert all(-1.0 <= v <= 1.0 for v in metrics["segm"].values())
    predictions = json.loads((tmp_path / "True/eval/predictions/valid.json").read_text())
    assert predictions and all(set(p["segmentation"]) == {"size", "counts"} for p in predictions)
    evaluate.run(params.load(evaluate.SECTIONS, runs[False]))
    assert "segm" not in json.loads((tmp_path / "False/eval/metrics.json").read_text())["valid"]

    export.run(params.load(export.SECTIONS, runs[True]))
    info = json.loads((tmp_path / "True/export/model/model.json").read_text())
    assert info["spec"]["segmentation"] is True
    parity = json.loads((tmp_path / "True/export/parity.json").read_text())
    assert 0 <= parity["max_mask_error"] <= parity["tolerance"]
    card = (tmp_path / "True/export/model/README.md").read_text()
    assert f"| valid (masks) | {metrics['segm']['AP']} | {metrics['segm']['AP50']} |" in card


def test_in_backward_recipe_trains_masks_without_a_skipped_update(tmp_path, shipped_params):
    """lean-in-backward with trainer.segmentation: true (the full fine-tune with masks on 12 GB cards):
    every mask loss finite, the mask head's weights move as with the stock optimizer, and no weight
    update skipped on a non-finite gradient (the trainer would warn on stderr, or stop)."""
    base = base_weights_with_mask_head(tmp_path / "base.pt")
    shipped_params["fetch"]["weights"] = str(tmp_path / "base.pt")
    path = workspace(tmp_path, shipped_params, max_epochs=1, segmentation=True, recipe="lean-in-backward")
    proc = train(path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    assert "skipped" not in err
    assert "optimizer: adamw_bf16_in_backward" in (tmp_path / "train/run/trainer_config.yaml").read_text()
    steps = tmp_path / "train/dvclive-steps/plots/metrics/step"
    for name in ("loss_mask", "loss_dice"):
        values = [float(r.split("\t")[-1]) for r in (steps / f"{name}.tsv").read_text().splitlines()[1:]]
        assert len(values) == 12 and all(math.isfinite(v) for v in values) and max(values) > 0, name
    trained = torch.load(tmp_path / "train/checkpoint.pt", weights_only=True)["model"]
    masks = [k for k in trained if k.startswith("segmentation_head.") and trained[k].is_floating_point()]
    unused = ("segmentation_head.pixel_decoder.conv_layers.2.", "segmentation_head.pixel_decoder.norms.2.")
    changed = [k for k in masks if not torch.equal(trained[k], base[k])]
    assert masks and changed == [k for k in masks if not k.startswith(unused)]


def test_segmentation_refuses_annotations_without_masks(tmp_path, shipped_params):
    """Before any compute: the file, the field and the ids are named."""
    import shutil

    from sam3ft.errors import DatasetError
    from sam3ft.stages import train as train_stage

    data = tmp_path / "data" / "boxes-only"
    shutil.copytree(REPO / "data" / "find-fuse-neutrals-v5", data)
    path = data / "train" / "_annotations.coco.json"
    coco = json.loads(path.read_text())
    del coco["annotations"][3]["segmentation"]
    path.write_text(json.dumps(coco))
    shipped_params["prepare"]["dataset"] = "boxes-only"
    params_path = workspace(tmp_path, shipped_params, data=tmp_path / "data", segmentation=True)
    with pytest.raises(DatasetError) as err:
        train_stage.run(params.load(train_stage.SECTIONS, params_path))
    prepared = tmp_path / "prepared" / "train" / "_annotations.coco.json"
    assert f"{prepared}: 1 annotation(s) have no 'segmentation'" in str(err.value)
    assert f"ids [{coco['annotations'][3]['id']}]" in str(err.value)
    assert "trainer.segmentation: false" in err.value.fix
    assert not (tmp_path / "scratch").exists()  # refused before the trainer's folder was made
