"""`sam3ft` command line: the same functions the DVC stages call.

sam3ft stage NAME [--params params.yaml]     run one pipeline stage (what dvc.yaml calls)
sam3ft predict IMAGE... [--model DIR]        detect with an exported model, JSON to stdout
sam3ft doctor [--params params.yaml]         check this machine for the configured run (exit 1 on FAIL)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from sam3ft.errors import Sam3ftError

STAGES = ("fetch", "prepare", "train", "evaluate", "export")


def _predict(args: argparse.Namespace) -> int:
    from sam3ft.inference import collect_images, predict_images
    from sam3ft.model.export import load_export
    from sam3ft.model.predict import Predictor, resolve_device, resolve_dtype
    from sam3ft.stages import pin_threads

    pin_threads(args.threads)
    images = collect_images(args.inputs)
    if not images:
        raise Sam3ftError(f"no images found in {args.inputs}", fix="give image files, folders or globs")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, spec, info = load_export(args.model, args.base, dtype=dtype)
    prompts = {1: args.prompt} if args.prompt else {int(k): v for k, v in info["prompts"].items()}
    predictor = Predictor(
        model, spec.image_size, device, dtype, args.compile, args.compile_scope, masks=not args.boxes_only
    )
    report = predict_images(predictor, images, prompts, args.threshold, args.max_dets, args.out)
    found = sum(len(r["detections"]) for r in report.records)
    print(
        f"{len(report.records)} image(s), {found} detection(s) >= {args.threshold} -> "
        f"{args.out / 'detections.json'}; {len(report.failed)} failed",
        file=sys.stderr,
    )
    return 1 if report.failed else 0


def _doctor(args: argparse.Namespace) -> int:
    from sam3ft.data.doctor import dataset_checks
    from sam3ft.doctor import run_checks

    checks = run_checks(args.params, Path.cwd()) + dataset_checks(args.params, Path.cwd())
    for c in checks:
        print(f"{c.status:<4}  {c.name}: {c.detail}" + (f"  -> fix: {c.fix}" if c.status != "OK" else ""))
    fails, warns = (sum(c.status == s for c in checks) for s in ("FAIL", "WARN"))
    print(f"doctor: {fails} failure(s), {warns} warning(s)")
    return 1 if fails else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sam3ft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    stage = sub.add_parser("stage", help="run one pipeline stage")
    stage.add_argument("name", choices=STAGES)
    stage.add_argument("--params", default="params.yaml")
    predict = sub.add_parser("predict", help="detect objects with an exported model")
    predict.add_argument("inputs", nargs="+", metavar="PATH", help="image files, folders or globs")
    predict.add_argument(
        "--model",
        "--weights",
        type=Path,
        default=Path("artifacts/export/model"),
        help="an export folder (model.json + safetensors), default: this repo's export",
    )
    predict.add_argument("--base", type=Path, help="base weights file, for a delta export only")
    predict.add_argument("--prompt", help="text prompt (default: the classes the model was trained on)")
    predict.add_argument("--threshold", type=float, default=0.5)
    predict.add_argument("--max-dets", type=int, default=100)
    predict.add_argument(
        "--out",
        type=Path,
        default=Path("predictions"),
        help="folder for detections.json and overlays/ (default: predictions)",
    )
    predict.add_argument("--threads", type=int, default=1)
    predict.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    predict.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="backbone weights dtype; auto: bfloat16 on CUDA, float32 on CPU",
    )
    predict.add_argument(
        "--compile",
        nargs="?",
        const="reduce-overhead",
        metavar="MODE",
        help="torch.compile the model (MODE: reduce-overhead (CUDA graphs), default, "
        "max-autotune-no-cudagraphs; bare --compile: reduce-overhead; what: --compile-scope); compiles "
        "once at start, pays off over many images",
    )
    predict.add_argument(
        "--compile-scope",
        default="all",
        choices=("backbone", "all"),
        help="with --compile: the image backbone and the grounding head (all, the default), or the "
        "backbone only",
    )
    predict.add_argument(
        "--boxes-only",
        action="store_true",
        help="skip the mask head of a model that has one (faster; no masks in detections.json)",
    )
    doctor = sub.add_parser("doctor", help="check this machine for the configured run")
    doctor.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    if args.command == "doctor":
        return _doctor(args)
    if args.command == "stage":
        sys.argv = [f"sam3ft.stages.{args.name}", "--params", args.params]
        importlib.import_module(f"sam3ft.stages.{args.name}").main()
        return 0
    try:
        return _predict(args)
    except Sam3ftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
