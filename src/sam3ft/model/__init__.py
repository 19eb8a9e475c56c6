"""Building SAM3 image models from specs, and saving/loading their weights."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

# Packages whose `__init__.py` imports far more than building an image model uses:
# - sam3/__init__.py imports `model_builder`, which pulls in the video, tracker and interactive
#   predictors and huggingface_hub;
# - timm/__init__.py imports `timm.models` (every architecture, its data pipeline); sam3 needs only
#   `timm.layers` (DropPath, trunc_normal_: sam3/model/memory.py, sam3_tracker_base.py).
# Together most of a second of `sam3ft predict`'s start-up.
DEFERRED_INITS = ("sam3", "timm")


def defer_package_init(name: str) -> None:
    """Import package `name`'s submodules without running its `__init__.py` until a name from it is used.

    The package module is created as the import system would, its `__init__.py` left unrun; the first
    attribute the package itself lacks (e.g. `from sam3 import build_sam3_image_model`,
    `timm.create_model`, `timm.__version__`) runs it, so every name the package exports still works.
    A package already imported (or not installed) is left alone.
    """
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return  # not installed: the first real import says so
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def run_init(attribute: str) -> Any:
        delattr(package, "__getattr__")
        loader.exec_module(package)
        return getattr(package, attribute)

    setattr(package, "__getattr__", run_init)  # noqa: B010 (a module's __getattr__, PEP 562)
    sys.modules[name] = package


for _name in DEFERRED_INITS:
    defer_package_init(_name)
