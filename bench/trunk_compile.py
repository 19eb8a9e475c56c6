"""Compile time against step time for sam3's ViT trunk: eager, the whole forward compiled (what
`trainer.compile_trunk` does, as sam3's own `compile_mode`), or each block compiled on its own.

The tiny preset's trunk (width 96, 224 px) with the full model's depth, global blocks and drop path
(built by model.build, activation checkpointing on): compile time grows with the graph, not the
width. Each mode runs in its own process with an empty inductor cache.

    python bench/trunk_compile.py eager whole blocks
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def one(mode: str, steps: int) -> str:
    import dataclasses

    import torch

    from sam3ft.model.build import build_model, bundled_vocab
    from sam3ft.model.spec import load_preset

    full = load_preset("sam3")
    # tiny's widths, window and image size; the full trunk's depth, global blocks and drop path
    spec = dataclasses.replace(
        load_preset("tiny"),
        vit_depth=full.vit_depth,
        vit_global_blocks=full.vit_global_blocks,
        vit_drop_path=full.vit_drop_path,
    )
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = spec.vit_depth  # blocks: one graph per block at most
    vit = build_model(spec, str(bundled_vocab())).get_submodule("backbone.vision_backbone.trunk").train()
    if mode == "whole":
        vit.forward = torch.compile(vit.forward, fullgraph=True)  # type: ignore[method-assign]
    elif mode == "blocks":
        for block in vit.blocks:
            block.forward = torch.compile(block.forward, fullgraph=True)
    image = torch.randn(1, 3, spec.image_size, spec.image_size)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        sum(out.float().square().mean() for out in vit(image)).backward()
        seconds.append(time.perf_counter() - start)
    graphs = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)
    return f"{mode}: first step {seconds[0]:.1f} s, then {min(seconds[1:]):.3f} s/step, {graphs} graphs"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("modes", nargs="*", help="eager, whole, blocks")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.modes) - {"eager", "whole", "blocks"}
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}: eager, whole or blocks")
    if args.one:
        print(one(args.one, args.steps), flush=True)
        return
    for mode in args.modes:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp()}  # cold: no cached kernels
        cmd = [sys.executable, __file__, "--one", mode, f"--steps={args.steps}"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
