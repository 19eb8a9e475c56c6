"""The zero-shot baseline: the base model is the trainer's starting model, scored exactly as
evaluate scores the fine-tuned one, and evaluate puts it beside the fine-tuned numbers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, write_params
from sam3ft import params
from sam3ft.errors import ConfigError
from sam3ft.layout import BASE_BLOCK, CHECKPOINT, METRICS_FILE, SPEC_FILE, SUMMARY_FILE, VOCAB_NAME
from sam3ft.metrics.summary import decision_metrics
from sam3ft.model.load import load_base
from sam3ft.stages import baseline, evaluate, fetch, prepare
from sam3ft.stages.evaluate import read_base_metrics, worse_than_base


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Shipped params with every path in a temporary folder, valid the only split scored; fetch
    (`weights: none`) and prepare done."""
    tmp = tmp_path_factory.mktemp("baseline")
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    for key in ("base", "prepared", "train", "baseline", "eval", "export", "scratch"):
        shipped["paths"][key] = str(tmp / key)
    shipped["paths"]["data"] = str(REPO / "data")
    shipped["evaluate"]["splits"] = ["valid"]
    path = write_params(tmp / "params.yaml", shipped)
    fetch.run(params.load(fetch.SECTIONS, path))
    prepare.run(params.load(prepare.SECTIONS, path))
    return path


def trainer_start(base_dir: Path, seed: int, max_epochs: int) -> dict[str, torch.Tensor]:
    """The model state the train stage starts from with `fetch.weights: none`: sam3's trainer seeds
    (`set_seeds`, rank 0) and then instantiates the model config's `build_trainable_model`, whose
    `init_seed` is base.seed."""
    from sam3.train.utils.train_utils import set_seeds

    from sam3ft.train.model import GROUPS, build_trainable_model

    set_seeds(seed, max_epochs, 0)
    model = build_trainable_model(
        str(base_dir / SPEC_FILE), str(base_dir / VOCAB_NAME), list(GROUPS), init_seed=seed
    )
    return model.state_dict()


@pytest.mark.parametrize("seed", [0, 3])
def test_the_base_is_the_trainers_seeded_init(workspace, seed):
    """For every base.seed, whatever trainer.max_epochs (sam3 seeds its processes with both)."""
    p = params.load(["paths", "base", "trainer"], workspace)
    base_dir = Path(p.paths.base)
    started = trainer_start(base_dir, seed, p.trainer.max_epochs)
    loaded = load_base(base_dir, seed)[0].state_dict()
    assert list(loaded) == list(started)
    assert all(torch.equal(loaded[k], started[k]) for k in started)
    other = load_base(base_dir, seed + 1)[0].state_dict()
    assert not all(torch.equal(other[k], started[k]) for k in started)  # the seed matters


def test_evaluate_puts_the_base_beside_the_fine_tuned_and_warns_when_below(workspace):
    """A "fine-tuned" checkpoint that is the trainer's seeded init scores exactly what baseline
    scored the base at; with the base's valid AP50 raised, evaluate warns naming split and metric."""
    p = params.load(["paths", "base", "trainer"], workspace)
    baseline.run(params.load(baseline.SECTIONS, workspace))
    base_file = Path(p.paths.baseline) / METRICS_FILE
    base = json.loads(base_file.read_text())
    assert list(base) == ["valid"] and {"AP", "AP50", "image_level"} <= set(base["valid"])

    checkpoint = Path(p.paths.train) / CHECKPOINT
    checkpoint.parent.mkdir(parents=True)
    start = trainer_start(Path(p.paths.base), p.base.seed, p.trainer.max_epochs)
    torch.save({"model": start}, checkpoint)
    raised = {"valid": {**base["valid"], "AP50": base["valid"]["AP50"] + 0.25}}
    base_file.write_text(json.dumps(raised))
    # a handler on the stage's own logger, not caplog's on the root: a process that ran sam3's
    # trainer before has another logging.root (sam3/train/utils/logger.py:231)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("sam3ft.stages.evaluate")
    logger.addHandler(handler)
    try:
        evaluate.run(params.load(evaluate.SECTIONS, workspace))
    finally:
        logger.removeHandler(handler)

    metrics = json.loads((Path(p.paths.eval) / METRICS_FILE).read_text())
    assert set(metrics) == {"valid", BASE_BLOCK}
    assert metrics["valid"] == base["valid"]  # the same model, the same code: the same numbers
    assert metrics[BASE_BLOCK] == raised
    assert set(metrics[BASE_BLOCK]["valid"]) == set(metrics["valid"])
    summary = json.loads((Path(p.paths.eval) / SUMMARY_FILE).read_text())
    assert json.loads((Path(p.paths.eval) / "plots/selected_epoch.json").read_text()) == []
    assert summary == decision_metrics(metrics, None)  # no train run record here: no epoch
    assert (
        list(summary) == ["valid", BASE_BLOCK]
        and summary[BASE_BLOCK]["valid"]["AP50"] == raised["valid"]["AP50"]
    )
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert warnings == worse_than_base(metrics, raised)
    assert len(warnings) == 1 and warnings[0].startswith("valid AP50: the fine-tuned model")


def test_worse_than_base_names_split_and_metric():
    tuned = {"valid": {"AP": 0.30, "AP50": 0.50}, "test": {"AP": 0.0, "AP50": 0.0}}
    base = {"valid": {"AP": 0.35, "AP50": 0.50}, "test": {"AP": 0.9, "AP50": 0.9}}
    (line,) = worse_than_base(tuned, base)  # AP50 equal: no warning; test: not watched
    assert (
        line == "valid AP: the fine-tuned model (0.3) is below the base model (0.35): training made it worse"
    )
    assert len(worse_than_base(tuned, base, split="test")) == 2
    assert worse_than_base({"test": tuned["test"]}, base) == []  # valid not evaluated


def test_base_metrics_of_other_splits_are_refused(tmp_path):
    (tmp_path / METRICS_FILE).write_text(json.dumps({"valid": {"AP": 0.0}}))
    with pytest.raises(ConfigError, match=r"on \['valid'\], evaluate.splits gives \['test', 'valid'\]"):
        read_base_metrics(tmp_path, ["valid", "test"])
    (tmp_path / METRICS_FILE).write_text(json.dumps({"valid": {}, "test": {}}))  # sorted keys
    assert read_base_metrics(tmp_path, ["valid", "test"]) == {"valid": {}, "test": {}}
    assert read_base_metrics(tmp_path / "missing", ["valid"]) is None


def test_baseline_stage_reads_no_trainer_params():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert not any(p.split(".")[0] == "trainer" for p in stages["baseline"]["params"])
    assert "${paths.baseline}/metrics.json" in stages["evaluate"]["deps"]
    assert "${paths.baseline}" in stages["baseline"]["outs"]
    assert not any("baseline" in d for d in stages["train"]["deps"])
