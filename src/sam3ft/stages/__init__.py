"""One module per DVC stage; each `main()` reads a params path and calls `run(params)`."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from sam3ft import params as params_module
from sam3ft.console import quiet_known_warnings
from sam3ft.errors import Sam3ftError

quiet_known_warnings()  # this package runs before each stage module's imports


def pin_threads(threads: int) -> None:
    """Fix torch's CPU thread counts before any work: on small machines more threads made sam3's
    steps erratic and several times slower, and a fixed count keeps float results reproducible."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)  # for any subprocess (data-loader workers)
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable once per process, before parallel work
        torch.set_num_interop_threads(threads)


def stage_main(
    name: str, sections: list[str], run: Callable[[params_module.Params], None], argv: list[str] | None = None
) -> None:
    """Parse `--params` (from `argv`, else the command line), load the stage's sections, run; user
    errors exit 2 with their fix."""
    parser = argparse.ArgumentParser(prog=f"python -m sam3ft.stages.{name}")
    parser.add_argument("--params", type=Path, default=params_module.DEFAULT_PARAMS)
    args = parser.parse_args(argv)
    # force: importing sam3 already installed a root handler, which would swallow these lines
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(levelname)s %(message)s", force=True)
    try:
        run(params_module.load(sections, args.params))
    except Sam3ftError as exc:
        fix = f"\n  fix: {exc.fix}" if exc.fix else ""
        print(f"[{name}] error: {params_module.in_file(exc, args.params)}{fix}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # a full disk outside the checkpoint writes (those say more themselves)
        if exc.errno != errno.ENOSPC:
            raise
        print(
            f"[{name}] error: disk full writing {exc.filename or 'an output'}\n"
            "  fix: free space on that disk, then run `dvc repro` again (finished stages are kept)",
            file=sys.stderr,
        )
        sys.exit(2)
