"""End to end: a copy of this repo, offline, `dvc pull data.dvc && dvc repro`, then an experiment.

Runs the real pipeline (sam3's Trainer on the tiny preset, CPU) once for the whole module, with
fake secrets planted in the environment; each test then checks one promise on the result.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, checkout_copy

pytestmark = pytest.mark.slow

FAKE_SECRETS = {
    "HF_TOKEN": "hf_FAKEtokenSHOULDneverAPPEAR0123456789",
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID0123456",
    "AWS_SECRET_ACCESS_KEY": "fakeSecretAccessKeyThatMustNotLeak0123456789",
}


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    repo = tmp_path_factory.mktemp("clone")
    env = checkout_copy(repo, FAKE_SECRETS)
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "pull", "data.dvc"], repo, env)
    start = time.monotonic()
    repro = run([*dvc, "repro"], repo, env)
    return {"repo": repo, "env": env, "dvc": dvc, "repro": repro, "seconds": time.monotonic() - start}


def test_repro_runs_every_stage_within_five_minutes(pipeline):
    out = pipeline["repro"].stdout
    for stage in ("fetch", "prepare", "train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in out
    assert pipeline["seconds"] < 300


def test_fresh_run_reproduces_committed_lock_byte_for_byte(pipeline):
    """Same params, same data, same code: every hash in dvc.lock (checkpoint, metrics) is equal."""
    assert (pipeline["repo"] / "dvc.lock").read_text() == (REPO / "dvc.lock").read_text()
    committed = json.loads((REPO / "artifacts/eval/metrics.json").read_text())
    assert json.loads((pipeline["repo"] / "artifacts/eval/metrics.json").read_text()) == committed


def test_metrics_cover_valid_and_test(pipeline):
    metrics = json.loads((pipeline["repo"] / "artifacts/eval/metrics.json").read_text())
    assert set(metrics) == {"valid", "test"}
    for split in metrics.values():
        assert {"AP", "AP50", "AP75", "AR@1", "AR@10", "AR@100"} <= set(split)
        assert all(-1.0 <= v <= 1.0 for k, v in split.items() if k != "image_level")
        image_level = split["image_level"]
        assert image_level["tp"] + image_level["fn"] + image_level["fp"] + image_level["tn"] in (5, 6)
        assert 0.0 <= image_level["precision"] <= 1.0 and image_level["threshold"] == 0.4
    shown = run([*pipeline["dvc"], "metrics", "show", "--json"], pipeline["repo"], pipeline["env"]).stdout
    assert '"valid"' in shown and '"AP50"' in shown


def test_trainer_validation_matches_evaluate_on_valid(pipeline):
    """Two independent paths, sam3's in-trainer COCO evaluator and our predictor + pycocotools,
    agree on the final model's validation AP."""
    repo = pipeline["repo"]
    live = json.loads((repo / "artifacts/train/dvclive/metrics.json").read_text())
    ours = json.loads((repo / "artifacts/eval/metrics.json").read_text())["valid"]
    assert live["val"]["AP"] == pytest.approx(ours["AP"], abs=1e-4)
    assert live["val"]["AP50"] == pytest.approx(ours["AP50"], abs=1e-4)


def test_status_clean_and_second_repro_is_a_noop(pipeline):
    repo, env, dvc = pipeline["repo"], pipeline["env"], pipeline["dvc"]
    assert "up to date" in run([*dvc, "status"], repo, env).stdout
    start = time.monotonic()
    again = run([*dvc, "repro"], repo, env).stdout
    assert "Running stage" not in again
    assert time.monotonic() - start < 30


def test_no_secret_reaches_any_output(pipeline):
    repo = pipeline["repo"]
    leaks = []
    for path in repo.rglob("*"):
        skip = {".git", "tests"} & set(path.relative_to(repo).parts)  # tests/ holds the fake values
        if path.is_file() and not skip and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            leaks += [f"{path.relative_to(repo)}: {k}" for k, v in FAKE_SECRETS.items() if v.encode() in data]
    assert not leaks
    log = (repo / ".work/train/logs/log.txt").read_text()
    assert "HF_TOKEN" in log  # the trainer's env dump now lists names only


def test_export_is_bf16_and_within_tolerance(pipeline):
    """The stage itself fails unless the reload is exact; here: the bf16 rounding stays small."""
    parity = json.loads((pipeline["repo"] / "artifacts/export/parity.json").read_text())
    assert 0.0 < parity["max_score_error"] <= parity["tolerance"] == 0.05
    assert parity["max_box_error"] <= 0.05 and parity["images"] == 5
    model = json.loads((pipeline["repo"] / "artifacts/export/model/model.json").read_text())
    assert model["spec"]["name"] == "tiny" and model["prompts"] == {"1": "fuse neutrals"}
    assert model["dtype"] == "bfloat16" and model["weights"] == "model.safetensors"
    assert (pipeline["repo"] / "artifacts/export/model/README.md").is_file()


def test_exp_run_max_epochs_is_honoured(pipeline):
    """The pilot's silently ignored `max_epochs` override: here the trainer runs exactly 2 epochs."""
    repo, env, dvc = pipeline["repo"], pipeline["env"], pipeline["dvc"]
    run([*dvc, "exp", "run", "-S", "trainer.max_epochs=2"], repo, env)
    stats = json.loads((repo / "artifacts/train/run/train_stats.json").read_text())
    assert [s["Trainer/epoch"] for s in stats] == [0, 1]
    loss_rows = (repo / "artifacts/train/dvclive/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(loss_rows) == 1 + 2  # header + one row per epoch
    recorded = yaml.safe_load((repo / "artifacts/train/run/trainer_config.yaml").read_text())
    assert recorded["trainer"]["max_epochs"] == 2
    diff = run([*dvc, "metrics", "diff", "--json"], repo, env).stdout
    changed = json.loads(diff)["artifacts/train/dvclive/metrics.json"]
    assert changed["step"]["old"] == 11 and changed["step"]["new"] == 1
    shown = run([*dvc, "exp", "show", "--json"], repo, env).stdout
    assert "max_epochs" in shown
