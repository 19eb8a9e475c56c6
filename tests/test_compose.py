"""The trainer config: shipped files compose, and no params value can be silently ignored."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO, recipe_trainer
from sam3ft import params
from sam3ft.errors import ConfigError
from sam3ft.model.spec import load_preset, presets_dir
from sam3ft.stages.train import config_name, trainer_knobs
from sam3ft.train.compose import compose_trainer_config, config_dir, resolved_yaml


def knobs_for(p: dict) -> dict:
    spec = load_preset(p.model.preset).with_mask_head(p.trainer.segmentation)
    manifest = {"weights": {"source": "none"}, "min_loaded": 0.95}
    base, prepared, scratch = Path("artifacts/base"), Path(p.paths.prepared), Path(".work/train")
    return trainer_knobs(p, spec, manifest, base, prepared, scratch, train_images=24)


# Trainer's defaults for the recipe keys (upstream's recipe)
DEFAULTS = {
    f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    for f in dataclasses.fields(params.Trainer)
    if f.name in params.RECIPE_KEYS
}


@pytest.fixture
def loaded():
    return params.load(list(params.SECTIONS), REPO / "params.yaml")


def test_every_model_preset_loads():
    names = sorted(p.stem for p in presets_dir().glob("*.yaml"))
    assert {"tiny", "sam3"} <= set(names)
    for name in names:
        spec = load_preset(name)
        assert spec.name == name and spec.image_size % 14 == 0


def test_shipped_config_composes_with_shipped_params(loaded):
    cfg = compose_trainer_config(knobs_for(loaded))
    text = resolved_yaml(cfg)
    trainer = cfg.trainer
    assert trainer.max_epochs == loaded.trainer.max_epochs
    assert trainer.data.train.batch_size == loaded.trainer.batch_size
    assert trainer.skip_saving_ckpts is False  # upstream's default would save nothing
    assert "???" not in text


def test_every_trainer_param_changes_the_composed_config(loaded):
    """No knob is dead: perturbing any one trainer value changes the resolved trainer config."""
    baseline = resolved_yaml(compose_trainer_config(knobs_for(loaded)).trainer)
    # GPUs and amp cannot be switched on here (validated); the dead-knob check proves the trainer
    # reads amp; num_gpus/num_nodes go to the launcher (tests/test_launch.py), allow_cpu to the
    # pre-flight (tests/test_check.py)
    changed = {"num_gpus": None, "num_nodes": None, "amp": None, "allow_cpu": None}
    for field in dataclasses.fields(params.Trainer):
        value = getattr(loaded.trainer, field.name)
        if field.name in changed:
            continue
        base = loaded.trainer
        if field.name == "amp_dtype":
            new = "float16"
        elif field.name == "optimizer":
            new = "adamw_bf16"
        elif field.name == "select":
            new = "last" if value != "last" else "AP"
        elif field.name == "min_delta":
            new = value + 0.01
        elif field.name in ("ema_decay", "o2m_weight"):  # 0 by default: halving changes nothing
            new = 0.9 if value == 0 else 0.0
        elif field.name in ("recipe", "lora_rank", "lora_alpha"):
            # a recipe's values are checked to reach the config in test_every_recipe_composes; LoRA
            # needs the trunk frozen, so perturb it on top of the lora recipe
            if field.name == "recipe":
                continue
            base = dataclasses.replace(base, trainable=["neck", "heads"], lora_rank=4)
            baseline_lora = resolved_yaml(
                compose_trainer_config(knobs_for(loaded.replace(trainer=base))).trainer
            )
            value = getattr(base, field.name)
            new = value + 1 if field.name == "lora_rank" else value * 0.5
            perturbed = loaded.replace(trainer=dataclasses.replace(base, **{field.name: new}))
            other = resolved_yaml(compose_trainer_config(knobs_for(perturbed)).trainer)
            assert other != baseline_lora, f"trainer.{field.name} does not reach the trainer config"
            continue
        elif field.name == "weight_dtype":  # bfloat16 needs bf16 autocast, so a GPU run's params
            base = dataclasses.replace(base, num_gpus=1, amp=True, optimizer="adamw_bf16")
            gpu = resolved_yaml(compose_trainer_config(knobs_for(loaded.replace(trainer=base))).trainer)
            perturbed = loaded.replace(trainer=dataclasses.replace(base, weight_dtype="bfloat16"))
            other = resolved_yaml(compose_trainer_config(knobs_for(perturbed)).trainer)
            assert other != gpu, "trainer.weight_dtype does not reach the trainer config"
            continue
        elif field.name == "val_epoch_freq":  # more than 1 only without best-epoch selection
            base = dataclasses.replace(base, select="last")
            last = loaded.replace(trainer=base)
            baseline_last = resolved_yaml(compose_trainer_config(knobs_for(last)).trainer)
            perturbed = loaded.replace(trainer=dataclasses.replace(base, val_epoch_freq=value + 1))
            other = resolved_yaml(compose_trainer_config(knobs_for(perturbed)).trainer)
            assert other != baseline_last, "trainer.val_epoch_freq does not reach the trainer config"
            continue
        elif field.name == "resolution":
            continue  # tied to the preset; covered by test_resolution_must_match_preset
        elif isinstance(value, list):
            new = value[:-1]
        elif isinstance(value, bool):
            new = not value
        elif isinstance(value, int):
            new = value + 1 if field.name != "resize_min" else value - 32
        else:
            new = value * 0.5
        perturbed = loaded.replace(trainer=dataclasses.replace(base, **{field.name: new}))
        name = config_name(perturbed.trainer.segmentation)
        other = resolved_yaml(compose_trainer_config(knobs_for(perturbed), name=name).trainer)
        assert other != baseline, f"trainer.{field.name} does not reach the trainer config"
    seeded = loaded.replace(base=dataclasses.replace(loaded.base, seed=loaded.base.seed + 1))
    assert resolved_yaml(compose_trainer_config(knobs_for(seeded)).trainer) != baseline


def test_every_augment_param_changes_the_composed_config(loaded):
    """No augment knob is dead: switching any one on (or up) changes the resolved trainer config."""
    baseline = resolved_yaml(compose_trainer_config(knobs_for(loaded)).trainer)
    for field in dataclasses.fields(params.Augment):
        value = getattr(loaded.augment, field.name)
        new = value * 0.5 if field.name == "crop_min" else value + 0.1
        perturbed = loaded.replace(augment=dataclasses.replace(loaded.augment, **{field.name: new}))
        other = resolved_yaml(compose_trainer_config(knobs_for(perturbed)).trainer)
        assert other != baseline, f"augment.{field.name} does not reach the trainer config"


def test_resolution_must_match_preset(loaded):
    bad = loaded.replace(trainer=dataclasses.replace(loaded.trainer, resolution=336))
    with pytest.raises(ConfigError, match="built for 224 px"):
        knobs_for(bad)


def _config_copy(tmp_path: Path, edit) -> Path:
    directory = tmp_path / "train"
    shutil.copytree(config_dir(), directory)
    path = directory / "sam3ft.yaml"
    path.write_text(edit(path.read_text()))
    return directory


def test_unknown_knob_is_rejected(loaded):
    with pytest.raises(ConfigError, match=r"no knob\(s\) \['batch_sizes'\]"):
        compose_trainer_config({**knobs_for(loaded), "batch_sizes": 4})


def test_unset_knob_is_rejected(loaded):
    knobs = knobs_for(loaded)
    del knobs["max_epochs"]
    with pytest.raises(ConfigError, match=r"\['max_epochs'\] left unset"):
        compose_trainer_config(knobs)


def test_knob_nobody_reads_is_rejected(tmp_path, loaded):
    directory = _config_copy(tmp_path, lambda t: t.replace("knobs:\n", "knobs:\n  unused: ???\n", 1))
    with pytest.raises(ConfigError, match=r"\['unused'\] are never read"):
        compose_trainer_config({**knobs_for(loaded), "unused": 1}, directory)


def test_knob_read_only_outside_trainer_is_dead(tmp_path, loaded):
    """A knob referenced by a node the trainer never reaches is as dead as an unreferenced one."""
    directory = _config_copy(
        tmp_path, lambda t: t.replace("  max_epochs: ${knobs.max_epochs}\n", "  max_epochs: 3\n")
    )
    text = (directory / "sam3ft.yaml").read_text()
    (directory / "sam3ft.yaml").write_text(text + "\nnotes:\n  epochs: ${knobs.max_epochs}\n")
    with pytest.raises(ConfigError, match=r"\['max_epochs'\] are never read"):
        compose_trainer_config(knobs_for(loaded), directory)


def test_paths_in_the_config_are_relative(loaded):
    """The resolved config is a tracked output: absolute paths would change its hash per clone."""
    text = resolved_yaml(compose_trainer_config(knobs_for(loaded)))
    assert str(REPO) not in text
    assert yaml.safe_load(text)["trainer"]["data"]["train"]["dataset"]["img_folder"].startswith("artifacts/")


@pytest.mark.parametrize("name", params.recipes())
def test_every_recipe_composes(loaded, name):
    """Each shipped recipe lists only what differs from the defaults (upstream's recipe), fills the
    keys params.yaml leaves null, and they reach the trainer config."""
    data = params.read_params(REPO / "params.yaml")
    assert all(data["trainer"][k] is None for k in params.CHOSEN_RECIPE_KEYS)  # the recipe decides by default
    assert not set(params.SWITCH_KEYS) & set(data["trainer"])  # recipe-only: not a user's choice
    trainer = recipe_trainer(name, "tiny")
    recipe = params.load_recipe(name)
    defaults = params.Trainer(
        **{**dataclasses.asdict(trainer), **{k: DEFAULTS[k] for k in params.RECIPE_KEYS}}
    )
    assert all(recipe[k] != getattr(defaults, k) for k in recipe), f"{name}.yaml repeats a default"
    assert {k: getattr(trainer, k) for k in params.RECIPE_KEYS} == {
        **{k: getattr(defaults, k) for k in params.RECIPE_KEYS},
        **recipe,
    }
    cfg = compose_trainer_config(knobs_for(loaded.replace(trainer=trainer))).trainer
    assert cfg.optim.optimizer.kind == trainer.optimizer
    assert cfg.model.trainable == trainer.trainable and cfg.model.lora_rank == trainer.lora_rank
    assert cfg.model.weight_dtype == trainer.weight_dtype


def test_stock_is_the_defaults():
    assert params.load_recipe("stock") == {}


def test_explicit_params_beat_the_recipe():
    data = params.read_params(REPO / "params.yaml")
    trainer = params.section_from_dict(
        params.Trainer,
        dict(data["trainer"], recipe="lora", lora_rank=4, optimizer="adamw"),
        "trainer",
        "tiny",
    )
    assert (trainer.lora_rank, trainer.optimizer, trainer.lora_alpha) == (4, "adamw", 32.0)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"recipe": "nope"}, "trainer.recipe='nope' has no file"),
        ({"optimizer": "sgd"}, "trainer.optimizer='sgd' is invalid"),
        ({"lora_rank": 8, "trainable": ["trunk", "heads"]}, "LoRA adapts a frozen trunk"),
        ({"lora_rank": -1}, "trainer.lora_rank=-1 is invalid"),
    ],
)
def test_bad_recipe_settings_name_the_key(change, fragment):
    data = params.read_params(REPO / "params.yaml")
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        params.section_from_dict(params.Trainer, dict(data["trainer"], **change), "trainer", "tiny")


def test_recipe_file_with_wrong_keys_is_named(tmp_path, monkeypatch):
    (tmp_path / "odd.yaml").write_text("optimizer: adamw\nbatch_size: 4\n")  # batch_size: no recipe key
    monkeypatch.setattr(params, "recipes_dir", lambda: tmp_path)
    with pytest.raises(ConfigError, match=r"odd\.yaml: keys"):
        params.load_recipe("odd")


def test_segmentation_adds_mask_losses_masks_group_and_train_masks_only(loaded):
    """trainer.segmentation: true composes sam3ft_masks.yaml: upstream's mask losses, the "masks"
    group trainable, a mask head on tiny, masks loaded for the train split only (validation with masks
    breaks sam3's resize, sam3/train/transforms/basic_for_api.py:213)."""
    boxes = compose_trainer_config(knobs_for(loaded))
    seg = loaded.replace(trainer=dataclasses.replace(loaded.trainer, segmentation=True))
    masks = compose_trainer_config(knobs_for(seg), name=config_name(True))
    box_losses = OmegaConf.to_container(boxes.loss.loss_fns_find, resolve=True)
    mask_losses = OmegaConf.to_container(masks.loss.loss_fns_find, resolve=True)
    assert mask_losses[:2] == box_losses  # the repeated box losses have not drifted from sam3ft.yaml
    assert mask_losses[2]["_target_"] == "sam3.train.loss.loss_fns.Masks"
    assert mask_losses[2]["weight_dict"] == {"loss_mask": 20.0, "loss_dice": 1.0}
    assert boxes.loss.loss_fn_semantic_seg is None
    semantic = masks.loss.loss_fn_semantic_seg
    assert semantic.weight_dict == {"loss_semantic_seg": 0.1, "loss_semantic_dice": 1.0}
    train, val = masks.trainer.data.train, masks.trainer.data.val
    assert (train.dataset.load_segmentation, train.collate_fn.with_seg_masks) == (True, True)
    assert (val.dataset.load_segmentation, val.collate_fn.with_seg_masks) == (False, False)
    assert masks.trainer.model.segmentation is True and "segmentation" not in boxes.trainer.model
    assert list(masks.trainer.model.trainable) == [*loaded.trainer.trainable, "masks"]
    assert list(boxes.trainer.model.trainable) == list(loaded.trainer.trainable)
    assert "Masks" not in resolved_yaml(boxes)  # the box-only config is untouched
