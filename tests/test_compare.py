"""Comparing runs: a dozen decision metrics, curated charts that render offline, a short summary."""

from __future__ import annotations

import configparser
import json
import re
import subprocess
import sys

import yaml

from conftest import REPO
from sam3ft.__main__ import main
from sam3ft.metrics.summary import decision_metrics, summary_lines

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
    assert lines[0].startswith("valid    AP 0.100  AP50 0.500  mask_AP 0.300  precision 1.000  recall 0.800")
    assert lines[0].endswith("(base model: AP 0.100  AP50 0.200)")
    assert "score >= 0.4" in lines[-2] and lines[-1].startswith("checkpoint: epoch 6")
    assert len(lines) <= 6 and max(map(len, lines)) <= 120


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
