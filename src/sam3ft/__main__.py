"""`sam3ft` command line: the same functions the DVC stages call.

sam3ft stage NAME [--params params.yaml]     run one pipeline stage (what dvc.yaml calls)
sam3ft predict IMAGE... [--model DIR]        detect with an exported model: detections.json,
                                             COCO pre-labels and overlays under --out
sam3ft serve [--model DIR] [--port 8000]     answer POST /predict (multipart image) over HTTP
sam3ft doctor [--params params.yaml]         check this machine for the configured run (exit 1 on FAIL)
sam3ft summary [--params params.yaml]        the last evaluate run's decision metrics, a few lines
sam3ft compare                               the workspace, HEAD and its experiments: a line each
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sam3ft.console import quiet_known_warnings
from sam3ft.errors import Sam3ftError
from sam3ft.layout import (
    ANNOTATIONS_FILE,
    DEFAULT_PARAMS,
    MODEL_DIR,
    MODEL_JSON,
    REPO_ROOT,
    checkout_root,
    is_checkout,
)
from sam3ft.params import GPU_PREDICT_BATCH, predict_batch_size

STAGES = ("check", "fetch", "prepare", "baseline", "train", "evaluate", "export")


def _predict(args: argparse.Namespace) -> int:
    """Check every argument and the export folder first (no torch imported), then load and detect."""
    from sam3ft.inference import collect_images
    from sam3ft.model.info import model_version

    model_dir, info, threshold = _checked_export(args)
    images = collect_images(args.inputs)
    if not images:
        raise Sam3ftError(f"no .jpg/.png images in {args.inputs}", fix="give image files, folders or globs")
    if args.out.exists() and not args.out.is_dir():
        raise Sam3ftError(f"--out {args.out} is a file", fix="give a folder for the results")
    prompts = {1: args.prompt} if args.prompt else {int(k): v for k, v in info["prompts"].items()}
    predictor = _load_predictor(args, model_dir)
    return _run_predict(args, predictor, images, prompts, threshold, model_version(info))


def _checked_export(args: argparse.Namespace) -> tuple[Path, dict[str, Any], float]:
    """--model (or the checkout's export), its model.json checked, and the score threshold to use:
    --threshold, else the model's operating threshold (a note on stderr when it has none)."""
    from sam3ft.model.info import operating_threshold, read_info

    model_dir = args.model or default_model_dir()
    info = read_info(model_dir)
    if info["mode"] == "delta" and (args.base is None or not args.base.is_file()):
        raise Sam3ftError(
            f"{model_dir} is a delta export: it needs the base weights it was trained from",
            fix="pass --base FILE (the fetch stage's weights file)",
        )
    threshold, note = (args.threshold, None) if args.threshold is not None else operating_threshold(info)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return model_dir, info, threshold


def _load_predictor(args: argparse.Namespace, model_dir: Path) -> Any:
    """The expensive part: torch, sam3 and the weights (a `Predictor`)."""
    from sam3ft.model.export import load_export
    from sam3ft.model.predict import Predictor, resolve_device, resolve_dtype
    from sam3ft.stages import pin_threads

    pin_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, spec, _ = load_export(model_dir, args.base, dtype=dtype)
    predictor = Predictor(
        model, spec.image_size, device, dtype, args.compile, args.compile_scope, masks=not args.boxes_only
    )
    if predictor.compile_cost is not None:
        print(f"compiling took {predictor.compile_cost}", file=sys.stderr)
    return predictor


def _run_predict(
    args: argparse.Namespace,
    predictor: Any,
    images: list[Path],
    prompts: dict[int, str],
    threshold: float,
    model: dict[str, Any],
) -> int:
    from sam3ft.inference import predict_images

    report = predict_images(predictor, images, prompts, threshold, args.max_dets, args.out, model)
    found = sum(len(r["detections"]) for r in report.records)
    print(
        f"{len(report.records)} image(s), {found} detection(s) >= {threshold} -> "
        f"{args.out / 'detections.json'}, "
        f"pre-labels {args.out / ANNOTATIONS_FILE}, overlays {args.out / 'overlays'}; "
        f"{len(report.failed)} failed",
        file=sys.stderr,
    )
    return 1 if report.failed else 0


def default_model_dir() -> Path:
    """`paths.export`/model of the sam3ft checkout holding the current folder, else of the checkout
    this package runs from (an editable install); an error saying what to pass when there is none."""
    root = checkout_root(Path.cwd()) or (REPO_ROOT if is_checkout(REPO_ROOT) else None)
    if root is None:
        raise Sam3ftError(
            f"no --model given and {Path.cwd()} is not inside a sam3ft checkout (no dvc.yaml + params.yaml "
            "above it)",
            fix="pass --model DIR, an export folder (artifacts/export/model of a checkout after `dvc repro`)",
        )
    import yaml

    try:
        export = yaml.safe_load((root / "params.yaml").read_text())["paths"]["export"]
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise Sam3ftError(f"{root / 'params.yaml'}: no paths.export ({exc})", fix="pass --model DIR") from exc
    model_dir = root / export / MODEL_DIR
    if not (model_dir / MODEL_JSON).is_file():
        raise Sam3ftError(
            f"no --model given and {root} has no exported model yet ({model_dir} is empty or missing)",
            fix=f"run `dvc repro` (or `make pipeline`) in {root} first, or pass --model DIR",
        )
    return model_dir


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def check_port_free(host: str, port: int) -> None:
    """Bind once to see that the server will be able to (before its workers load the model)."""
    import socket

    try:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise Sam3ftError(
            f"cannot listen on {host}:{port} ({exc.strerror})",
            fix="pick another --port, stop the program using it, or give an address of this machine",
        ) from exc


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def unit_interval(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..1 (scores are probabilities)")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port a user may bind (1024..65535)."""
    value = positive_int(text)
    if not 1024 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is outside 1024..65535")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be 1 or more")
    return value


def seconds(text: str) -> float:
    """argparse type: a number of seconds, 0.001 to 10 (LitServe polls without pause at 0)."""
    value = _number(text)
    if not 0.001 <= value <= 10.0:
        raise argparse.ArgumentTypeError(f"{text} is outside 0.001..10 seconds")
    return value


def _serve(args: argparse.Namespace) -> int:
    """Check the export and settings (no torch here), then run the server until stopped."""
    from sam3ft.model.info import model_version

    model_dir, info, threshold = _checked_export(args)
    check_port_free(args.host, args.port)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise Sam3ftError(f"--device {args.device}, but CUDA is not available", fix="use --device cpu")
    from sam3ft.serve import ServeConfig, build_server

    config = ServeConfig(
        model_dir=model_dir,
        base=args.base,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        threshold=threshold,
        max_dets=args.max_dets,
        prompts={int(k): v for k, v in info["prompts"].items()},
        masks=not args.boxes_only,
        max_upload_bytes=args.max_upload_mb * 2**20,
        max_batch_size=args.max_batch_size or default_batch_size(args.device),
        batch_timeout=args.batch_timeout,
    )
    version = model_version(info)
    server = build_server(config, version)
    print(serving_line(config, version, args.host, args.port), file=sys.stderr, flush=True)
    # LitServe shuts its API and model-worker processes down on KeyboardInterrupt only; SIGTERM
    # (kill, docker stop, systemd, a test's terminate()) must do the same, or they outlive the server
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run(host=args.host, port=args.port, generate_client_file=False, log_level=args.log_level)
    except RuntimeError as exc:
        if "workers failed to start" not in str(exc):  # litserve/server.py `verify_worker_status`
            raise
        raise Sam3ftError(
            f"the model in {model_dir} did not load in the server's worker (its error is above)",
            fix=f"try it alone: sam3ft predict IMAGE --model {model_dir} --device {args.device}",
        ) from exc
    return 0


def serving_line(config: Any, version: dict[str, Any], host: str, port: int) -> str:
    """What `serve` serves and where, one line before LitServe's own (config: serve.ServeConfig)."""
    from sam3ft.serve import API_KEY_ENV

    url = f"http://{'[::1]' if host == '::' else host}:{port}"
    weights = (version.get("weights_sha256") or "?")[:12]
    heads = "boxes and masks" if config.masks else "boxes"
    key = f"; {API_KEY_ENV} set: requests need X-API-Key" if os.environ.get(API_KEY_ENV) else ""
    return (
        f"serve: {config.model_dir} ({version.get('preset')}, weights {weights}), {heads}, threshold "
        f"{config.threshold:g}, device {config.device}, batch up to {config.max_batch_size} -> POST "
        f"{url}/predict, page {url}/{key}"
    )


def default_batch_size(device: str) -> int:
    """`serve --max-batch-size` unset: 8 on a GPU (auto: one that nvidia-smi lists), 1 on the CPU."""
    if device == "auto":
        from litserve.connector import check_cuda_with_nvidia_smi  # no torch import in the server

        return predict_batch_size("cuda" if check_cuda_with_nvidia_smi() > 0 else "cpu")
    return predict_batch_size(device)


def _from_checkout_root(args: argparse.Namespace) -> None:
    """Without --params, run as from the root of the checkout holding the current folder (as dvc
    does from a subfolder), on its params.yaml: the paths in it are relative to that root."""
    if args.params is None:
        root = checkout_root(Path.cwd())
        if root is not None:
            os.chdir(root)
        args.params = DEFAULT_PARAMS


def _doctor(args: argparse.Namespace) -> int:
    from sam3ft.data.doctor import dataset_checks
    from sam3ft.doctor import run_checks

    _from_checkout_root(args)

    checks = run_checks(args.params, Path.cwd()) + dataset_checks(args.params, Path.cwd())
    for c in checks:
        print(f"{c.status:<4}  {c.name}: {c.detail}" + (f"  -> fix: {c.fix}" if c.status != "OK" else ""))
    fails, warns = (sum(c.status == s for c in checks) for s in ("FAIL", "WARN"))
    print(f"doctor: {fails} failure(s), {warns} warning(s)")
    return 1 if fails else 0


def _stage(args: argparse.Namespace) -> int:
    """The stage module's own entry (what dvc.yaml calls): its errors exit 2 there, named by stage."""
    from sam3ft.stages import stage_main

    module = importlib.import_module(f"sam3ft.stages.{args.name}")
    stage_main(args.name, module.SECTIONS, module.run, ["--params", str(args.params)])
    return 0


# -- each command's arguments --------------------------------------------------------------------


def _stage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=STAGES)
    parser.add_argument("--params", default="params.yaml")


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="PATH", help="image files, folders or globs")
    parser.add_argument(
        "--model",
        "--weights",
        type=Path,
        help="an export folder (model.json + safetensors); default: paths.export/model of the sam3ft "
        "checkout you are in (or the one sam3ft is installed from)",
    )
    parser.add_argument("--base", type=Path, help="base weights file, for a delta export only")
    parser.add_argument("--prompt", help="text prompt (default: the classes the model was trained on)")
    parser.add_argument(
        "--threshold",
        type=unit_interval,
        help="keep detections scoring at least this (0..1); default: the model's operating threshold "
        "(evaluate.threshold, stored in model.json)",
    )
    parser.add_argument(
        "--max-dets",
        type=positive_int,
        default=100,
        help="at most this many detections per image and prompt, best first (default: 100)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("predictions"),
        help="folder for detections.json, _annotations.coco.json and overlays/ (default: predictions)",
    )
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads for torch (default: 1)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="backbone weights dtype; auto: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="reduce-overhead",
        metavar="MODE",
        help="torch.compile the model (MODE: reduce-overhead (CUDA graphs), default, "
        "max-autotune-no-cudagraphs; bare --compile: reduce-overhead; what: --compile-scope); compiles "
        "once at start, pays off over many images",
    )
    parser.add_argument(
        "--compile-scope",
        default="all",
        choices=("backbone", "all"),
        help="with --compile: the image backbone and the grounding head (all, the default), or the "
        "backbone only",
    )
    parser.add_argument(
        "--boxes-only",
        action="store_true",
        help="skip the mask head of a model that has one (faster; no masks in detections.json)",
    )


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="an export folder; default: as for predict")
    parser.add_argument("--base", type=Path, help="base weights file, for a delta export only")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        choices=("127.0.0.1", "0.0.0.0", "::"),
        help="127.0.0.1 (this machine only, the default), 0.0.0.0 or :: (all interfaces): LitServe's choices",
    )
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port (default: 8000)")
    parser.add_argument(
        "--threshold",
        type=unit_interval,
        help="default score threshold of requests that send none; default: the model's operating one",
    )
    parser.add_argument("--max-dets", type=positive_int, default=100, help="per image and prompt (100)")
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads for torch (default: 1)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--boxes-only", action="store_true", help="skip the mask head (no masks returned)")
    parser.add_argument(
        "--max-upload-mb", type=positive_int, default=50, help="largest image upload accepted, MB (50)"
    )
    parser.add_argument(
        "--max-batch-size",
        type=positive_int,
        help=f"requests that wait together go through the model as one batch of at most this many "
        f"images (default: {GPU_PREDICT_BATCH} on a GPU, 1 on the CPU)",
    )
    parser.add_argument(
        "--batch-timeout",
        type=seconds,
        default=0.005,
        help="with --max-batch-size above 1: seconds the model worker waits for a batch to fill (0.005)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )


def _params_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params", type=Path, help=f"default: {DEFAULT_PARAMS} of the checkout holding the current folder"
    )


def _summary(args: argparse.Namespace) -> int:
    from sam3ft.metrics.summary import print_summary

    _from_checkout_root(args)
    return print_summary(args.params)


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options: it reads `dvc exp show` of the current repository


def _compare(args: argparse.Namespace) -> int:
    from sam3ft.metrics.summary import print_compare

    return print_compare()


# -- the table and its one error boundary ----------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One subcommand: its argparse setup and the function that runs it and returns the exit code."""

    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str
    description: str | None = None
    """Shown by `sam3ft NAME --help` (None: argparse shows none)."""
    end_now: bool = False
    """Exit without the interpreter's teardown once torch is loaded (`end_now`)."""


COMMANDS = {
    "stage": Command(_stage_arguments, _stage, "run one pipeline stage"),
    "predict": Command(
        _predict_arguments,
        _predict,
        "detect objects with an exported model",
        "Detect objects in images with an exported model. Writes, under --out: detections.json (boxes, "
        "scores, masks per image), _annotations.coco.json (the same as a COCO dataset: pre-labels to "
        "import into Roboflow/CVAT/Label Studio, fix, and export back) and overlays/. A summary goes to "
        "stderr; exit 1 if an image failed (the others are still done).",
        end_now=True,
    ),
    "serve": Command(
        _serve_arguments,
        _serve,
        "answer detection requests over HTTP",
        "Serve an exported model over HTTP (LitServe): POST /predict (multipart: image, optional prompt "
        "and threshold) returns JSON detections; GET /health; GET /info. With SAM3FT_API_KEY set, "
        "requests need the header X-API-Key.",
    ),
    "doctor": Command(_params_argument, _doctor, "check this machine for the configured run"),
    "summary": Command(_params_argument, _summary, "the last evaluate run's decision metrics, a few lines"),
    "compare": Command(
        _compare_arguments, _compare, "the workspace, HEAD and its experiments (dvc exp show): a line each"
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam3ft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.help, description=command.description))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a `Sam3ftError` prints `error: ... fix: ...` and exits 2, as argparse does
    for a bad argument."""
    quiet_known_warnings()  # before a command imports torch, sam3 or litserve
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    try:
        code = command.run(args)
    except Sam3ftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    if argv is None and command.end_now and "torch" in sys.modules:
        end_now(code)
    return code


def end_now(code: int) -> None:
    """End a command-line `predict` without the interpreter's teardown, which finalises every module
    torch, torchvision and sam3 loaded (most of a second on a small CPU). Safe here: its files are
    written and closed (the JSON fsynced by `sam3ft.io`), no child process or thread is left; the
    streams are flushed.
    Only for the real command line (`argv` None): callers of `main([...])` get the code back."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
