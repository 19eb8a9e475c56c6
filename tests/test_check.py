"""The check stage: params refused by name before any other stage runs; valid params write the same
bytes every time, so passing the check re-runs nothing."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, write_params
from sam3ft import params, preflight
from sam3ft.errors import ConfigError
from sam3ft.stages import check


def load(shipped_params, tmp_path):
    return params.load(check.SECTIONS, write_params(tmp_path / "params.yaml", shipped_params))


def test_valid_params_write_the_same_bytes(shipped_params, tmp_path):
    shipped_params["paths"]["check"] = str(tmp_path / "a" / "check.json")
    shipped_params["paths"]["data"] = str(REPO / "data")
    check.run(load(shipped_params, tmp_path))
    first = (tmp_path / "a" / "check.json").read_bytes()
    shipped_params["trainer"]["max_epochs"] = 40
    shipped_params["evaluate"]["threshold"] = 0.3
    check.run(load(shipped_params, tmp_path))
    assert (tmp_path / "a" / "check.json").read_bytes() == first
    assert json.loads(first) == {"passed": check.CHECKS}


def test_sam3_preset_on_the_cpu_is_refused_unless_asked_for(shipped_params, tmp_path):
    shipped_params["model"]["preset"] = "sam3"  # resolution, resize_min, amp, lr_scale follow it
    p = load(shipped_params, tmp_path)
    args = (p.model, p.trainer, p.launcher, preflight.preset_params("sam3"))
    with pytest.raises(
        ConfigError, match=r"model\.preset='sam3' \(840 M parameters\).*hours per step"
    ) as no_gpu:
        preflight.check_devices(*args, gpus=0)
    assert "no CUDA device" in no_gpu.value.fix and "trainer.allow_cpu: true" in no_gpu.value.fix
    with pytest.raises(ConfigError) as one_gpu:
        preflight.check_devices(*args, gpus=1)
    assert one_gpu.value.fix.startswith("this machine has 1 CUDA device(s): set trainer.num_gpus: 1")
    shipped_params["trainer"]["allow_cpu"] = True
    p = load(shipped_params, tmp_path)
    preflight.check_devices(p.model, p.trainer, p.launcher, 840e6, gpus=0)  # asked for: passes


def test_tiny_preset_on_the_cpu_passes(shipped_params, tmp_path):
    p = load(shipped_params, tmp_path)
    preflight.check_devices(p.model, p.trainer, p.launcher, preflight.preset_params("tiny"), gpus=0)


def test_resolution_other_than_the_presets_is_refused(shipped_params, tmp_path):
    shipped_params["trainer"]["resolution"] = 336
    with pytest.raises(ConfigError, match=r"trainer\.resolution=336 but preset 'tiny' is built for 224 px"):
        check.run(load(shipped_params, tmp_path))


def test_batch_no_epoch_can_fill_is_refused_from_the_export(shipped_params, tmp_path):
    """The bundled sample's train split has 24 images: batch 30 trains no step."""
    shipped_params["paths"]["data"] = str(REPO / "data")
    shipped_params["paths"]["check"] = str(tmp_path / "check.json")
    shipped_params["trainer"]["batch_size"] = 30
    with pytest.raises(ConfigError, match=r"has 24 training image\(s\)") as refused:
        check.run(load(shipped_params, tmp_path))
    assert refused.value.fix.startswith("set trainer.batch_size: 24 or less")
    assert not (tmp_path / "check.json").exists()


def test_the_move_to_sam3_is_two_values_and_refused_by_the_check_stage_on_a_cpu(shipped_params, tmp_path):
    """`dvc exp run -S model.preset=sam3 -S fetch.weights=hf://facebook/sam3` on a machine without
    CUDA: the check stage (before fetch) refuses it by the preset and the GPU count, not a resolution."""
    if preflight.visible_gpus():
        pytest.skip("needs a machine without CUDA devices")
    shipped_params["model"]["preset"] = "sam3"
    shipped_params["fetch"]["weights"] = "hf://facebook/sam3"
    shipped_params["paths"]["data"] = str(REPO / "data")
    shipped_params["paths"]["check"] = str(tmp_path / "check.json")
    with pytest.raises(
        ConfigError, match=r"model\.preset='sam3' \(840 M parameters\) with trainer\.num_gpus=0"
    ):
        check.run(load(shipped_params, tmp_path))
    assert not (tmp_path / "check.json").exists()
