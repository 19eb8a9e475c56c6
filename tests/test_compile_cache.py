"""torch.compile's cache: where it lives (sam3ft.compile_cache), that a second process loads the graphs
a first one compiled, and that training logs what compiling cost."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from sam3ft.compile_cache import (
    CACHE_ENV,
    CompileLog,
    persistent_cache_dir,
    torch_default_cache_dir,
    use_persistent_cache,
)
from sam3ft.train.trainer import Trainer

# compiles a small MLP's forward and backward with inductor (C++ on the CPU) in a fresh process
COMPILE_ONCE = """
import json, torch
from sam3ft.compile_cache import CompileLog, use_persistent_cache
folder = use_persistent_cache()
log = CompileLog()
torch.manual_seed(0)
mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
torch.compile(mlp)(torch.randn(3, 8)).sum().backward()
spent = log.since_last()
print(json.dumps({"folder": str(folder), "cached": spent.cached, "compiled": spent.compiled,
                  "seconds": spent.seconds, "grad": mlp[0].weight.grad.sum().item()}))
"""


def test_cache_folder_is_the_users_unless_torchs_variable_names_one(tmp_path):
    assert persistent_cache_dir({"HOME": "/home/u"}) == Path("/home/u/.cache/sam3ft/torchinductor")
    assert persistent_cache_dir({"HOME": "/home/u", "XDG_CACHE_HOME": "/c"}) == Path(
        "/c/sam3ft/torchinductor"
    )
    assert persistent_cache_dir({"XDG_CACHE_HOME": "/c", CACHE_ENV: "/mine"}) == Path("/mine")
    # torch writes its default into the variable once it looks for its cache: not a choice
    assert persistent_cache_dir({"XDG_CACHE_HOME": "/c", CACHE_ENV: torch_default_cache_dir()}) == Path(
        "/c/sam3ft/torchinductor"
    )
    environ = {"XDG_CACHE_HOME": str(tmp_path)}
    assert use_persistent_cache(environ) == tmp_path / "sam3ft" / "torchinductor"
    assert environ[CACHE_ENV] == str(tmp_path / "sam3ft" / "torchinductor")  # for spawned processes


def _compile_in_a_fresh_process(cache_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != CACHE_ENV}
    env["XDG_CACHE_HOME"] = str(cache_home)
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_ONCE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_compiled_graphs_from_the_cache(tmp_path):
    first = _compile_in_a_fresh_process(tmp_path)
    second = _compile_in_a_fresh_process(tmp_path)
    folder = tmp_path / "sam3ft" / "torchinductor"
    assert first["folder"] == second["folder"] == str(folder)
    assert first["compiled"] >= 2 and first["cached"] == 0  # forward and backward graphs
    assert second["cached"] == first["compiled"] and second["compiled"] == 0
    assert second["grad"] == first["grad"]  # the cache changes when results come, not what they are
    assert any(folder.rglob("*.py")), "no compiled code in the cache folder"


def test_training_logs_what_compiling_took_once(caplog):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    # a handler on the trainer's own logger: a test that ran sam3's setup_logging in this process
    # replaced logging.root, where caplog's handler would listen
    caplog.set_level(logging.INFO, logger="sam3ft.train.trainer")
    logger = logging.getLogger("sam3ft.train.trainer")
    logger.addHandler(handler)
    try:
        trainer = object.__new__(Trainer)
        trainer._compile_log = CompileLog()
        trainer._log_compiling("epoch 0's training")
        assert not records  # nothing compiled yet
        square = torch.compile(lambda x: x * x + 1, backend="eager")  # dynamo's tracing, no inductor
        square(torch.ones(3))
        trainer._log_compiling("epoch 0's training")
        trainer._log_compiling("epoch 0's validation")  # nothing compiled since
    finally:
        logger.removeHandler(handler)
    (record,) = records
    assert record.getMessage().startswith("epoch 0's training: compiling took ")
    assert "0 graphs from the cache, 0 compiled" in record.getMessage()
