"""Compile time against step time for sam3's ViT trunk: eager, the whole forward compiled (what
`trainer.compile_trunk` does, as sam3's own `compile_mode`), or each block compiled on its own.

A narrow trunk (width 96, 224 px) with the full model's depth and block pattern: compile time grows
with the graph, not the width. Each mode runs in its own process with an empty inductor cache.

    python bench/trunk_compile.py --depth 32 eager whole blocks
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def one(mode: str, depth: int, steps: int) -> str:
    import torch
    from sam3.model.vitdet import ViT

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = depth  # blocks: one graph per block at most
    vit = ViT(
        img_size=224,
        pretrain_img_size=224,
        patch_size=14,
        embed_dim=96,
        depth=depth,
        num_heads=2,
        mlp_ratio=4.0,
        norm_layer="LayerNorm",
        drop_path_rate=0.1,  # configs/model/sam3.yaml
        qkv_bias=True,
        use_abs_pos=True,
        tile_abs_pos=True,
        global_att_blocks=tuple(range(depth // 4 - 1, depth, depth // 4)),  # sam3: 7, 15, 23, 31
        rel_pos_blocks=(),
        use_rope=True,
        use_interp_rope=True,
        window_size=8,
        pretrain_use_cls_token=True,
        retain_cls_token=False,
        ln_pre=True,
        ln_post=False,
        return_interm_layers=False,
        bias_patch_embed=False,
        compile_mode=None,
        use_act_checkpoint=True,
    ).train()
    if mode == "whole":
        vit.forward = torch.compile(vit.forward, fullgraph=True)  # type: ignore[method-assign]
    elif mode == "blocks":
        for block in vit.blocks:
            block.forward = torch.compile(block.forward, fullgraph=True)
    image = torch.randn(1, 3, 224, 224)
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
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.modes) - {"eager", "whole", "blocks"}
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}: eager, whole or blocks")
    if args.one:
        print(one(args.one, args.depth, args.steps), flush=True)
        return
    for mode in args.modes:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp()}  # cold: no cached kernels
        cmd = [sys.executable, __file__, "--one", mode, f"--depth={args.depth}", f"--steps={args.steps}"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
