"""dvc.yaml declares exactly what each stage reads: its code's import closure and its params."""

from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import LOCK_CPU, REPO
from sam3ft import params

SRC = REPO / "src"
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]


def module_file(name: str) -> Path:
    path = SRC / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_modules(path: Path) -> set[str]:
    """sam3ft modules imported anywhere in a file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sam3ft"):
            found.add(node.module)
            for alias in node.names:  # `from sam3ft import compat` imports a module
                if module_file(f"{node.module}.{alias.name}").exists():
                    found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sam3ft")}
    return found


def closure(module: str) -> set[Path]:
    files: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path in files:
            continue
        files.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]  # parent packages run too
        todo += sorted(imported_modules(path))
    return {f for f in files if f != SRC / "sam3ft" / "__init__.py"}


def hydra_targets(config_dir: Path) -> set[str]:
    """sam3ft modules that hydra instantiates from a config folder (`_target_: sam3ft.x.func`)."""
    found = set()
    for path in config_dir.rglob("*.yaml"):
        for match in re.finditer(r"_target_:\s*(sam3ft[\w.]*)\.\w+", path.read_text()):
            found.add(match.group(1))
    return found


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_its_imports(stage):
    module = STAGES[stage]["cmd"].split("-m ", 1)[1].split()[0]
    deps = [REPO / d for d in STAGES[stage]["deps"] if d.startswith("src/")]
    files = closure(module)
    for config in (d for d in STAGES[stage]["deps"] if d.startswith("configs/")):
        for target in hydra_targets(REPO / config):
            files |= closure(target)
    uncovered = [
        f.relative_to(REPO).as_posix() for f in files if not any(f == d or d in f.parents for d in deps)
    ]
    assert not uncovered, f"stage {stage} imports files dvc.yaml does not list: {uncovered}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_params_match_what_it_loads(stage):
    module = importlib.import_module(STAGES[stage]["cmd"].split("-m ", 1)[1].split()[0])
    declared = {p.split(".")[0] for p in STAGES[stage]["params"]}
    assert declared == set(module.SECTIONS), f"{stage}: dvc.yaml params {declared} vs code {module.SECTIONS}"


def test_every_stage_runs_after_the_check():
    """The check stage comes first: DVC deletes outputs only of stages it is about to run."""
    for name, stage in STAGES.items():
        if name != "check":
            assert "${paths.check}" in stage["deps"], name
    assert STAGES["check"]["outs"] == [{"${paths.check}": {"persist": True}}]
    assert set(STAGES["check"]["params"]) == set(params.SECTIONS)


def test_lock_cpu_record_names_the_committed_checkpoint():
    """tests/lock_cpu.json says which CPU type made dvc.lock; it must describe this dvc.lock."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    (out,) = [o for o in lock["stages"]["train"]["outs"] if o["path"].endswith("checkpoint.pt")]
    record = json.loads(LOCK_CPU.read_text())
    assert record["train_checkpoint_md5"] == out["md5"], (
        "dvc.lock was re-made: rewrite tests/lock_cpu.json with this machine's cpu_type() "
        f"(tests/conftest.py) and {out['md5']}"
    )


def test_byte_code_is_not_a_dependency():
    """Folder deps (src/sam3ft/data, src/sam3ft/model) would otherwise hash the __pycache__ that tests
    and editable installs leave there, so a fresh clone's dvc.lock would differ from a used checkout's."""
    ignored = (REPO / ".dvcignore").read_text().splitlines()
    assert "__pycache__/" in ignored and "*.pyc" in ignored
