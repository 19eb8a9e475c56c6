"""`sam3ft serve`: the real server (LitServe) on loopback, a real tiny export with a mask head, a real
HTTP client. One server for the module: it starts in seconds but loads the model in its own process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import REPO, SAMPLE, write_tiny_export
from sam3ft.console import HARMLESS
from sam3ft.train.run import free_port
from test_predict_inputs import RED, close, exif_jpeg, png_header

KEY = "test-key-0123456789abcdef"  # SAM3FT_API_KEY of the server under test


@contextlib.contextmanager
def running_server(tmp: Path, model: Path, *options: str) -> Iterator[dict]:
    """`sam3ft serve` on a free loopback port until /health answers; stopped (SIGTERM) after."""
    port, log = free_port(), tmp / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "SAM3FT_API_KEY": KEY}
    command = [sys.executable, "-m", "sam3ft", "serve", "--model", str(model), "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, "--device", "cpu", "--max-upload-mb", "1", *options],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"no /health in 90 s:\n{log.read_text()}"
            time.sleep(0.3)
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 2  # LitServe's API server and the model worker (plus its helpers)
        model_json = json.loads((model / "model.json").read_text())
        yield {"url": url, "log": log, "model": model_json, "model_dir": model}
    finally:
        process.terminate()  # SIGTERM, as `kill`, docker stop or systemd send it
        process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while running(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running(children), "server processes outlived SIGTERM"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("serve")
    with running_server(tmp, write_tiny_export(tmp / "model", masks=True, threshold=0.25)) as running:
        yield running


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie left for its parent to reap counts as gone)."""
    left = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
    return left


def post(server: dict, files: dict | None = None, data: dict | None = None, key: str | None = KEY, **kw):
    headers = {"X-API-Key": key} if key is not None else {}
    return httpx.post(f"{server['url']}/predict", files=files, data=data, headers=headers, timeout=60, **kw)


def photo_bytes() -> bytes:
    return sorted((SAMPLE / "valid").glob("*.jpg"))[0].read_bytes()


def test_predict_returns_boxes_masks_and_the_model_version(server):
    reply = post(server, files={"image": ("a.jpg", photo_bytes(), "image/jpeg")}, data={"threshold": "0"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["width"], body["height"], body["threshold"]) == (512, 512, 0.0)
    assert body["model"]["weights_sha256"] == server["model"]["weights_sha256"]
    dets = body["detections"]
    assert len(dets) == 20  # every query of the tiny model at threshold 0
    assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
    for det in dets:
        x0, y0, x1, y1 = det["box_xyxy"]
        assert 0 <= x0 <= x1 <= 512 and 0 <= y0 <= y1 <= 512
        assert det["prompt"] == "fuse neutrals" and det["segmentation"]["size"] == [512, 512]
    # the default threshold is the model's operating one (0.25 in this export)
    default = post(server, files={"image": ("a.jpg", photo_bytes(), "image/jpeg")}).json()
    assert default["threshold"] == 0.25
    assert default["detections"] == [d for d in dets if d["score"] >= 0.25]
    prompted = post(
        server, files={"image": ("a.jpg", photo_bytes())}, data={"prompt": "screw", "threshold": "0"}
    )
    assert {d["prompt"] for d in prompted.json()["detections"]} == {"screw"}


def test_the_server_says_what_it_serves_and_prints_no_known_harmless_warning(server):
    """One line of ours names the model, its settings and the URL (never the key). The model worker
    has imported torch and sam3 once /health answers; the server process and the worker (a process
    of its own) filter what the stages filter."""
    assert post(server, files={"image": ("a.jpg", photo_bytes(), "image/jpeg")}).status_code == 200
    log = server["log"].read_text()
    assert "Uvicorn running" in log
    url = server["url"]
    model = server["model"]
    named = f"({model['spec']['name']}, weights {model['weights_sha256'][:12]}), boxes and masks"
    assert f"serve: {server['model_dir']} {named}, threshold 0.25, device cpu, batch up to 1" in log, log
    assert f"-> POST {url}/predict, page {url}/; SAM3FT_API_KEY set: requests need X-API-Key" in log, log
    assert KEY not in log
    for message, _ in HARMLESS:
        assert not re.search(message, log), log


def test_exif_orientation_is_applied(server, tmp_path):
    photo = exif_jpeg(tmp_path / "phone.jpg", 6).read_bytes()  # stored 100 x 200, upright 200 x 100
    body = post(server, files={"image": ("phone.jpg", photo)}, data={"threshold": "0"}).json()
    assert (body["width"], body["height"]) == (200, 100)
    assert all(d["box_xyxy"][2] <= 200 and d["box_xyxy"][3] <= 100 for d in body["detections"])
    assert all(d["segmentation"]["size"] == [100, 200] for d in body["detections"])
    assert close(Image.open(io.BytesIO(photo)).convert("RGB").getpixel((50, 50)), RED)


@pytest.mark.parametrize(
    ("files", "data", "status", "message"),
    [
        ({"image": ("notes.txt", b"hello, not a photo")}, None, 415, "notes.txt: not an image"),
        ({"image": ("big.png", png_header(20_000, 20_000))}, None, 413, "above the 67 MP limit"),
        ({"image": ("a.jpg", b"x" * (2 * 2**20))}, None, 413, "request body above 1 MB"),
        ({"image": ("a.jpg", b"x")}, {"colour": "red"}, 422, "unknown form field(s) ['colour']"),
        ({"picture": ("a.jpg", b"x")}, None, 422, "unknown form field(s) ['picture']"),
        (None, {"threshold": "0.5"}, 415, "send multipart/form-data"),
        ({"image": ("a.jpg", b"x")}, {"threshold": "2"}, 422, "threshold 2.0 is outside 0..1"),
        ({"image": ("a.jpg", b"x")}, {"threshold": "high"}, 422, "'high' is not a number"),
    ],
)
def test_bad_uploads_are_4xx_with_a_message_and_the_server_stays_up(server, files, data, status, message):
    reply = post(server, files=files, data=data)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["detail"]
    assert httpx.get(f"{server['url']}/health", timeout=5).text == "ok"


def test_json_body_is_refused(server):
    reply = httpx.post(f"{server['url']}/predict", json={"image": "a.jpg"}, headers={"X-API-Key": KEY})
    assert reply.status_code == 415 and "multipart/form-data" in reply.json()["detail"]


def test_api_key_is_required_but_not_for_health(server):
    files = {"image": ("a.jpg", photo_bytes())}
    assert post(server, files=files, key=None).status_code == 401
    assert post(server, files=files, key="wrong").status_code == 401
    assert post(server, files=files, key=KEY[:-1]).status_code == 401
    assert httpx.get(f"{server['url']}/health").status_code == 200
    assert httpx.get(f"{server['url']}/info").status_code == 401
    assert httpx.get(f"{server['url']}/info", headers={"X-API-Key": KEY}).json()["model"]["threshold"] == 0.25


def test_page_for_people_is_one_self_contained_file(server):
    reply = httpx.get(f"{server['url']}/")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    page = reply.text
    assert '<input type="file" name="image"' in page and 'fetch("predict"' in page
    assert "http://" not in page and "https://" not in page  # no CDN, nothing fetched from elsewhere


def test_burst_of_16_concurrent_requests(server):
    photo = photo_bytes()
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: post(server, files={"image": ("a.jpg", photo)}), range(16)))
    assert [r.status_code for r in replies] == [200] * 16
    assert all(r.json() == replies[0].json() for r in replies)  # one model, same answer every time


def test_batched_requests_get_their_own_replies_and_a_bad_upload_its_own_4xx(server, tmp_path):
    """--max-batch-size 4 on the CPU: concurrent requests share model batches (their replies say
    so); each reply equals the unbatched server's for its image, threshold and prompt."""
    photo, other = photo_bytes(), sorted((SAMPLE / "valid").glob("*.jpg"))[1].read_bytes()
    asks = [
        ({"image": ("a.jpg", photo)}, {"threshold": "0"}),
        ({"image": ("b.jpg", other)}, {"threshold": "0.2"}),
        ({"image": ("c.jpg", b"not an image")}, {}),
        ({"image": ("d.jpg", other)}, {"prompt": "screw", "threshold": "0"}),
    ] * 3
    expected = [post(server, files=files, data=data) for files, data in asks]
    options = ("--max-batch-size", "4", "--batch-timeout", "0.2")
    with running_server(tmp_path, server["model_dir"], *options) as batched:
        with ThreadPoolExecutor(len(asks)) as pool:
            replies = list(pool.map(lambda ask: post(batched, files=ask[0], data=ask[1]), asks))
        info = httpx.get(f"{batched['url']}/info", headers={"X-API-Key": KEY}).json()
    assert [r.status_code for r in replies] == [200, 200, 415, 200] * 3
    assert replies[2].json() == expected[2].json() and expected[2].status_code == 415
    for got, want in zip(replies, expected, strict=True):
        if got.status_code == 200:
            a, b = got.json(), want.json()
            assert {k: v for k, v in a.items() if k not in ("detections", "batch")} == {
                k: v for k, v in b.items() if k != "detections"
            }
            assert [d["prompt"] for d in a["detections"]] == [d["prompt"] for d in b["detections"]]
            assert [d["score"] for d in a["detections"]] == pytest.approx(
                [d["score"] for d in b["detections"]], abs=1e-5
            )
    assert info["model"]["max_batch_size"] == 4
    sizes = [r.json()["batch"] for r in replies if r.status_code == 200]
    assert max(sizes) > 1 and all(1 <= n <= 4 for n in sizes) and "batch" not in expected[0].json()


def test_batch_size_defaults_to_8_on_a_gpu_and_1_on_the_cpu(monkeypatch):
    import litserve.connector

    from sam3ft.__main__ import default_batch_size, main

    assert default_batch_size("cpu") == 1 and default_batch_size("cuda:1") == 8
    monkeypatch.setattr(litserve.connector, "check_cuda_with_nvidia_smi", lambda: 0)
    assert default_batch_size("auto") == 1
    monkeypatch.setattr(litserve.connector, "check_cuda_with_nvidia_smi", lambda: 2)
    assert default_batch_size("auto") == 8
    for bad in ("0", "11", "soon"):  # 0 would make LitServe's batching loop spin without pause
        with pytest.raises(SystemExit):
            main(["serve", "--batch-timeout", bad])


def test_logs_hold_no_key_and_no_body(server):
    post(server, files={"image": ("secret-name.jpg", b"BODYMARKER" * 10)})
    time.sleep(0.5)
    log = Path(server["log"]).read_bytes()
    assert b"POST /predict" in log  # the access log is there
    assert KEY.encode() not in log and b"BODYMARKER" not in log


def browser_page():
    """A headless Chromium page through Playwright, or a skip where either is missing."""
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    return sync_api.sync_playwright(), executable


def test_page_in_a_browser_draws_detections_and_decodes_masks(server, tmp_path):
    """The page as a person uses it: pick a photo, type the key, press Detect; its table lists the
    detections and its RLE decoder gives pycocotools' runs."""
    playwright, executable = browser_page()
    photo = sorted((SAMPLE / "valid").glob("*.jpg"))[0]
    expected = post(server, files={"image": ("a.jpg", photo.read_bytes())}, data={"threshold": "0.2"}).json()
    assert expected["detections"], "pick a threshold that keeps some detections"
    with playwright as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{server['url']}/")
        page.set_input_files("input[name=image]", str(photo))
        page.fill("input[name=threshold]", "0.2")
        page.fill("#key", KEY)
        page.click("button")
        page.wait_for_function("document.getElementById('status').textContent.includes('detection(s)')")
        rows = page.eval_on_selector_all("#table tbody tr", "rows => rows.map(r => r.innerText.split('\\t'))")
        rle = expected["detections"][0]["segmentation"]
        counts = page.evaluate("s => rleCounts(s)", rle["counts"])
        size = page.eval_on_selector("#canvas", "c => [c.width, c.height]")
        browser.close()
    assert errors == []
    assert len(rows) == len(expected["detections"])
    assert [float(r[2]) for r in rows] == [round(d["score"], 3) for d in expected["detections"]]
    assert size == [512, 512]
    flat = mask_utils.decode({**rle, "counts": rle["counts"].encode()}).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    assert counts == (runs if flat[0] == 0 else [0, *runs])  # COCO runs start with a run of zeros


def test_a_busy_port_is_refused_before_the_model_loads(server):
    port = server["url"].rsplit(":", 1)[1]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    model = ["--model", str(Path(server["model_dir"]))]
    done = subprocess.run(
        [sys.executable, "-m", "sam3ft", "serve", *model, "--port", port],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "fix: pick another --port" in done.stderr


def test_a_model_that_does_not_load_ends_the_server_with_a_fix(server, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(server["model_dir"], broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:1000])
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sam3ft", "serve", "--model", str(broken), "--port", str(free_port())]
    done = subprocess.run([*command, "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert f"error: the model in {broken} did not load in the server's worker" in done.stderr
