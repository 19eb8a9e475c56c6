"""params.yaml: the shipped file validates, and each kind of bad value is named precisely."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, write_params
from sam3ft import params
from sam3ft.errors import ConfigError


def test_shipped_params_load_every_section():
    loaded = params.load(list(params.SECTIONS), REPO / "params.yaml")
    assert set(loaded.sections) == set(params.SECTIONS)
    assert loaded.trainer.resolution % 14 == 0
    assert isinstance(loaded.trainer.lr_scale, float)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("trainer", "max_epoch", 3, "unknown key(s) ['trainer.max_epoch']"),
        ("trainer", "max_epochs", "3", "trainer.max_epochs='3' has the wrong type"),
        ("trainer", "max_epochs", 0, "trainer.max_epochs=0 is invalid"),
        ("trainer", "batch_size", 0, "trainer.batch_size=0 is invalid"),
        ("trainer", "resolution", 225, "trainer.resolution=225 is invalid"),
        ("trainer", "resize_min", 448, "trainer.resize_min=448 is invalid"),
        ("trainer", "num_gpus", -1, "trainer.num_gpus=-1 is invalid"),
        ("trainer", "num_gpus", "all", "trainer.num_gpus='all' has the wrong type"),
        ("trainer", "num_nodes", 2, "trainer.num_nodes=2 is invalid"),
        ("launcher", "kind", "k8s", "launcher.kind='k8s' is invalid"),
        ("launcher", "partition", 3, "launcher.partition=3 has the wrong type"),
        ("trainer", "amp", True, "trainer.amp=True is invalid"),
        ("trainer", "lr_scale", True, "trainer.lr_scale=True has the wrong type"),
        ("base", "threads", 0, "base.threads=0 is invalid"),
        ("evaluate", "splits", [], "evaluate.splits=[] is invalid"),
        ("export", "dtype", "float16", "export.dtype='float16' is invalid"),
        (
            "prepare",
            "prompts",
            {"fuse neutrals": 3},
            "prepare.prompts={'fuse neutrals': 3} has the wrong type",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path, shipped_params, section, key, value, message):
    shipped_params[section][key] = value
    path = write_params(tmp_path / "params.yaml", shipped_params)
    with pytest.raises(ConfigError) as err:
        params.load(list(params.SECTIONS), path)
    assert message in str(err.value)
    assert err.value.fix


def test_missing_key_and_unknown_section(tmp_path, shipped_params):
    del shipped_params["trainer"]["max_epochs"]
    path = write_params(tmp_path / "params.yaml", shipped_params)
    with pytest.raises(ConfigError, match=r"missing key 'trainer.max_epochs'"):
        params.load(["trainer"], path)
    shipped_params["trainer"]["max_epochs"] = 1
    shipped_params["scratch"] = {"batch_size": 4}  # the pilot's silently ignored override
    path = write_params(tmp_path / "params.yaml", shipped_params)
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['scratch'\]"):
        params.load(["trainer"], path)


def test_integer_accepted_where_float_expected(tmp_path, shipped_params):
    shipped_params["trainer"]["lr_scale"] = 1
    path = write_params(tmp_path / "params.yaml", shipped_params)
    assert params.load(["trainer"], path).trainer.lr_scale == 1.0


def test_segmentation_is_accepted(tmp_path, shipped_params):
    shipped_params["trainer"]["segmentation"] = True
    path = write_params(tmp_path / "params.yaml", shipped_params)
    assert params.load(["trainer"], path).trainer.segmentation is True


@pytest.mark.parametrize(
    ("trainer", "fix"),
    [
        ({"compile_trunk": True}, "set those two false"),
        ({"compile_layers": True}, "set those two false"),
    ],
)
def test_compile_model_refuses_what_it_was_not_checked_with(tmp_path, shipped_params, trainer, fix):
    """The whole forward compiled replaces the compiled parts; the same settings without it load."""
    shipped_params["trainer"].update(trainer)
    path = write_params(tmp_path / "params.yaml", shipped_params)
    assert params.load(["trainer"], path).trainer.compile_model is False
    shipped_params["trainer"]["compile_model"] = True
    write_params(path, shipped_params)
    with pytest.raises(ConfigError, match=r"trainer\.compile_model=True is invalid") as err:
        params.load(["trainer"], path)
    assert err.value.fix is not None and fix in err.value.fix


def test_compile_model_loads_with_several_training_processes(tmp_path, shipped_params):
    """Compiled training under DDP (tests/test_ddp.py trains it with 2 processes)."""
    shipped_params["trainer"].update(compile_model=True, num_gpus=2, num_nodes=2)
    loaded = params.load(["trainer"], write_params(tmp_path / "params.yaml", shipped_params)).trainer
    assert loaded.compile_model is True and loaded.world_size == 4


def test_a_stage_run_on_another_params_file_names_that_file(tmp_path, capsys):
    """`sam3ft stage train --params gpu.yaml`: the error names gpu.yaml, not params.yaml."""
    from sam3ft.__main__ import main as cli

    data = params.read_params(REPO / "params.yaml")
    data["trainer"]["batch_size"] = 0
    path = write_params(tmp_path / "gpu.yaml", data)
    with pytest.raises(SystemExit) as exit_:
        cli(["stage", "train", "--params", str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"[train] error: {path}: trainer.batch_size=0 is invalid" in err and "params.yaml" not in err


def test_in_file_names_the_params_file_for_params_values_only():
    """Errors about a params value carry the key; the file name is put in front where they are printed."""
    error = ConfigError("trainer.batch_size=0 is invalid", fix="use >= 1", key="trainer.batch_size")
    assert params.in_file(error, params.DEFAULT_PARAMS) == "params.yaml: trainer.batch_size=0 is invalid"
    assert params.in_file(error, Path("runs/gpu.yaml")) == "runs/gpu.yaml: trainer.batch_size=0 is invalid"
    other = ConfigError("model preset 'x' not found", fix="use tiny")
    assert params.in_file(other, Path("gpu.yaml")) == "model preset 'x' not found"


def test_a_section_the_stage_did_not_load_is_a_key_error():
    loaded = params.load(["paths", "trainer"], REPO / "params.yaml")
    assert loaded.trainer.batch_size >= 1
    with pytest.raises(KeyError, match="'export' was not loaded"):
        _ = loaded.export


def load_trainer(tmp_path: Path, data: dict) -> params.Trainer:
    return params.load(["trainer"], write_params(tmp_path / "params.yaml", data)).trainer


def test_shipped_trainer_follows_the_tiny_preset(tmp_path, shipped_params):
    """null resolution, resize_min, amp, lr_scale and num_gpus: auto resolve to the tiny preset's
    values and this machine's GPUs (0 on a CPU machine: the values the pipeline was locked with)."""
    assert all(shipped_params["trainer"][k] is None for k in params.PRESET_KEYS)
    assert shipped_params["trainer"]["num_gpus"] == "auto"
    trainer = load_trainer(tmp_path, shipped_params)
    gpus = params.visible_gpus()
    assert (trainer.resolution, trainer.resize_min, trainer.lr_scale, trainer.num_gpus) == (
        224,
        160,
        1.0,
        gpus,
    )
    assert trainer.amp is False


@pytest.mark.parametrize(("num_gpus", "amp"), [(0, False), (1, True)])
def test_sam3_preset_brings_its_training_defaults(tmp_path, shipped_params, num_gpus, amp):
    """model.preset: sam3 alone sets 1008 px, resize from 480, lr_scale 0.1 and, on a GPU, autocast."""
    shipped_params["model"]["preset"] = "sam3"
    shipped_params["trainer"]["num_gpus"] = num_gpus
    trainer = load_trainer(tmp_path, shipped_params)
    assert (trainer.resolution, trainer.resize_min, trainer.lr_scale, trainer.amp) == (1008, 480, 0.1, amp)


def test_values_set_in_params_beat_the_preset(tmp_path, shipped_params):
    shipped_params["model"]["preset"] = "sam3"
    shipped_params["trainer"].update(num_gpus=1, resize_min=336, lr_scale=0.5, amp=False)
    trainer = load_trainer(tmp_path, shipped_params)
    assert (trainer.resolution, trainer.resize_min, trainer.lr_scale, trainer.amp) == (1008, 336, 0.5, False)


def test_a_preset_without_a_value_for_a_null_key_names_both(tmp_path, shipped_params, monkeypatch):
    from sam3ft.model import spec

    (tmp_path / "bare.yaml").write_text(
        spec.presets_dir().joinpath("tiny.yaml").read_text().split("train:")[0]
    )
    monkeypatch.setattr(spec, "presets_dir", lambda: tmp_path)
    shipped_params["model"]["preset"] = "bare"
    with pytest.raises(
        ConfigError, match=r"trainer\.resize_min is null \(= the preset's\), but preset 'bare'"
    ) as err:
        load_trainer(tmp_path, shipped_params)
    assert err.value.key == "trainer.resize_min" and "configs/model/bare.yaml" in (err.value.fix or "")
    shipped_params["trainer"].update(resize_min=160, amp=False, lr_scale=1.0, o2m_weight=0.0)
    assert load_trainer(tmp_path, shipped_params).resolution == 224  # the image size: always known


def test_auto_gpus_with_slurm_is_refused(tmp_path, shipped_params):
    shipped_params["launcher"]["kind"] = "slurm"
    with pytest.raises(ConfigError, match=r"trainer\.num_gpus=auto counts the GPUs of this machine"):
        load_trainer(tmp_path, shipped_params)
