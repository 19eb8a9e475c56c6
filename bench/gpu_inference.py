"""Inference latency at batch 1: upstream's Sam3Processor vs our Predictor on the bf16 export, one card.

Variants, measured one after another in this one process on the same image and prompt:
- stock: the preset built float32 by `sam3ft.model.build` (the same modules as upstream's
  `build_sam3_image_model`), eval mode, sam3's own `Sam3Processor` (set_image + set_text_prompt per image)
  under `torch.autocast(device, bfloat16)`;
- ours: the same weights written by our export code (`cast` + `write_weights`, bf16 safetensors) and
  loaded as `sam3ft predict` loads them (`load_export` + `Predictor`, dtype auto: bf16 on CUDA);
- ours+compile:<mode>: the same, image backbone under torch.compile(mode);
- ours+compile-all:<mode>: the same, backbone and grounding head under torch.compile(mode);
- ours+masks, ours+masks+compile-all:<mode>: with the mask head and RLE masks (what stock's
  Sam3Processor computes), timed at each of --mask-min-scores (`@<min score>` or `@topK` in the
  row name; the detections kept per image, whose masks are encoded, in the `kept` column; stock
  keeps those above its confidence threshold, 0.5).
Per variant: warm-up, then timed iterations with a device synchronize around each; median / p90 ms per
image, peak memory, and the max |difference| of raw boxes (normalised cxcywh) and scores against stock.
Weights are a seeded random init (real ones cannot be downloaded there); the box head's last layer,
zero at init, is drawn at random so that boxes depend on the image.

GPU (one H100; repo root with .whl/ and .gpu/sam3/base/ present, `data` carried for the real image):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    PYTHONPATH=src:/tmp/site python3 bench/gpu_inference.py \
        --vocab .gpu/sam3/base/bpe_simple_vocab_16e6.txt.gz --out $OUT
CPU smoke test of the same code path (~35 s on 2 cores; compiling the head too adds ~1.5 min):
    python bench/gpu_inference.py --device cpu --preset tiny --dtype bfloat16 --warmup 1 --iters 3 \
        --compile-modes default --compile-all-modes '' --out /tmp/b
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sam3.model.sam3_image_processor import Sam3Processor

from sam3ft.layout import MODEL_JSON, VOCAB_NAME
from sam3ft.model.build import build_model
from sam3ft.model.export import FORMAT, cast, load_export, write_weights
from sam3ft.model.predict import Predictor, resolve_dtype
from sam3ft.model.spec import load_preset
from sam3ft.stages import pin_threads

REPO = Path(__file__).resolve().parents[1]
START = time.perf_counter()  # the --budget-s clock
SAMPLE_SPLIT = REPO / "data" / "find-fuse-neutrals-v5" / "valid"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def find_vocab(given: str | None) -> Path:
    """The BPE vocab: --vocab, else the copy open_clip_torch ships (sam3 0.1.4 ships none)."""
    if given:
        return Path(given)
    try:
        import open_clip
    except ImportError:
        sys.exit(f"no BPE vocab: pass --vocab PATH ({VOCAB_NAME}, e.g. .gpu/base/{VOCAB_NAME})")
    return Path(open_clip.__file__).parent / VOCAB_NAME


def load_image(path: str | None) -> tuple[Image.Image, str]:
    """--image, else the first validation image of the bundled sample, else a seeded random image."""
    candidates = [Path(path)] if path else sorted(SAMPLE_SPLIT.glob("*.jpg"))[:1]
    if candidates:
        with Image.open(candidates[0]) as image:
            return image.convert("RGB"), str(path or candidates[0].relative_to(REPO))
    pixels = np.random.default_rng(0).integers(0, 256, (756, 1008, 3), dtype=np.uint8)
    return Image.fromarray(pixels), "seeded random 1008x756 RGB (bundled sample not found)"


def random_model(preset: str, vocab: Path, device: str) -> torch.nn.Module:
    """The preset, seeded random init, with the mask head (Sam3Processor reads `pred_masks`)."""
    spec = dataclasses.replace(load_preset(preset), segmentation=True)
    torch.manual_seed(0)
    model = build_model(spec, str(vocab), training=False, coord_cache=device.startswith("cuda"))
    torch.nn.init.normal_(model.transformer.decoder.bbox_embed.layers[-1].weight, std=0.05)
    return model.eval()


def export_bf16(model: torch.nn.Module, preset: str, vocab: Path, out: Path) -> None:
    """What the export stage writes (full mode, bf16), without its parity checks."""
    info: dict[str, Any] = {"format": FORMAT, "mode": "full", "dtype": "bfloat16", "vocab": VOCAB_NAME}
    info["spec"] = dataclasses.replace(load_preset(preset), segmentation=True).to_dict()
    info |= write_weights(out, cast(model.state_dict(), torch.bfloat16), "model", torch_file=False)
    (out / VOCAB_NAME).write_bytes(vocab.read_bytes())
    (out / MODEL_JSON).write_text(json.dumps(info))


def time_it(step: Callable[[], object], device: str, warmup: int, iters: int) -> dict[str, float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 2),
        "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))], 2),
        "min_ms": round(times[0], 2),
        "iters": iters,
    }


def host_syncs(step: Callable[[], object], device: str) -> int | None:
    """Device-to-host synchronisations in one call (CUDA's sync debug mode), None off CUDA."""
    if not device.startswith("cuda"):
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def reset_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else None


def stock(
    args: argparse.Namespace, model: torch.nn.Module, image: Image.Image
) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
    """Upstream's way: float32 weights, bf16 autocast, Sam3Processor; also its raw boxes and scores."""
    device = args.device
    model = model.to(device)
    processor = Sam3Processor(model, resolution=load_preset(args.preset).image_size, device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

    def step() -> dict[str, Any]:
        with autocast:
            return processor.set_text_prompt(args.prompt, processor.set_image(image))

    captured: list[dict[str, torch.Tensor]] = []
    grounding = model.forward_grounding

    def capture(**kwargs: Any) -> dict[str, torch.Tensor]:
        out = grounding(**kwargs)
        captured.append(out)
        return out

    model.forward_grounding = capture  # instance attribute shadows the method for one call
    step()
    del model.forward_grounding
    out = captured[0]
    presence = out["presence_logit_dec"].sigmoid().unsqueeze(1)
    raw = (
        out["pred_boxes"][0].float().cpu(),
        (out["pred_logits"].sigmoid() * presence)[0, :, 0].float().cpu(),
    )
    reset_memory(device)
    result = {**time_it(step, device, args.warmup, args.iters), "syncs_per_image": host_syncs(step, device)}
    result |= {"peak_mib": peak_mib(device), "weights_dtype": "float32 (bf16 autocast)"}
    return result, raw


def ours(
    args: argparse.Namespace,
    loaded: tuple[torch.nn.Module, int],
    image: Image.Image,
    compile_mode: str | None,
    compile_scope: str,
    reference: tuple[torch.Tensor, torch.Tensor],
    masks: bool = False,
    min_scores: tuple[str, ...] = ("0",),
) -> dict[str, dict[str, Any]]:
    """`sam3ft predict`'s way: the model from load_export, Predictor in the resolved dtype, one prompt;
    one row per min score (detections below it are dropped before their masks are made); `topK`:
    the K-th best of this predictor's own scores (random-init scores lie close together)."""
    device = args.device
    dtype = resolve_dtype(args.dtype, device)
    torch._dynamo.reset()  # each compile mode starts from scratch
    counters = torch._dynamo.utils.counters
    counters.clear()
    reset_memory(device)
    started = time.perf_counter()
    # boxes only unless `masks` (the like-for-like variant: stock's Sam3Processor runs the mask head)
    predictor = Predictor(loaded[0], loaded[1], device, dtype, compile_mode, compile_scope, masks=masks)
    compile_s = round(time.perf_counter() - started, 1)
    boxes, scores = predictor.raw_outputs(image, args.prompt)
    best = sorted(scores.tolist(), reverse=True)
    rows = {}
    for name in min_scores:
        min_score = best[int(name[3:]) - 1] if name.startswith("top") else float(name)

        def step(min_score: float = min_score) -> list[Any]:
            return predictor.predict(image, {1: args.prompt}, max_dets=100, min_score=min_score)

        result = {
            **time_it(step, device, args.warmup, args.iters),
            "syncs_per_image": host_syncs(step, device),
        }
        result |= {
            "kept": len(step()),
            "peak_mib": peak_mib(device),
            "weights_dtype": f"backbone {str(dtype).removeprefix('torch.')}, head float32",
            "max_box_diff_vs_stock": round((boxes.cpu() - reference[0]).abs().max().item(), 6),
            "max_score_diff_vs_stock": round((scores.cpu() - reference[1]).abs().max().item(), 6),
        }
        if compile_mode:
            result["compile_s"] = compile_s
        if compile_mode == "reduce-overhead":  # inductor falls back to plain kernels where graphs can't run
            result["cudagraph_skips"] = int(counters["inductor"]["cudagraph_skips"])
        rows[name] = result | {"min_score": round(min_score, 6)}
    return rows


def markdown(report: dict[str, Any]) -> str:
    cols = ["median_ms", "p90_ms", "min_ms", "kept", "peak_mib", "syncs_per_image"]
    cols += ["max_box_diff_vs_stock", "max_score_diff_vs_stock", "compile_s", "cudagraph_skips"]
    lines = [
        "# Inference latency, batch 1",
        "",
        f"- Command: `{report['command']}`",
        f"- Date: {report['date']}; device: {report['device']}; torch {report['torch']}, "
        f"python {report['python']}",
        f"- Preset {report['preset']} ({report['resolution']} px), prompt `{report['prompt']}`, "
        f"image: {report['image']}; {report['warmup']} warm-up + {report['iters']} timed iterations",
        f"- ours: `load_export` of the bf16 export took {report['load_export_s']} s (CPU build + load)",
        "- Weights: seeded random init (box head's last layer drawn at random); diffs are raw "
        "normalised cxcywh boxes and scores of all queries",
        "",
        "| variant | " + " | ".join(cols) + " | weights |",
        "|---|" + "---:|" * len(cols) + "---|",
    ]
    for name, row in report["variants"].items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} |")
            continue
        cells = ["" if row.get(c) is None else str(row[c]) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['weights_dtype']} |")
    return "\n".join(lines) + "\n"


def save(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_inference.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_inference.md").write_text(markdown(report))


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="sam3")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="ours: auto (bf16 on CUDA), float32, bfloat16")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument(
        "--compile-modes",
        default="default",
        help="comma-separated torch.compile modes of the image backbone (ours+compile:MODE); empty: none",
    )
    parser.add_argument(
        "--compile-all-modes",
        default="reduce-overhead",
        help="modes compiling the backbone and the grounding head (ours+compile-all:MODE); empty: none",
    )
    parser.add_argument(
        "--masks", action="store_true", help="also time ours with the mask head and RLE masks (ours+masks)"
    )
    parser.add_argument(
        "--masks-compile-all-modes",
        default="",
        help="modes compiling backbone and heads with the mask head (ours+masks+compile-all:MODE)",
    )
    parser.add_argument(
        "--mask-min-scores",
        default="0,0.5,top10",
        help="comma-separated min scores at which the mask variants are timed (0: all 100 masks; "
        "topK: the K-th best score of the variant's own)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=240,
        help="start no further variant after this many seconds (compiles take minutes when cold)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, as sam3ft predict")
    parser.add_argument("--prompt", default="fuse neutrals")
    parser.add_argument("--image", help="default: first image of the bundled sample's valid split")
    parser.add_argument("--vocab", help=f"{VOCAB_NAME} (default: open_clip_torch's copy)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "bench")))
    return parser.parse_args()


def main() -> None:
    args = parse()
    pin_threads(args.threads)
    image, image_source = load_image(args.image)
    vocab = find_vocab(args.vocab)
    device = args.device
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
    report: dict[str, Any] = {
        "command": "python " + shlex.join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "preset": args.preset,
        "resolution": load_preset(args.preset).image_size,
        "prompt": args.prompt,
        "image": f"{image_source} ({image.width}x{image.height})",
        "warmup": args.warmup,
        "iters": args.iters,
        "threads": args.threads,
        "budget_s": args.budget_s,
        "variants": {},
    }
    with tempfile.TemporaryDirectory(prefix="sam3ft-bench-") as tmp:
        model = random_model(args.preset, vocab, device)  # float32, on the CPU
        export_bf16(model, args.preset, vocab, Path(tmp))
        report["variants"]["stock"], reference = stock(args, model, image)
        del model  # one model on the device at a time: peak memory per variant
        print("stock", report["variants"]["stock"], flush=True)
        started = time.perf_counter()
        model, spec, _ = load_export(Path(tmp), dtype=resolve_dtype(args.dtype, device))
        report["load_export_s"] = round(time.perf_counter() - started, 1)
        variants: list[tuple[str, str | None, str, bool]] = [("ours", None, "backbone", False)]
        if args.masks:
            variants.append(("ours+masks", None, "backbone", True))
        variants += [(f"ours+compile:{m}", m, "backbone", False) for m in args.compile_modes.split(",") if m]
        variants += [
            (f"ours+compile-all:{m}", m, "all", False) for m in args.compile_all_modes.split(",") if m
        ]
        variants += [
            (f"ours+masks+compile-all:{m}", m, "all", True)
            for m in args.masks_compile_all_modes.split(",")
            if m
        ]
        mask_min_scores = tuple(args.mask_min_scores.split(","))
        for key, mode, scope, masks in variants:  # one loaded model; each variant wraps it anew
            save(args.out, report)  # what is measured so far survives a timeout
            if time.perf_counter() - START > args.budget_s:
                report["variants"][key] = {"error": f"skipped: past --budget-s {args.budget_s}"}
                continue
            loaded = (model, spec.image_size)
            min_scores = mask_min_scores if masks else ("0",)
            try:
                rows = ours(args, loaded, image, mode, scope, reference, masks, min_scores)
            except Exception as exc:  # recorded in the table; the other variants still run
                rows = {"0": {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}}
            for min_score, row in rows.items():
                name = f"{key}@{min_score}" if masks else key
                report["variants"][name] = row
                print(name, row, flush=True)
    save(args.out, report)
    print(markdown(report))


if __name__ == "__main__":
    main()
