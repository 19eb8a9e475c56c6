"""Building SAM3 image models from specs, and saving/loading their weights."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any


def _defer_sam3_init() -> None:
    """Import `sam3`'s submodules without running its `__init__.py` until a name from it is used.

    sam3/__init__.py imports `model_builder`, which pulls in the video, tracker and interactive
    predictors and huggingface_hub: a second or more of imports that building an image model from
    its parts (model/build.py) never uses. The package module is created as the import system would,
    its `__init__.py` left unrun; the first attribute the package itself lacks (e.g. `from sam3 import
    build_sam3_image_model`, `sam3.__version__`) runs it, so every name sam3 exports still works.
    """
    if "sam3" in sys.modules:
        return
    spec = importlib.util.find_spec("sam3")
    if spec is None or spec.loader is None:
        return  # not installed: the first real import says so
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def run_init(name: str) -> Any:
        delattr(package, "__getattr__")
        loader.exec_module(package)
        return getattr(package, name)

    setattr(package, "__getattr__", run_init)  # noqa: B010 (a module's __getattr__, PEP 562)
    sys.modules["sam3"] = package


_defer_sam3_init()
