"""A user's own Roboflow export as it really comes: train only, augmented copies, leaks, garbage.

Each test writes a small synthetic export (a few 32x24 images) and runs the prepare stage's own
functions on it; nothing is mocked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageFile

from conftest import SAMPLE, write_params
from sam3ft.data.coco import MAX_PIXELS, check_objects_per_image, load_split
from sam3ft.data.doctor import dataset_checks
from sam3ft.data.dvc_pin import check_pinned_remote, pinned_outputs
from sam3ft.data.roboflow import plan_dataset
from sam3ft.data.splits import photo_groups, photo_key
from sam3ft.errors import ConfigError, DatasetError
from sam3ft.layout import ANNOTATIONS_FILE
from sam3ft.params import CARVED_SPLITS, Evaluate, Params, Paths, Prepare
from sam3ft.preflight import Check
from sam3ft.stages import prepare as prepare_stage

PARENT = {"id": 0, "name": "things", "supercategory": "none"}  # Roboflow's parent category
CLASS = {"id": 1, "name": "thing", "supercategory": "things"}


def write_image(path: Path, size: tuple[int, int] = (32, 24)) -> None:
    """A flat image whose colour derives from its path, so distinct files have distinct bytes."""
    crc = zlib.crc32(path.as_posix().encode())
    Image.new("RGB", size, (crc & 255, (crc >> 8) & 255, (crc >> 16) & 255)).save(path)


def make_split(
    root: Path, split: str, names: list[str], boxes: int | list[int] = 1, category: int = 1
) -> dict[str, Any]:
    """`root/split/` with one image per name and `boxes` (per image, or one count for all) boxes each."""
    folder = root / split
    folder.mkdir(parents=True)
    counts = boxes if isinstance(boxes, list) else [boxes] * len(names)
    images, annotations = [], []
    for index, (name, count) in enumerate(zip(names, counts, strict=True)):
        write_image(folder / name)
        images.append({"id": index, "file_name": name, "width": 32, "height": 24})
        for _ in range(count):
            box = [1, 1, 10, 10]
            annotations.append(
                {"id": len(annotations), "image_id": index, "category_id": category, "bbox": box}
            )
    coco = {"images": images, "annotations": annotations, "categories": [PARENT, CLASS]}
    (folder / ANNOTATIONS_FILE).write_text(json.dumps(coco))
    return coco


def names(count: int, prefix: str = "photo") -> list[str]:
    return [f"{prefix}-{i}.jpg" for i in range(count)]


def roboflow_names(photos: int, copies: int) -> list[str]:
    """Roboflow's names for `copies` augmented versions of each of `photos` source photos."""
    return [
        f"IMG_{p}_jpg.rf.{zlib.crc32(f'{p}-{c}'.encode()):08x}.jpg"
        for p in range(photos)
        for c in range(copies)
    ]


def plan(root: Path, **kwargs: Any) -> Any:
    options = {"shares": dict(CARVED_SPLITS), "seed": 0, "allow_leakage": False, **kwargs}
    return plan_dataset(root, **options)


def run_prepare(
    tmp_path: Path, dataset: str = "own", eval_splits: list[str] | None = None, **prepare: Any
) -> Path:
    """The prepare stage on `tmp_path/data/<dataset>`; returns the prepared folder."""
    out = tmp_path / "prepared"
    paths = Paths(
        data=str(tmp_path / "data"),
        base="b",
        prepared=str(out),
        train="t",
        baseline="z",
        eval="e",
        export="x",
        scratch="s",
        check="c",
    )
    p = Params(
        {
            "paths": paths,
            "prepare": Prepare(dataset=dataset, **prepare),
            "evaluate": Evaluate(splits=eval_splits, max_dets=100, threshold=0.4, overlays=0),
        }
    )
    prepare_stage.run(p)
    return out


def split_names(prepared: Path, split: str) -> list[str]:
    return [
        img["file_name"] for img in json.loads((prepared / split / ANNOTATIONS_FILE).read_text())["images"]
    ]


# --- 1. seeded splitting ---------------------------------------------------------------------------------


def test_train_only_export_of_four_images_gets_valid_and_test(tmp_path: Path, caplog: Any) -> None:
    root = tmp_path / "data" / "own"
    make_split(root, "train", names(4))
    prepared = run_prepare(tmp_path)
    sides = {s: split_names(prepared, s) for s in ("train", "valid", "test")}
    assert [len(v) for v in sides.values()] == [2, 1, 1]
    assert sorted(sides["train"] + sides["valid"] + sides["test"]) == names(4)  # every image once
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["carved"]["valid"] == {
        "from": "train",
        "share": 0.2,
        "seed": 0,
        "photos": 1,
        "images": sides["valid"],
    }
    assert stats["carved"]["test"]["images"] == sides["test"]
    assert {k: v["images"] for k, v in stats["splits"].items()} == {"train": 2, "valid": 1, "test": 1}
    assert "warnings" not in stats  # carving is recorded under "carved", not as a warning
    carved = [r.message for r in caplog.records if "carved" in r.message]
    assert len(carved) == 2 and "no 'valid' split exported: carved 1 of 4 source photo(s)" in carved[0]
    assert sides["valid"][0] in carved[0] and "prepare.split.valid=0.2, prepare.seed=0" in carved[0]
    from sam3ft.stages.evaluate import prepared_eval_splits  # imports torch: only where needed

    assert prepared_eval_splits(prepared) == ["valid", "test"]  # evaluate.splits: null


def test_carving_is_seeded(tmp_path: Path) -> None:
    root = tmp_path / "own"
    make_split(root, "train", names(20))
    first = {s.name: [i["file_name"] for i in s.images] for s in plan(root).splits}
    assert first == {s.name: [i["file_name"] for i in s.images] for s in plan(root).splits}
    assert [len(v) for v in first.values()] == [14, 4, 2]  # round(0.2 x 20), round(0.1 x 20)
    other = {s.name: [i["file_name"] for i in s.images] for s in plan(root, seed=1).splits}
    assert other["valid"] != first["valid"]
    assert first["train"] == [n for n in names(20) if n in first["train"]]  # export order kept


def test_roboflow_augmented_copies_stay_together(tmp_path: Path) -> None:
    root = tmp_path / "own"
    make_split(root, "train", roboflow_names(photos=6, copies=3))
    assert photo_key("IMG_3_jpg.rf.0a1b2c3d.jpg") == "IMG_3_jpg" and photo_key("IMG_3.jpg") == "IMG_3.jpg"
    result = plan(root)
    photos = {s.name: {photo_key(i["file_name"]) for i in s.images} for s in result.splits}
    assert {k: len(v) for k, v in photos.items()} == {"train": 4, "valid": 1, "test": 1}
    assert [len(s.images) for s in result.splits] == [12, 3, 3]
    assert not (photos["train"] & photos["valid"] or photos["train"] & photos["test"])


def test_exported_splits_are_kept_untouched(tmp_path: Path) -> None:
    shutil.copytree(SAMPLE, tmp_path / "data" / "sample")
    prepared = run_prepare(tmp_path, dataset="sample")
    stats = json.loads((prepared / "stats.json").read_text())
    assert "carved" not in stats
    assert {k: v["images"] for k, v in stats["splits"].items()} == {"train": 24, "valid": 5, "test": 6}
    for split in ("train", "valid", "test"):
        exported = json.loads((SAMPLE / split / ANNOTATIONS_FILE).read_text())["images"]
        assert split_names(prepared, split) == [img["file_name"] for img in exported]


def test_missing_test_only_is_carved_and_valid_kept(tmp_path: Path) -> None:
    root = tmp_path / "own"
    make_split(root, "train", names(10))
    make_split(root, "valid", names(2, "val"))
    result = plan(root)
    assert [(s.name, len(s.images)) for s in result.splits] == [("train", 9), ("valid", 2), ("test", 1)]
    assert list(result.carved) == ["test"]


def test_one_image_cannot_be_split(tmp_path: Path) -> None:
    make_split(tmp_path / "own", "train", names(1))
    with pytest.raises(DatasetError, match=r"1 source photo.*too few to carve") as info:
        plan(tmp_path / "own")
    assert "export a 'valid' split" in (info.value.fix or "")


def test_two_images_give_valid_and_skip_test(tmp_path: Path) -> None:
    make_split(tmp_path / "own", "train", names(2))
    result = plan(tmp_path / "own")
    assert [(s.name, len(s.images)) for s in result.splits] == [("train", 1), ("valid", 1)]
    assert any(
        "no 'test' split exported and none carved (train keeps too few photos" in w for w in result.warnings
    )


def test_no_valid_and_no_share_for_it(tmp_path: Path) -> None:
    make_split(tmp_path / "own", "train", names(4))
    with pytest.raises(DatasetError, match=r"prepare\.split\.valid is 0"):
        plan(tmp_path / "own", shares={"test": 0.1})


@pytest.mark.parametrize(
    ("split", "fragment"),
    [
        ({"validation": 0.2}, "prepare.split="),
        ({"valid": 1.0}, "prepare.split.valid=1.0"),
        ({"valid": 0.6, "test": 0.4}, "summing"),
    ],
)
def test_bad_split_params(split: dict[str, float], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        Prepare(dataset="own", split=split)
    assert fragment in str(info.value)


# --- 2. evaluate what exists -----------------------------------------------------------------------------


def test_evaluate_split_that_prepare_will_not_produce_fails_before_writing(tmp_path: Path) -> None:
    make_split(tmp_path / "data" / "own", "train", names(4))
    with pytest.raises(ConfigError) as info:
        run_prepare(tmp_path, eval_splits=["valid", "test"], split={"valid": 0.25})
    assert (
        "evaluate.splits names ['test'], but prepare produces only ['train', 'valid']" in info.value.message
    )
    assert "evaluate.splits: null" in (info.value.fix or "")
    assert not (tmp_path / "prepared").exists()


def test_evaluate_default_takes_the_prepared_splits(tmp_path: Path) -> None:
    root = tmp_path / "data" / "own"
    make_split(root, "train", names(6))
    (root / "negatives").mkdir()
    write_image(root / "negatives" / "empty.jpg")
    prepared = run_prepare(tmp_path, split={"valid": 0.2})
    from sam3ft.stages.evaluate import prepared_eval_splits

    assert prepared_eval_splits(prepared) == ["valid", "negatives"]


# --- 3. leaks and garbage --------------------------------------------------------------------------------


def test_train_without_annotations_is_refused(tmp_path: Path) -> None:
    make_split(tmp_path / "own", "train", names(3), boxes=0)
    make_split(tmp_path / "own", "valid", names(1, "val"))
    with pytest.raises(DatasetError, match=r"'train' has 3 image\(s\) and no annotation: nothing to learn"):
        plan(tmp_path / "own", shares={"valid": 0.2})


def test_carving_that_leaves_train_without_annotations_is_refused(tmp_path: Path) -> None:
    make_split(tmp_path / "own", "train", names(3), boxes=[0, 0, 0])
    with pytest.raises(DatasetError, match="after carving valid/test from it"):
        plan(tmp_path / "own")


def test_same_image_twice_in_a_split_warns_and_stays_together(tmp_path: Path) -> None:
    root = tmp_path / "own"
    make_split(root, "train", names(5))
    shutil.copyfile(root / "train" / "photo-0.jpg", root / "train" / "copy.jpg")
    coco = json.loads((root / "train" / ANNOTATIONS_FILE).read_text())
    coco["images"].append({"id": 9, "file_name": "copy.jpg", "width": 32, "height": 24})
    (root / "train" / ANNOTATIONS_FILE).write_text(json.dumps(coco))
    assert [len(g) for g in photo_groups(load_split(root / "train", "train").images)] == [2, 1, 1, 1, 1]
    result = plan(root)
    (warning,) = [w for w in result.warnings if "the same image twice" in w]
    assert "the same image twice in 'train'" in warning and "image id=9 (copy.jpg)" in warning
    assert "image id=0 (photo-0.jpg)" in warning and "fix: drop all but one record" in warning
    together = [
        s.name for s in result.splits if {"copy.jpg", "photo-0.jpg"} & {i["file_name"] for i in s.images}
    ]
    assert len(together) == 1


def test_same_image_in_train_and_valid_is_leakage(tmp_path: Path) -> None:
    root = tmp_path / "own"
    make_split(root, "train", names(3))
    make_split(root, "valid", names(2, "val"))
    shutil.copyfile(root / "train" / "photo-1.jpg", root / "valid" / "val-0.jpg")
    with pytest.raises(DatasetError) as info:
        plan(root)
    assert "1 image(s) in more than one split" in info.value.message
    assert "train: image id=1 (photo-1.jpg), valid: image id=0 (val-0.jpg)" in info.value.message
    assert "prepare.allow_leakage: true" in (info.value.fix or "")
    accepted = plan(root, allow_leakage=True)
    assert any("leakage accepted (prepare.allow_leakage)" in w for w in accepted.warnings)


def test_annotation_on_the_parent_category_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "data" / "own"
    make_split(root, "train", names(4))
    coco = json.loads((root / "train" / ANNOTATIONS_FILE).read_text())
    coco["annotations"][2]["category_id"] = PARENT["id"]
    (root / "train" / ANNOTATIONS_FILE).write_text(json.dumps(coco))
    with pytest.raises(DatasetError) as info:
        run_prepare(tmp_path)
    message = info.value.message
    assert message.startswith(f"{root / 'train' / ANNOTATIONS_FILE}: annotation id=2: labelled 'things'")
    assert "the parent category of ['thing']" in message
    assert info.value.fix == "relabel them with one of ['thing'] in Roboflow and re-export (or drop them)"


def test_more_objects_than_max_ann_per_img_warns_with_the_count(tmp_path: Path) -> None:
    coco = make_split(tmp_path / "own", "train", names(3), boxes=[2, 5, 3])
    source = tmp_path / "own" / "train" / ANNOTATIONS_FILE
    assert check_objects_per_image(coco, 5, source) == []
    (warning,) = check_objects_per_image(coco, 4, source)
    assert warning.startswith(f"{source}: image id=1 (photo-1.jpg): 5 objects of 'thing'")
    assert "trainer.max_ann_per_img=4" in warning and "set trainer.max_ann_per_img: 5" in warning


def test_unknown_split_folder_warns(tmp_path: Path) -> None:
    root = tmp_path / "data" / "own"
    make_split(root, "train", names(3))
    make_split(root, "valid", names(1, "val"))
    make_split(root, "validation", names(1, "v2"))
    (root / ".cache").mkdir()
    expected = [
        f"{root / 'validation'}: folder ignored: prepare reads only ['train', 'valid', 'test', 'negatives']; "
        "rename it to one of them (or move it out of the dataset) if it holds images to use"
    ]
    assert plan(root, shares={"valid": 0.2}).warnings == expected
    prepared = run_prepare(tmp_path, split={"valid": 0.2})
    assert json.loads((prepared / "stats.json").read_text())["warnings"] == expected


# --- 4. huge images --------------------------------------------------------------------------------------


def constant_png(path: Path, width: int, height: int) -> None:
    """A valid grayscale PNG of one colour, written row by row: tiny on disk, never held in memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    compressor, row = zlib.compressobj(9), b"\0" * (width + 1)  # filter byte 0, then the pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [14000, 9000], ids=["above-PIL-bomb-limit", "above-ours"])
def test_huge_image_is_refused_before_decoding(tmp_path: Path, side: int, monkeypatch) -> None:
    root = tmp_path / "own"
    make_split(root, "train", names(3))
    constant_png(root / "train" / "photo-2.jpg", side, side)  # PIL reads the content, not the suffix
    coco = json.loads((root / "train" / ANNOTATIONS_FILE).read_text())
    coco["images"][2].update(width=side, height=side)
    (root / "train" / ANNOTATIONS_FILE).write_text(json.dumps(coco))
    decoded, load = [], ImageFile.ImageFile.load

    def recorded(image: ImageFile.ImageFile) -> Any:
        decoded.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recorded)
    with pytest.raises(DatasetError) as info:
        load_split(root / "train", "train")
    assert decoded and (side, side) not in decoded  # the small ones were decoded, the huge one never
    assert info.value.message.startswith(
        f"{root / 'train' / ANNOTATIONS_FILE}: image id=2 (photo-2.jpg): image "
    )
    assert ("too large" if side == 14000 else f"{side}x{side} = {side * side:,} pixels") in info.value.message
    assert f"at most {MAX_PIXELS:,} pixels" in (info.value.fix or "")


def test_huge_negative_image_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "own"
    make_split(root, "train", names(3))
    (root / "negatives").mkdir()
    constant_png(root / "negatives" / "big.png", 9000, 9000)
    with pytest.raises(DatasetError, match="9000x9000") as info:
        plan(root)
    assert info.value.message.startswith(str(root / "negatives" / "big.png"))


def test_image_at_the_limit_is_accepted(tmp_path: Path) -> None:
    root = tmp_path / "own"
    make_split(root, "train", names(2))
    constant_png(root / "train" / "photo-1.jpg", 8192, 8192)
    coco = json.loads((root / "train" / ANNOTATIONS_FILE).read_text())
    coco["images"][1].update(width=8192, height=8192)
    (root / "train" / ANNOTATIONS_FILE).write_text(json.dumps(coco))
    assert load_split(root / "train", "train").images[1]["width"] == 8192


# --- 5. the bundled store's pin --------------------------------------------------------------------------


def dvc(repo: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, check=True
    )
    return done.stdout


def test_own_data_is_never_pushed_into_the_bundled_store(tmp_path: Path) -> None:
    """Real DVC: `dvc add` keeps the sample's pin and `push: false`, every push skips the data,
    prepare's check warns, and the fix it names makes `dvc push` send it to the default remote."""
    repo = tmp_path / "repo"
    (repo / "data" / "sample").mkdir(parents=True)
    (repo / "data" / "sample" / "a.txt").write_text("sample")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    dvc(repo, "remote", "add", "bundled", "../bundled-store")
    dvc(repo, "remote", "add", "-d", "storage", str(tmp_path / "team-store"))
    dvc(repo, "add", "-q", "data")
    dvc(repo, "push", "-q", "-r", "bundled", "data.dvc")
    dvc_file = repo / "data.dvc"
    dvc_file.write_text(dvc_file.read_text() + "  remote: bundled\n  push: false\n")  # as shipped
    assert check_pinned_remote(repo / "data") == []  # the sample: its data is in the store
    store = sorted(p.relative_to(repo) for p in (repo / "bundled-store").rglob("*"))

    (repo / "data" / "own").mkdir()
    (repo / "data" / "own" / "b.txt").write_text("private")
    dvc(repo, "add", "-q", "data")
    assert dvc_file.read_text().endswith("  remote: bundled\n  push: false\n")  # DVC keeps both
    dvc(repo, "push", "-q")
    dvc(repo, "push", "-q", "-r", "bundled", "data.dvc")
    assert sorted(p.relative_to(repo) for p in (repo / "bundled-store").rglob("*")) == store
    assert not (tmp_path / "team-store").exists()
    (warning,) = check_pinned_remote(repo / "data")
    assert "kept the bundled sample's 'remote: bundled' and 'push: false': `dvc push` skips it" in warning
    command = warning[warning.index("(sed ") + 1 : warning.index("); `dvc push`")]
    assert command == f"sed -i '/^  remote: bundled$/d; /^  push: false$/d' {dvc_file}"
    subprocess.run(command, shell=True, cwd=repo, check=True)
    assert check_pinned_remote(repo / "data") == []
    dvc(repo, "push", "-q")
    assert sorted(p.relative_to(repo) for p in (repo / "bundled-store").rglob("*")) == store
    assert len(list((tmp_path / "team-store" / "files" / "md5").rglob("*.dir"))) == 1


def test_shipped_pin_holds_the_sample() -> None:
    """This repository's data.dvc pins data the bundled store holds (prepare runs on it)."""
    assert check_pinned_remote(SAMPLE.parent) == []
    assert pinned_outputs(SAMPLE.parent.with_name("data.dvc"))[0]["push"] is False


# --- 6. sam3ft doctor ------------------------------------------------------------------------------------


def doctor_on(tmp_path: Path, shipped: dict[str, Any], **prepare: Any) -> dict[str, list[Check]]:
    """The dataset checks for params pointing at tmp_path/data, grouped by check name."""
    shipped["paths"]["data"] = str(tmp_path / "data")
    shipped["prepare"].update(dataset="own", **prepare)
    path = write_params(tmp_path / "params.yaml", shipped)
    grouped: dict[str, list[Check]] = {}
    for check in dataset_checks(path, tmp_path):
        grouped.setdefault(check.name, []).append(check)
    return grouped


def test_doctor_shows_splits_counts_and_what_prepare_carves(tmp_path: Path, shipped_params: Any) -> None:
    make_split(tmp_path / "data" / "own", "train", names(4), boxes=3)
    write_image(tmp_path / "data" / "own" / "train" / "unlisted.jpg")
    shipped_params["trainer"]["max_ann_per_img"] = 2
    checks = doctor_on(tmp_path, shipped_params)
    summary, unlisted = checks["dataset"]
    assert unlisted.status == "WARN" and "1 image file(s) not in" in unlisted.detail
    assert summary.status == "OK" and summary.detail.startswith(
        f"{tmp_path / 'data' / 'own'}: train 2 image(s)"
    )
    assert "valid 1 image(s)" in summary.detail and "carved from train" in summary.detail
    (valid,) = checks["dataset valid"]
    assert valid.status == "OK" and "prepare carves 1 source photo(s), 1 image(s), from train" in valid.detail
    assert [c.status for c in checks["dataset test"]] == ["OK"]
    objects = checks["dataset objects"]  # one per image left in train, 3 objects each
    assert [c.status for c in objects] == ["WARN", "WARN"]
    assert "3 objects of 'thing', more than trainer.max_ann_per_img=2" in objects[0].detail


def test_doctor_fails_on_a_missing_dataset_folder(tmp_path: Path, shipped_params: Any) -> None:
    (tmp_path / "data").mkdir()
    (check,) = doctor_on(tmp_path, shipped_params)["dataset"]
    assert check.status == "FAIL" and check.detail == f"{tmp_path / 'data' / 'own'}: dataset folder not found"
    assert "prepare.dataset" in check.fix


def test_doctor_fails_on_an_evaluate_split_prepare_will_not_produce(
    tmp_path: Path, shipped_params: Any
) -> None:
    make_split(tmp_path / "data" / "own", "train", names(4))
    shipped_params["evaluate"]["splits"] = ["valid", "test"]
    (check,) = doctor_on(tmp_path, shipped_params, split={"valid": 0.2})["dataset"]
    assert check.status == "FAIL"
    assert check.detail.startswith(f"{tmp_path / 'params.yaml'}: evaluate.splits names ['test']")


def test_doctor_warns_on_leaks_it_may_accept(tmp_path: Path, shipped_params: Any) -> None:
    root = tmp_path / "data" / "own"
    make_split(root, "train", names(4))
    make_split(root, "valid", names(1, "val"))
    shutil.copyfile(root / "train" / "photo-0.jpg", root / "valid" / "val-0.jpg")
    (check,) = doctor_on(tmp_path, shipped_params)["dataset"]
    assert check.status == "FAIL" and "in more than one split" in check.detail
    warned = doctor_on(tmp_path, shipped_params, allow_leakage=True)["dataset"]
    assert [c.status for c in warned] == ["OK", "WARN"] and "leakage accepted" in warned[1].detail


def pinned_repo(tmp_path: Path) -> Path:
    """A repo whose data.dvc pins `data` (a folder `sample/`) to a local store holding exactly it."""
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("['remote \"bundled\"']\n    url = ../bundled-store\n")
    listing = json.dumps([{"md5": "0" * 32, "relpath": "sample/a.txt"}])
    md5 = "ab" + "1" * 30 + ".dir"
    store_file = tmp_path / "bundled-store" / "files" / "md5" / "ab" / md5[2:]
    store_file.parent.mkdir(parents=True)
    store_file.write_text(listing)
    (tmp_path / "data.dvc").write_text(f"outs:\n- md5: {md5}\n  path: data\n  remote: bundled\n")
    (tmp_path / "data" / "sample").mkdir(parents=True)
    return tmp_path


def test_doctor_warns_before_own_data_gets_the_pin_and_fails_after(
    tmp_path: Path, shipped_params: Any
) -> None:
    repo = pinned_repo(tmp_path)
    make_split(repo / "data" / "own", "train", names(4))
    (warn,) = doctor_on(repo, shipped_params)["dataset pin"]
    assert (
        warn.status == "WARN"
        and "['own']" in warn.detail
        and "would commit them with the pin kept" in warn.detail
    )
    assert warn.fix.startswith(
        f"for your own dataset: sed -i '/^  remote: bundled$/d; /^  push: false$/d' {repo / 'data.dvc'}"
    )
    dvc_file = repo / "data.dvc"
    dvc_file.write_text(dvc_file.read_text().replace("ab1111", "cd1111"))  # as `dvc add data` leaves it
    (fail,) = doctor_on(repo, shipped_params)["dataset pin"]
    assert fail.status == "FAIL" and "`dvc push` would copy this dataset into git" in fail.detail
    dvc_file.write_text(dvc_file.read_text() + "  push: false\n")  # the shipped pin
    (warned,) = doctor_on(repo, shipped_params)["dataset pin"]
    assert warned.status == "WARN" and "`dvc push` skips it, so no remote holds it" in warned.detail
    assert warned.fix.startswith("for your own dataset, delete the lines 'remote: bundled' and 'push: false'")
    dvc_file.write_text(dvc_file.read_text().replace("  remote: bundled\n  push: false\n", ""))
    assert "dataset pin" not in doctor_on(repo, shipped_params)


def test_prepare_refuses_a_pinned_dataset_outside_the_store(tmp_path: Path) -> None:
    repo = pinned_repo(tmp_path)
    make_split(repo / "data" / "own", "train", names(4))
    dvc_file = repo / "data.dvc"
    dvc_file.write_text(dvc_file.read_text().replace("ab1111", "cd1111"))
    with pytest.raises(DatasetError, match="would copy this dataset into git"):
        run_prepare(repo)
    assert not (repo / "prepared").exists()
