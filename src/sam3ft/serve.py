"""`sam3ft serve`: an HTTP endpoint for an exported model, on LitServe (FastAPI + uvicorn underneath).

    POST /predict   multipart form: `image` (a JPEG/PNG file), optional `prompt`, `threshold` (0..1)
                    -> {"detections": [{box_xyxy, score, category_id, prompt (the label),
                        segmentation (COCO RLE, with a mask head)}], "width", "height", "threshold",
                        "model": {preset, weights_sha256, checkpoint_sha256, format},
                        "batch" (images in this request's model batch; batched servers only)}
    GET  /health    "ok" once the model is loaded (503 before)
    GET  /info      the model's version (weights sha256) and the server's settings
    GET  /          a page for people: upload a photo, see the overlay and a table of detections

The model is loaded once, in LitServe's worker process; images get the same EXIF handling, pixel
limit and detection records as `sam3ft predict`. A bad upload is a 4xx with a message and the server
goes on. With `max_batch_size` above 1 (the default on a GPU), requests waiting together (up to
`batch_timeout` seconds for more) go through the model as one batch; a bad upload among them gets
its own 4xx and the others their detections. With SAM3FT_API_KEY set, every route but /health
needs the header `X-API-Key: <key>`, compared in constant time. Logs carry method, path and status
only: never a key or a request body.
"""

from __future__ import annotations

import hmac
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi import HTTPException
from starlette.datastructures import UploadFile
from starlette.responses import HTMLResponse, JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from sam3ft.inference import ImageError, ImageTooLarge, detection_record, open_image

API_KEY_ENV = "SAM3FT_API_KEY"
FIELDS = {"image", "prompt", "threshold"}
# answered without the API key: load balancers probe /health; the page (/) holds no data, and sends
# the key its user types with each request
OPEN_PATHS = {"/health", "/"}


@dataclass(frozen=True)
class ServeConfig:
    """What the worker needs to load the model and answer requests (picklable: LitServe spawns it)."""

    model_dir: Path
    base: Path | None
    device: str
    dtype: str
    threads: int
    threshold: float
    max_dets: int
    prompts: dict[int, str]
    masks: bool
    max_upload_bytes: int
    max_batch_size: int = 1
    batch_timeout: float = 0.0


Request = tuple[Any, dict[int, str], float]  # (image, prompts, threshold), as parse_form checks them


class DetectAPI(ls.LitAPI):
    """One request, one image: decoded and checked, detected, encoded as JSON; with max_batch_size
    above 1, the images of a batch of requests through the model together."""

    def __init__(self, config: ServeConfig, model: dict[str, Any]) -> None:
        super().__init__(
            api_path="/predict", max_batch_size=config.max_batch_size, batch_timeout=config.batch_timeout
        )
        self.config, self.model_info = config, model
        self.predictor: Any = None
        self.batched = config.max_batch_size > 1

    def setup(self, device: str) -> None:
        """Load the model in the worker process (imports torch and sam3 there, not in the server)."""
        from sam3ft.console import quiet_known_warnings

        quiet_known_warnings()  # a spawned worker starts with Python's default filters
        from sam3ft.model.export import load_export
        from sam3ft.model.predict import Predictor, resolve_device, resolve_dtype
        from sam3ft.stages import pin_threads

        pin_threads(self.config.threads)
        name = resolve_device(self.config.device)
        dtype = resolve_dtype(self.config.dtype, name)
        model, spec, _ = load_export(self.config.model_dir, self.config.base, dtype=dtype)
        self.predictor = Predictor(model, spec.image_size, name, dtype, masks=self.config.masks)

    # `request` and encode_response's return stay unannotated: LitServe reads these annotations as
    # the endpoint's request/response types (litserve/server.py `_register_api_endpoints`); without
    # one it passes the starlette Request's parsed form and answers with JSON
    def decode_request(self, request, **kwargs: Any) -> Request | HTTPException:  # type: ignore[no-untyped-def]
        """(image, prompts, threshold) from the form; 4xx with a message for anything else (batched:
        returned, not raised, as LitServe would fail the whole batch with it)."""
        try:
            return parse_form(request, self.config)
        except HTTPException as exc:
            if self.batched:
                return exc
            raise

    def batch(self, inputs: list[Request | HTTPException]) -> list[Request | HTTPException]:
        return inputs

    def unbatch(self, output: list[dict[str, Any] | HTTPException]) -> list[dict[str, Any] | HTTPException]:
        return output

    def predict(self, x: Any, **kwargs: Any) -> Any:
        """One request's reply; batched, the replies of a list of requests."""
        if not self.batched:
            return self.predict_many([x])[0]
        return self.predict_many(x)

    def predict_many(self, requests: list[Request | HTTPException]) -> list[dict[str, Any] | HTTPException]:
        """Replies in request order; the images of requests with the same prompts as one model batch
        (refused requests keep their HTTPException)."""
        replies: list[dict[str, Any] | HTTPException] = list(requests)  # type: ignore[arg-type]
        groups: dict[tuple[tuple[int, str], ...], list[int]] = {}
        for i, request in enumerate(requests):
            if not isinstance(request, HTTPException):
                groups.setdefault(tuple(request[1].items()), []).append(i)
        for key, members in groups.items():
            prompts = dict(key)
            images = [requests[i][0] for i in members]  # type: ignore[index]
            thresholds = [requests[i][2] for i in members]  # type: ignore[index]
            found = self.predictor.predict_batch(images, prompts, self.config.max_dets, thresholds)
            for i, image, threshold, detections in zip(members, images, thresholds, found, strict=True):
                replies[i] = {
                    "detections": [detection_record(d, prompts) for d in detections],
                    "width": image.width,
                    "height": image.height,
                    "threshold": threshold,
                    "model": self.model_info,
                }
                if self.batched:  # how many images shared this request's model batch
                    replies[i]["batch"] = len(members)  # type: ignore[index]
        return replies

    def encode_response(self, output, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(output, HTTPException):  # a refused request of a batch: FastAPI's error body
            return JSONResponse({"detail": output.detail}, status_code=output.status_code)
        return output


def parse_form(form: Any, config: ServeConfig) -> tuple[Any, dict[int, str], float]:
    """The checked request: an `image` file (EXIF applied, under the pixel limit), the prompt and the
    threshold (the served defaults when absent). Raises HTTPException 413/415/422."""
    if not hasattr(form, "keys"):
        raise HTTPException(415, "send multipart/form-data with an `image` file field")
    unknown = sorted(set(form.keys()) - FIELDS)
    if unknown:
        raise HTTPException(422, f"unknown form field(s) {unknown}; accepted: {sorted(FIELDS)}")
    threshold = parse_threshold(form.get("threshold"), config.threshold)
    prompt = form.get("prompt")
    prompts = {1: prompt.strip()} if isinstance(prompt, str) and prompt.strip() else config.prompts
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise HTTPException(422, "missing `image`: a file field with the photo (JPEG or PNG)")
    data = upload.file.read(config.max_upload_bytes + 1)
    if len(data) > config.max_upload_bytes:
        raise HTTPException(413, f"image larger than {config.max_upload_bytes / 2**20:.0f} MB")
    name = upload.filename or "image"
    try:
        image = open_image(io.BytesIO(data), name)
    except ImageError as exc:
        status = 413 if isinstance(exc, ImageTooLarge) else 415
        raise HTTPException(status, f"{exc.message}; {exc.fix}") from None
    return image, prompts, threshold


def parse_threshold(value: Any, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise HTTPException(422, f"threshold {str(value)[:20]!r} is not a number") from None
    if not 0.0 <= threshold <= 1.0:
        raise HTTPException(422, f"threshold {threshold} is outside 0..1")
    return threshold


class ApiKeyMiddleware:
    """Requests need `X-API-Key` equal to the key (constant-time compare), except OPEN_PATHS."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"x-api-key", b"")
            if not hmac.compare_digest(given, self.key):
                response = JSONResponse({"detail": "missing or wrong X-API-Key header"}, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class UploadGuardMiddleware:
    """POST bodies: multipart/form-data (else 415) with a Content-Length of at most `limit` bytes
    (else 411/413), refused before the body is read; LitServe would parse anything else as JSON."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = dict(scope["headers"])
            length = headers.get(b"content-length", b"")
            problem = None
            if not headers.get(b"content-type", b"").startswith(b"multipart/form-data"):
                problem = 415, "send multipart/form-data with an `image` file field"
            elif not length.isdigit():
                problem = 411, "Content-Length required"
            elif int(length) > self.limit:
                problem = 413, f"request body above {self.limit / 2**20:.0f} MB"
            if problem:
                await JSONResponse({"detail": problem[1]}, status_code=problem[0])(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_server(config: ServeConfig, model: dict[str, Any], timeout: float = 60.0) -> ls.LitServer:
    """The LitServer for `config`: one worker holding the model, the middlewares above."""
    # the form's other fields and its boundaries: a few KB above the image itself
    middlewares: list[Any] = [(UploadGuardMiddleware, {"limit": config.max_upload_bytes + 64 * 1024})]
    key = os.environ.get(API_KEY_ENV)
    if key:
        middlewares.append((ApiKeyMiddleware, {"key": key}))
    accelerator = "cpu" if config.device == "cpu" else "auto"
    server = ls.LitServer(
        DetectAPI(config, model),
        accelerator=accelerator,
        devices=1,
        workers_per_device=1,
        timeout=timeout,
        middlewares=middlewares,
        model_metadata={
            "model": model,
            "threshold": config.threshold,
            "max_dets": config.max_dets,
            "max_batch_size": config.max_batch_size,
            "batch_timeout": config.batch_timeout,
        },
    )
    page = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")
    # LitServe answers GET / with "litserve running" (litserve/server.py `register_endpoints`);
    # routes match in order, so its route goes and ours takes the path
    routes = server.app.router.routes
    routes[:] = [r for r in routes if getattr(r, "path", None) != "/"]
    server.app.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"], include_in_schema=False)
    return server
