"""One module per DVC stage; each `main()` reads a params path and calls `run(params)`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sam3ft import params as params_module
from sam3ft.errors import Sam3ftError


def stage_main(name: str, sections: list[str], run: Callable[[dict[str, Any]], None]) -> None:
    """Parse `--params`, load the stage's sections, run; user errors exit 2 with their fix."""
    parser = argparse.ArgumentParser(prog=f"python -m sam3ft.stages.{name}")
    parser.add_argument("--params", type=Path, default=params_module.DEFAULT_PARAMS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(levelname)s %(message)s")
    try:
        run(params_module.load(sections, args.params))
    except Sam3ftError as exc:
        print(f"[{name}] error: {exc}", file=sys.stderr)
        sys.exit(2)
