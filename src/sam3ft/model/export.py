"""The shipped model: safetensors weights in sam3.pt's key layout, model.json, a model card.

Keys carry sam3.pt's `detector.` prefix, so the same tensors also load with upstream's
`build_sam3_image_model(checkpoint_path=...)` when written as a torch file (`export.torch_file`).
A `delta` export holds only tensors that differ from the fetched base weights (frozen-trunk runs)
and is loaded on top of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sam3ft.errors import WeightsError
from sam3ft.io import sha256_file
from sam3ft.layout import MODEL_JSON
from sam3ft.model.build import build_to_load
from sam3ft.model.info import FORMAT, read_info
from sam3ft.model.predict import cast_backbone
from sam3ft.model.spec import ModelSpec
from sam3ft.model.weights import (
    UPSTREAM_PREFIX,
    StateDict,
    image_model_state,
    load_safetensors,
    read_weights_file,
    save_safetensors,
    verify_and_load,
)


def cast(state: StateDict, dtype: torch.dtype) -> StateDict:
    """Floating tensors in `dtype` (what the export stores), the rest untouched."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def delta_state(state: StateDict, base: StateDict) -> StateDict:
    """Tensors of `state` that are not bit-identical to the base weights' (trained or new ones)."""
    return {k: v for k, v in state.items() if k not in base or not torch.equal(v, base[k].to(v.dtype))}


def write_weights(out: Path, state: StateDict, name: str, torch_file: bool) -> dict[str, Any]:
    """`<name>.safetensors` (+ `<name>.pt` for upstream's loader); their names and hashes."""
    prefixed = {UPSTREAM_PREFIX + k: v for k, v in state.items()}
    # one metadata key: safetensors writes several in hash-map order, which is not reproducible
    save_safetensors(prefixed, out / f"{name}.safetensors", metadata={"format": FORMAT})
    files = {"weights": f"{name}.safetensors", "weights_sha256": sha256_file(out / f"{name}.safetensors")}
    if torch_file:
        torch.save({"model": prefixed}, out / f"{name}.pt")
        files |= {"torch_file": f"{name}.pt", "torch_file_sha256": sha256_file(out / f"{name}.pt")}
    return files


def load_export(
    export_dir: Path, base_weights: Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """A fresh eval-mode model from an export folder (plus the base weights for a delta).

    float32 by default; `dtype=torch.bfloat16` keeps the backbone's weights in bf16 as stored (no
    upcast, half the memory) and only the small grounding head in float32 (see `cast_backbone`).
    """
    info = read_info(export_dir)
    spec = ModelSpec.from_dict(info["spec"], source=str(export_dir / MODEL_JSON))
    model = build_to_load(spec, str(export_dir / info["vocab"]))
    state, _, _ = image_model_state(load_safetensors(export_dir / info["weights"]))
    if info["mode"] == "delta":
        if base_weights is None or sha256_file(base_weights) != info["base"]["sha256"]:
            raise WeightsError(
                f"{export_dir}: a delta export needs its base weights "
                f"(sha256 {info['base']['sha256'][:12]}…)",
                fix="pass the base file it was trained from (fetch output)",
            )
        base, _, _ = image_model_state(read_weights_file(base_weights))
        state = {**{k: v for k, v in base.items() if k in model.state_dict()}, **state}
    cast_backbone(model, dtype)  # load_state_dict copies each tensor into its parameter's dtype
    verify_and_load(model, state, str(export_dir / info["weights"]))
    return model.eval(), spec, info
