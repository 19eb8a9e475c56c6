"""Comparing runs: a dozen decision metrics, curated charts that render offline, a short summary."""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO
from sam3ft.__main__ import main
from sam3ft.metrics.summary import compare_lines, decision_metrics, summary_lines

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
IMAGE_LEVEL = {"tp": 4, "fp": 0, "fn": 1, "tn": 0, "precision": 1.0, "recall": 0.8, "f1": 0.89}
SPLIT = {"AP": 0.1, "AP50": 0.5, "AP75": 0.0, "AR@100": 0.14, "AP_small": -1.0}
FULL = {  # evaluate's metrics.json, sorted keys as write_json leaves them
    "base": {"test": {**SPLIT, "AP": 0.0}, "valid": {**SPLIT, "AP50": 0.2}},
    "negatives": {"image_level": {**IMAGE_LEVEL, "tp": 0, "fn": 0, "fp": 1, "tn": 3, "specificity": 0.75}},
    "test": {**SPLIT, "image_level": {**IMAGE_LEVEL, "specificity": None}},
    "valid": {**SPLIT, "segm": {"AP": 0.3, "AP50": 0.6}, "image_level": {**IMAGE_LEVEL, "specificity": None}},
}


def flatten(data: dict, prefix: str = "") -> list[str]:
    """Column names as `dvc exp show` makes them: dotted paths to the leaves."""
    return [
        name
        for key, value in data.items()
        for name in (flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])
    ]


def test_decision_metrics_keep_the_few_numbers_valid_first():
    summary = decision_metrics(FULL, {"epoch": 6, "select": "AP50"})
    assert list(summary) == ["valid", "test", "negatives", "base", "epoch"]
    assert summary["valid"] == {"AP": 0.1, "AP50": 0.5, "mask_AP": 0.3, "precision": 1.0, "recall": 0.8}
    assert summary["negatives"] == {"specificity": 0.75}  # no objects: no AP, precision or recall
    assert summary["base"] == {"valid": {"AP": 0.1, "AP50": 0.2}, "test": {"AP": 0.0, "AP50": 0.5}}
    assert summary["epoch"] == 6
    assert "epoch" not in decision_metrics(FULL, None)
    assert len(flatten(summary)) <= 15


def test_shipped_metrics_give_at_most_fifteen_columns():
    full = json.loads((REPO / "artifacts/eval/metrics.json").read_text())
    columns = flatten(decision_metrics(full, {"epoch": 0}))
    assert columns[:4] == ["valid.AP", "valid.AP50", "valid.precision", "valid.recall"]
    assert len(columns) == len(set(columns)) <= 15


def test_summary_lines_are_few_and_short():
    lines = summary_lines(decision_metrics(FULL, {"epoch": 6}), 0.4)
    assert lines[0].startswith("valid    AP=0.100  AP50=0.500  mask_AP=0.300  precision=1.000  recall=0.800")
    assert lines[0].endswith("(base model: AP=0.100  AP50=0.200)")
    assert "score >= 0.4" in lines[-2] and lines[-1].startswith("checkpoint: epoch 6")
    assert len(lines) <= 6 and max(map(len, lines)) <= 120


def test_compare_outside_a_repository_names_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["compare"]) == 2
    assert "not in a DVC repository" in capsys.readouterr().err


def test_summary_command_reads_paths_eval(tmp_path, capsys):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval/summary.json").write_text(json.dumps(decision_metrics(FULL, {"epoch": 2})))
    (tmp_path / "eval/metrics.json").write_text(json.dumps({"valid": {"image_level": {"threshold": 0.4}}}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"paths": {"eval": str(tmp_path / "eval")}}))
    assert main(["summary", "--params", str(tmp_path / "params.yaml")]) == 0
    assert "score >= 0.4" in capsys.readouterr().out
    (tmp_path / "eval/summary.json").unlink()
    assert main(["summary", "--params", str(tmp_path / "params.yaml")]) == 2
    assert "summary.json does not exist" in capsys.readouterr().err


def test_one_metrics_file_and_no_stage_level_plots():
    metrics = [
        path for stage in DVC_YAML["stages"].values() for entry in stage.get("metrics", []) for path in entry
    ]
    assert metrics == ["${paths.eval}/summary.json"]
    assert not [name for name, stage in DVC_YAML["stages"].items() if "plots" in stage]
    assert len(DVC_YAML["plots"]) <= 12


def test_plots_page_renders_offline_with_the_curated_charts(tmp_path):
    """`dvc plots show` with the configured template: the libraries inlined, no external script."""
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc/config")
    template = REPO / ".dvc" / config["plots"]["html_template"]
    assert template.is_file() and template.stat().st_size < 2_000_000
    subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "-o", str(tmp_path)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    page = (tmp_path / "index.html").read_text()
    assert not re.search(r"<script[^>]+src=", page), "a <script src=...> needs the network"
    assert "cdn.jsdelivr" not in page
    assert page.count("<script>\n") == 3  # vega, vega-lite, vega-embed, inlined by the template
    titles = [next(iter(p)) for p in DVC_YAML["plots"] if isinstance(p, dict)]
    for title in titles:
        assert json.dumps(title) in page or title in page, title
    assert page.count("<img") >= 1  # the overlays


def test_compare_lines_show_metrics_and_only_the_params_that_differ():
    records = [
        {
            "Experiment": None,
            "rev": "workspace",
            "valid.AP": 0.1,
            "epoch": 6.0,
            "trainer.lr_scale": 1.0,
            "trainer.seed": 0.0,
            "artifacts/train/checkpoint.pt": "92e7",
        },
        {
            "Experiment": "lr-2",
            "rev": "2137b7d",
            "summary.json:valid.AP": 0.25,
            "epoch": 3.0,
            "trainer.lr_scale": 2.0,
            "trainer.seed": 0.0,
            "artifacts/train/checkpoint.pt": "d2e9",
        },
    ]
    header, workspace, lr2 = compare_lines(records, {"trainer.lr_scale", "trainer.seed"})
    assert header.split()[:3] == ["run", "valid", "AP"] and header.endswith("changed params")
    assert workspace.split() == ["workspace", "0.100", *["-"] * 7, "6", "trainer.lr_scale=1"]
    assert lr2.split() == ["lr-2", "0.250", *["-"] * 7, "3", "trainer.lr_scale=2"]


def test_compare_reads_experiments_through_dvc(tmp_path):
    """A two-stage toy pipeline writing summary.json, one `dvc exp run -S`: `sam3ft compare`
    prints HEAD and the experiment, the changed param and the metrics, within 160 columns."""
    script = "import json, yaml; s = yaml.safe_load(open('params.yaml'))['trainer']['lr_scale']\n"
    script += "json.dump({'valid': {'AP': s / 4, 'AP50': s / 2}, 'epoch': 3}, open('summary.json', 'w'))\n"
    (tmp_path / "fake.py").write_text(script)
    (tmp_path / "params.yaml").write_text("trainer:\n  lr_scale: 1.0\n  seed: 0\n")
    stage = {"cmd": "python fake.py", "deps": ["fake.py"], "params": ["trainer"]}
    stage["metrics"] = [{"summary.json": {"cache": False}}]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"eval": stage}}))
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env.update(GIT_COMMITTER_EMAIL="t@t", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    dvc = [sys.executable, "-m", "dvc"]
    for command in (
        ["git", "init", "-q"],
        [*dvc, "init", "-q"],
        [*dvc, "repro", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "toy"],
        [*dvc, "exp", "run", "-q", "-n", "lr-2", "-S", "trainer.lr_scale=2"],
    ):
        subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)
    listed = subprocess.run(
        [sys.executable, "-m", "sam3ft", "compare"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO / "src")},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in listed[1:]}
    assert rows["lr-2"][1:3] == ["0.500", "1.000"] and rows["lr-2"][-1] == "trainer.lr_scale=2"
    assert rows["workspace"][-1] == "trainer.lr_scale=2"  # exp run leaves its params in the workspace
    assert [r[1] for n, r in rows.items() if n not in ("workspace", "lr-2")] == ["0.250"]  # HEAD
    assert max(map(len, listed)) <= 160
