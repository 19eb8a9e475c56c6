"""What our entry points (the stages, the CLI) print: known harmless warnings are filtered here,
before the imports that raise them, so a screen shows our own lines and real problems."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

# (message regex, category): raised by torch/sam3 at import and by LitServe at start, none affects
# a result
HARMLESS = (
    (r"`torch\.jit\.script` is deprecated", FutureWarning),  # sam3 scripts some loss helpers
    (r"CUDA is not available or torch_xla is imported\. Disabling autocast", UserWarning),  # sam3 video
    # serve.DetectAPI's batch/unbatch pass lists through; max_batch_size 1 (unbatched) is a choice
    (r"The LitServer has both batch and unbatch methods implemented", UserWarning),
)


def quiet_known_warnings() -> None:
    for message, category in HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category)


@contextlib.contextmanager
def stdout_to(path: Path) -> Iterator[None]:
    """Python-level prints (sam3's dataset lengths, pycocotools' progress and tables) go to `path`
    instead of the terminal; stderr (progress bar, warnings, errors) stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out, contextlib.redirect_stdout(out):
        yield
