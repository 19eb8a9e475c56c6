"""Sizes of what a full-size SAM3 fine-tune writes: trainer checkpoint vs fp32 / bf16 / delta exports.

Computed from the `sam3` preset built on the meta device (no memory, no GBs written): each tensor's
bytes are numel x itemsize; safetensors adds a small JSON header (measured on the tiny export).
The trainer checkpoint holds fp32 weights plus AdamW's two fp32 moments for every trainable tensor.
The delta is a frozen-backbone run: vision trunk and text encoder frozen, everything else trained.

    python bench/export_sizes.py > bench/export_sizes.md
"""

from __future__ import annotations

import datetime
import platform
import sys

import torch

from sam3ft.model.build import build_model, empty_weights
from sam3ft.model.spec import load_preset
from sam3ft.stages.fetch import bundled_vocab

FROZEN = ("backbone.vision_backbone.trunk.", "backbone.language_backbone.")
# text prompts only: the box/point prompt encoder's weights never change, so a delta leaves them out
UNCHANGED_TEXT_ONLY = ("geometry_encoder.",)
NECK = ("backbone.vision_backbone.convs.",)
GB = 1e9


def main() -> None:
    with empty_weights():
        model = build_model(load_preset("sam3"), str(bundled_vocab()), training=False, coord_cache=False)
    state = model.state_dict()
    params = dict(model.named_parameters())
    floating = {k: v for k, v in state.items() if v.is_floating_point()}
    other = sum(v.numel() * v.element_size() for k, v in state.items() if k not in floating)
    n_float = sum(v.numel() for v in floating.values())
    n_params = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for k, p in params.items() if not k.startswith(FROZEN))
    text_only = sum(p.numel() for k, p in params.items() if not k.startswith(FROZEN + UNCHANGED_TEXT_ONLY))
    no_neck = sum(
        p.numel() for k, p in params.items() if not k.startswith(FROZEN + UNCHANGED_TEXT_ONLY + NECK)
    )
    rows = [
        (
            "trainer checkpoint (fp32 weights + AdamW moments, all trainable)",
            4 * n_float + 8 * n_params + other,
        ),
        (
            "trainer checkpoint, frozen backbone (AdamW for trainable only)",
            4 * n_float + 8 * trainable + other,
        ),
        ("export fp32 (safetensors)", 4 * n_float + other),
        ("export bf16 (safetensors, default)", 2 * n_float + other),
        ("export delta bf16, frozen backbone", 2 * trainable),
        ("export delta fp32, frozen backbone", 4 * trainable),
        ("export delta bf16, frozen backbone, text prompts only", 2 * text_only),
        ("export delta bf16, frozen backbone + neck, text prompts only", 2 * no_neck),
    ]
    print("# Export sizes, full-size SAM3 (`sam3` preset, computed on the meta device)\n")
    print(
        f"- date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )
    print(f"- command: `{' '.join(['python', *sys.argv])} > bench/export_sizes.md`")
    print(
        f"- parameters: {n_params / 1e6:.1f} M ({trainable / 1e6:.1f} M outside the vision trunk and text "
        f"encoder); tensors in the state dict: {len(state)}\n"
    )
    print("| artifact | size (GB) | vs trainer checkpoint |\n|---|---|---|")
    for name, size in rows:
        print(f"| {name} | {size / GB:.3f} | {size / rows[0][1]:.3f} |")
    print("\nGoals (issue 5): full export <= 1.7 GB; delta of a frozen-trunk run <= 50 MB.")


if __name__ == "__main__":
    main()
