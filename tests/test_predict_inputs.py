"""`sam3ft predict` on what users give it: bad arguments (refused before torch loads), phone photos
with EXIF orientation, images above the pixel limit, and the COCO pre-labels prepare ingests back."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image
from pycocotools.coco import COCO

from conftest import REPO, write_tiny_export
from sam3ft.__main__ import default_model_dir
from sam3ft.__main__ import main as cli
from sam3ft.data.coco import EXIF_ORIENTATION, load_split
from sam3ft.errors import Sam3ftError
from sam3ft.inference import MAX_PIXELS, open_image, predict_images
from sam3ft.model.predict import Predictor
from test_predict import BOX_MASK, FixedMaskModel, FixedModel, fake_export

RED, BLUE = (230, 20, 20), (20, 20, 230)


def test_bad_arguments_exit_2_with_a_fix_and_no_torch_import(tmp_path):
    """Each refused in a fresh interpreter that never imports torch (the model would take seconds)."""
    model = fake_export(tmp_path / "model")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.jpg")
    ok = str(tmp_path / "ok.jpg")
    cases = {
        "missing image": ["predict", str(tmp_path / "gone.jpg"), "--model", str(model)],
        "threshold 2": ["predict", ok, "--model", str(model), "--threshold", "2"],
        "max-dets 0": ["predict", ok, "--model", str(model), "--max-dets", "0"],
        "missing model": ["predict", ok, "--model", str(tmp_path / "nowhere")],
        "delta, no base": ["predict", ok, "--model", str(fake_export(tmp_path / "delta", mode="delta"))],
        "serve, port 80": ["serve", "--model", str(model), "--port", "80"],
    }
    script = (
        "import json, sys\nfrom sam3ft.__main__ import main\ncodes = {}\n"
        f"for name, argv in {cases!r}.items():\n"
        "    try:\n        codes[name] = main(argv)\n"
        "    except SystemExit as exc:\n        codes[name] = exc.code\n"
        "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "src")}
    )
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"codes": dict.fromkeys(cases, 2), "torch": False}
    assert f"no such file or folder: {tmp_path / 'gone.jpg'}" in done.stderr
    assert (
        "--threshold: 2 is outside 0..1" in done.stderr and "--max-dets: 0 must be 1 or more" in done.stderr
    )
    assert f"{tmp_path / 'nowhere'} is not a folder: not a sam3ft export" in done.stderr
    assert "is a delta export: it needs the base weights" in done.stderr
    assert "--port: 80 is outside 1024..65535" in done.stderr
    assert done.stderr.count("fix: ") == 3  # the three that are ours; argparse prints its usage instead


def test_default_model_is_the_checkouts_export(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"paths": {"export": "out/export"}}))
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    with pytest.raises(Sam3ftError, match=r"has no exported model yet") as info:
        default_model_dir()
    assert "dvc repro" in str(info.value)
    fake_export(tmp_path / "out" / "export" / "model")
    assert default_model_dir() == tmp_path / "out" / "export" / "model"  # found from a subfolder


def exif_jpeg(path: Path, orientation: int) -> Path:
    """A 100 x 200 (w x h) JPEG as stored, red top half, blue bottom, with an EXIF orientation."""
    image = Image.new("RGB", (100, 200), BLUE)
    image.paste(RED, (0, 0, 100, 100))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    image.save(path, exif=exif, quality=95)
    return path


def close(pixel: tuple[int, ...], color: tuple[int, int, int]) -> bool:
    return all(abs(a - b) < 40 for a, b in zip(pixel, color, strict=True))


def test_exif_rotated_photo_is_scored_upright(tmp_path):
    """Orientation 6 (stored sideways, viewers turn it 90 degrees clockwise): 200 x 100 upright, red on
    the right. Predict's pixels are prepare's, and the boxes are in that upright frame."""
    photo = exif_jpeg(tmp_path / "phone.jpg", 6)
    upright = open_image(photo, "phone.jpg")
    assert upright.size == (200, 100)
    assert close(upright.getpixel((190, 50)), RED) and close(upright.getpixel((10, 50)), BLUE)
    model = FixedModel()
    predict_images(Predictor(model, 28), [photo], {1: "fuse"}, 0.5, 5, tmp_path / "out")
    (record,) = json.loads((tmp_path / "out" / "detections.json").read_text())["images"]
    assert (record["width"], record["height"]) == (200, 100)
    # FixedModel's box is cx 0.5, cy 0.5, w 0.5, h 0.2 of the image it was given: the upright one
    assert record["detections"][0]["box_xyxy"] == [50.0, 40.0, 150.0, 60.0]


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height (no pixel data): enough for PIL to read its size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_images_above_the_pixel_limit_fail_alone(tmp_path, monkeypatch, capsys):
    """One above the limit and one above twice it (PIL refuses those at open): each a clear failure;
    the photo between them is still scored and detections.json is written."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a_big.png").write_bytes(png_header(10_000, 10_000))  # 100 MP
    Image.new("RGB", (200, 100)).save(folder / "b_ok.png")
    (folder / "c_huge.png").write_bytes(png_header(20_000, 20_000))  # 400 MP
    assert MAX_PIXELS < 10_000 * 10_000
    import sam3ft.model.export as export

    spec = SimpleNamespace(image_size=28)
    monkeypatch.setattr(export, "load_export", lambda d, b, dtype: (FixedModel(), spec, {}))
    model, out = fake_export(tmp_path / "model"), tmp_path / "out"
    assert cli(["predict", str(folder), "--model", str(model), "--out", str(out)]) == 1
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [r["image"] for r in written["images"]] == [str(folder / "b_ok.png")]
    assert written["failed"] == [str(folder / "a_big.png"), str(folder / "c_huge.png")]
    assert written["errors"][str(folder / "a_big.png")] == (
        f"{folder / 'a_big.png'}: 10000x10000 = 100 MP is above the 67 MP limit"
    )
    assert "above the 67 MP limit" in written["errors"][str(folder / "c_huge.png")]
    err = capsys.readouterr().err
    assert "Traceback" not in err and "fix: downscale it" in err


def test_prelabels_are_a_split_prepare_and_pycocotools_accept(tmp_path):
    """Masks traced to polygons; an EXIF-rotated photo declared at its upright size (as prepare checks)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (200, 100), (90, 90, 90)).save(photos / "plain.png")
    exif_jpeg(photos / "phone.jpg", 6)  # 200 x 100 upright, like FixedMaskModel's masks
    predict_images(
        Predictor(FixedMaskModel(), 28), sorted(photos.iterdir()), {1: "fuse"}, 0.5, 5, tmp_path / "out"
    )
    split = tmp_path / "next-round" / "train"
    shutil.copytree(photos, split)
    shutil.copy(tmp_path / "out" / "_annotations.coco.json", split)
    loaded = load_split(split, "train")
    assert [(i["file_name"], i["width"], i["height"]) for i in loaded.images] == [
        ("phone.jpg", 200, 100),
        ("plain.png", 200, 100),
    ]
    assert [a["bbox"] for a in loaded.annotations] == [[50.0, 40.0, 100.0, 20.0]] * 2
    rewritten = "image id=1 (phone.jpg): rewritten by prepare: exif-orientation-6"
    assert loaded.warnings == [f"{split / '_annotations.coco.json'}: {rewritten}"]
    coco = COCO(str(split / "_annotations.coco.json"))
    assert coco.getCatIds() == [1] and len(coco.getAnnIds()) == 2
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[2]))[0]
    assert ann["score"] == 0.839 and ann["area"] == BOX_MASK.sum().item()
    # the traced polygon rasterises back to the mask, up to its one-pixel outline
    traced = coco.annToMask(ann).astype(bool)
    assert (traced ^ BOX_MASK.numpy()).sum() <= 2 * (100 + 20)


def test_real_tiny_export_prelabels_round_trip(tmp_path):
    """The real CLI, a real export with a mask head, the sample's photos: its COCO file is a split."""
    model = write_tiny_export(tmp_path / "model", masks=True)
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((REPO / "data" / "find-fuse-neutrals-v5" / "valid").glob("*.jpg"))[:2]:
        shutil.copy(path, photos)
    out = tmp_path / "out"
    args = ["predict", str(photos), "--model", str(model), "--out", str(out), "--threshold", "0"]
    # the command line as users run it: it ends without interpreter teardown (`end_now`)
    env = {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PATH": os.environ["PATH"]}
    done = subprocess.run(
        [sys.executable, "-m", "sam3ft", *args, "--max-dets", "3"], capture_output=True, env=env
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr.decode().endswith(
        f"2 image(s), 6 detection(s) >= 0.0 -> {out / 'detections.json'}, "
        f"pre-labels {out / '_annotations.coco.json'}, overlays {out / 'overlays'}; 0 failed\n"
    )
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(
        p.stem + ".jpg" for p in photos.iterdir()
    )
    shutil.copy(out / "_annotations.coco.json", photos)
    split = load_split(photos, "train")
    assert len(split.images) == 2 and len(split.annotations) == 6
    assert all(a["segmentation"] and len(a["segmentation"][0]) >= 6 for a in split.annotations)
    assert len(COCO(str(photos / "_annotations.coco.json")).getAnnIds()) == 6


def test_model_building_skips_sam3_and_timm_package_inits_until_used():
    """Start-up: building an image model never runs sam3's or timm's `__init__.py` (video predictors,
    every timm architecture); their names still resolve on first use."""
    script = (
        "import sys\nimport sam3ft.model.build, sam3ft.model.predict\n"
        "heavy = ('sam3.model_builder', 'timm.models', 'sam3.train.trainer', 'sam3.train.loss.loss_fns')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "from sam3 import build_sam3_image_model\nimport timm\n"
        "print(callable(build_sam3_image_model), callable(timm.create_model), timm.__version__ > '0')\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "src")},
    )
    assert done.stdout.splitlines() == ["[]", "True True True"], done.stderr
