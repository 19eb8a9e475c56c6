"""Where torch.compile keeps its compiled graphs between runs, and what compiling cost a process.

Inductor caches each compiled graph (forward and backward) and the Triton or C++ code behind it on
disk, keyed by the graph and the torch version: a second run of the same model and shapes loads them
instead of compiling again, and skips most of the minutes a first compile takes. Torch's default
place is /tmp/torchinductor_$USER, which most distributions empty at every boot; `use_persistent_cache`
moves it under the user's cache folder. The cache never changes a result, only how soon it comes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # torch's own variable; Triton's cache goes under it too


def torch_default_cache_dir() -> str:
    """/tmp/torchinductor_$USER: inductor writes it into $TORCHINDUCTOR_CACHE_DIR the first time it
    looks for its cache (torch/_inductor/runtime/cache_dir_utils.py), so a set variable holding it
    was not necessarily the user's choice."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(default_cache_dir())


def persistent_cache_dir(environ: Mapping[str, str]) -> Path:
    """$TORCHINDUCTOR_CACHE_DIR where set to another folder than torch's default, else
    $XDG_CACHE_HOME/sam3ft/torchinductor (~/.cache when XDG_CACHE_HOME is unset)."""
    chosen = environ.get(CACHE_ENV)
    if chosen and os.path.abspath(chosen) != torch_default_cache_dir():
        return Path(chosen)
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "sam3ft" / "torchinductor"


def use_persistent_cache(environ: MutableMapping[str, str] = os.environ) -> Path:
    """Point inductor's cache at `persistent_cache_dir` for this process and the ones it starts
    (spawned trainer processes, sbatch jobs: both inherit the environment); returns the folder."""
    folder = persistent_cache_dir(environ)
    environ[CACHE_ENV] = str(folder)
    if "torch._inductor.utils" in sys.modules:  # drop paths inductor derived from the old folder
        sys.modules["torch._inductor.utils"].clear_caches()
    return folder


@dataclass(frozen=True)
class CompileCost:
    """Compiling done in this process between two `compile_cost` readings."""

    seconds: float  # dynamo's frame and backward compiles, cache lookups and loads included
    cached: int  # graphs loaded from inductor's cache
    compiled: int  # graphs compiled afresh (and then saved to the cache)

    def __sub__(self, earlier: CompileCost) -> CompileCost:
        return CompileCost(
            self.seconds - earlier.seconds, self.cached - earlier.cached, self.compiled - earlier.compiled
        )

    def __str__(self) -> str:
        return (
            f"{self.seconds:.1f} s ({self.cached} graphs from the cache, {self.compiled} compiled; "
            f"cache {os.environ.get(CACHE_ENV) or 'torch default'})"
        )


def compile_cost() -> CompileCost:
    """This process's compiling so far, from torch's own counters (zero before any compile)."""
    from torch._dynamo.utils import calculate_time_spent, counters

    spent = calculate_time_spent()
    inductor = counters["inductor"]
    return CompileCost(
        seconds=spent.get("entire_frame_compile", 0.0) + spent.get("entire_backward_compile", 0.0),
        cached=inductor["fxgraph_cache_hit"],
        compiled=inductor["fxgraph_cache_miss"],
    )


class CompileLog:
    """What compiling cost since the last `since_last` call: None when nothing compiled."""

    def __init__(self) -> None:
        self._last = compile_cost()

    def since_last(self) -> CompileCost | None:
        now = compile_cost()
        spent, self._last = now - self._last, now
        return spent if spent.seconds > 0 or spent.cached or spent.compiled else None
