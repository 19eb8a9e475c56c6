"""Best-epoch selection and early stopping: the rule on curves, the params checks, and the train
stage on CPU (the tracked checkpoint is the selected epoch's; an early stop killed with SIGKILL and
resumed gives the same bytes as the unbroken run)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import pytest
import torch

from conftest import REPO
from sam3ft import params
from sam3ft.errors import ConfigError
from sam3ft.train.select import metric_curve, select_epoch
from test_train import finish, sha, train, workspace


def test_ties_go_to_the_earliest_epoch_and_min_delta_must_be_beaten():
    curve = [(0, 0.1), (1, 0.3), (2, 0.3), (3, 0.2)]
    chosen = select_epoch(curve, min_delta=0.0, patience=0)
    assert (chosen.epoch, chosen.value, chosen.last_epoch, chosen.stop) == (1, 0.3, 3, False)
    assert select_epoch(curve, min_delta=0.2, patience=0).epoch == 0  # +0.2 is not more than 0.2
    assert select_epoch(curve, min_delta=0.19, patience=0).epoch == 1


def test_patience_counts_validated_epochs_since_the_best():
    curve = [(0, 0.1), (1, 0.5), (2, 0.4), (3, 0.45)]
    assert select_epoch(curve, 0.0, patience=2).stop
    assert not select_epoch(curve, 0.0, patience=3).stop
    assert not select_epoch(curve[:3], 0.0, patience=2).stop
    assert not select_epoch(curve, 0.0, patience=0).stop  # off


def test_metric_curve_reads_the_trainer_names():
    key = "Meters_train/val_valid/detection/coco_eval_bbox_"
    stats = [{"Trainer/epoch": 1, f"{key}AP_50": 0.2}, {"Trainer/epoch": 0, f"{key}AP_50": 0.4}]
    assert metric_curve(stats, "AP50") == [(0, 0.4), (1, 0.2)]
    with pytest.raises(KeyError, match="no AR@100"):
        metric_curve(stats, "AR@100")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"select": "mAP"}, "trainer.select='mAP' is invalid"),
        ({"val_epoch_freq": 2}, "1 while trainer.select is 'AP50'"),
        ({"select": "last", "patience": 3}, "trainer.patience=3 is invalid"),
        ({"min_delta": -0.1}, "trainer.min_delta"),
    ],
)
def test_bad_selection_settings_name_the_key(change, fragment):
    trainer = params.load(["trainer"], REPO / "params.yaml").trainer
    trainer = dataclasses.replace(trainer, select="AP50", val_epoch_freq=1, patience=0, min_delta=0.0)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        dataclasses.replace(trainer, **change)
    dataclasses.replace(trainer, select="last", val_epoch_freq=2)  # no selection: any frequency


# min_delta 1: no epoch can beat epoch 0 by more than a whole AP50 point, so epoch 0 is selected and
# patience 2 stops after epoch 2, whatever the curve. cooldown 0 keeps the learning rate of an epoch
# independent of max_epochs, so a 1-epoch run reproduces epoch 0 exactly. batch 6: 4 steps an epoch.
EARLY = {"select": "AP50", "min_delta": 1.0, "patience": 2, "max_epochs": 6, "checkpoint_freq": 1}
FAST = {"batch_size": 6, "warmup_steps": 2, "cooldown_steps": 0}


@pytest.mark.slow
def test_early_stop_tracks_the_selected_epoch_and_survives_a_kill(tmp_path, shipped_params):
    ref = workspace(tmp_path / "ref", json.loads(json.dumps(shipped_params)), **EARLY, **FAST)
    finish(train(ref))
    selection = json.loads((tmp_path / "ref/train/run/selection.json").read_text())
    assert selection == {
        "select": "AP50",
        "metric": "val/AP50",
        "epoch": 0,
        "value": selection["value"],
        "ties": "earliest",
        "min_delta": 1.0,
        "patience": 2,
        "max_epochs": 6,
        "epochs_trained": 3,
        "stopped_early": True,
        "weights": "regular",
        "ema_decay": 0.0,
    }
    assert len(json.loads((tmp_path / "ref/train/run/val_stats.json").read_text())) == 3
    assert torch.load(tmp_path / "ref/train/checkpoint.pt", weights_only=True)["epoch"] == 1

    # today's behaviour, one epoch long: the very checkpoint selected above
    last = workspace(
        tmp_path / "last", json.loads(json.dumps(shipped_params)), select="last", max_epochs=1, **FAST
    )
    finish(train(last))
    assert sha(tmp_path / "last/train/checkpoint.pt") == sha(tmp_path / "ref/train/checkpoint.pt")
    assert json.loads((tmp_path / "last/train/run/selection.json").read_text()) == {
        "select": "last",
        "metric": None,
        "epoch": 0,
        "value": None,
        "max_epochs": 1,
        "epochs_trained": 1,
        "stopped_early": False,
        "weights": "regular",
        "ema_decay": 0.0,
    }

    # killed after epoch 1's checkpoint: best.pt (epoch 0) and one epoch without improvement are
    # behind it; the resumed run must still stop after epoch 2 and track epoch 0
    cut = workspace(tmp_path / "cut", shipped_params, **EARLY, **FAST)
    proc = train(cut, start_new_session=True)
    checkpoints = tmp_path / "cut/scratch/train/checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (checkpoints / "checkpoint_2.pt").is_file():
        time.sleep(0.02)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (checkpoints / "best.pt").is_file()
    finish(train(cut))
    assert "Resuming training from" in (tmp_path / "cut/scratch/train/logs/log.txt").read_text()
    assert sha(tmp_path / "cut/train/checkpoint.pt") == sha(tmp_path / "ref/train/checkpoint.pt")
    for name in ("run/selection.json", "run/val_stats.json", "dvclive/metrics.json"):
        assert (tmp_path / "cut/train" / name).read_text() == (tmp_path / "ref/train" / name).read_text()
