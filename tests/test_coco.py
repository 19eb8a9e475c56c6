"""sam3ft.data.coco: validation of a Roboflow COCO export, on a mutated copy of the bundled sample."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from conftest import SAMPLE
from sam3ft.data.coco import Category, Split, load_split, resolve_categories
from sam3ft.data.roboflow import load_dataset
from sam3ft.errors import DatasetError
from sam3ft.layout import ANNOTATIONS_FILE
from sam3ft.stages.prepare import convert_split, copy_image

SPLITS = ("train", "valid", "test")
CLASS = "fuse neutrals"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A private copy of the sample export, free to mutate."""
    copy = tmp_path / "export"
    shutil.copytree(SAMPLE, copy)
    return copy


def json_path(root: Path, split: str = "train") -> Path:
    return root / split / ANNOTATIONS_FILE


def read_coco(root: Path, split: str = "train") -> dict[str, Any]:
    return json.loads(json_path(root, split).read_text(encoding="utf-8"))


def write_coco(root: Path, data: Any, split: str = "train") -> None:
    json_path(root, split).write_text(json.dumps(data, allow_nan=True), encoding="utf-8")


def edit_coco(root: Path, change: Callable[[dict[str, Any]], None], split: str = "train") -> dict[str, Any]:
    """Apply `change` to the split's JSON in place and save it; returns the changed data."""
    data = read_coco(root, split)
    change(data)
    write_coco(root, data, split)
    return data


def load_train(root: Path) -> Split:
    return load_split(root / "train", "train")


def expect_error(call: Callable[[], object], path: Path, *fragments: str) -> DatasetError:
    """`call` raises DatasetError whose message starts with `path` and contains every fragment."""
    with pytest.raises(DatasetError) as info:
        call()
    err = info.value
    assert err.message.startswith(f"{path}: "), err.message
    for fragment in fragments:
        assert fragment in err.message, err.message
    assert err.fix
    return err


def expect_train_error(root: Path, *fragments: str) -> DatasetError:
    return expect_error(lambda: load_train(root), json_path(root), *fragments)


# --- the unmodified sample -------------------------------------------------------------------------------


def test_sample_loads(root: Path) -> None:
    splits = load_dataset(root)
    assert [s.name for s in splits] == list(SPLITS)
    assert [len(s.images) for s in splits] == [24, 5, 6]
    for split in splits:
        assert split.directory == root / split.name
        assert split.categories == [{"id": 0, "name": CLASS, "supercategory": "none"}]
        assert split.warnings == []


def test_resolve_categories_default_prompt_is_name(root: Path) -> None:
    assert resolve_categories(load_dataset(root), {}) == [Category(id=1, name=CLASS, prompt=CLASS)]


def test_resolve_categories_prompt_override(root: Path) -> None:
    categories = resolve_categories(load_dataset(root), {CLASS: "fuse cutout"})
    assert categories == [Category(id=1, name=CLASS, prompt="fuse cutout")]


def test_resolve_categories_prompt_for_unknown_name(root: Path) -> None:
    with pytest.raises(DatasetError) as info:
        resolve_categories(load_dataset(root), {"fuse neutral": "fuse cutout"})
    assert "unknown categories ['fuse neutral']" in info.value.message
    assert info.value.fix is not None and CLASS in info.value.fix


def test_resolve_categories_differ_between_splits(root: Path) -> None:
    edit_coco(root, lambda d: d["categories"][0].update(name="fuse"), split="valid")
    splits = load_dataset(root)
    expect_error(
        lambda: resolve_categories(splits, {}),
        json_path(root, "valid"),
        "categories",
        "differ from split 'train'",
    )


# --- image records and files -----------------------------------------------------------------------------


def first_image(root: Path) -> tuple[dict[str, Any], Path]:
    image = read_coco(root)["images"][0]
    return image, root / "train" / image["file_name"]


def test_missing_image_file(root: Path) -> None:
    image, path = first_image(root)
    path.unlink()
    err = expect_train_error(root, f"image id={image['id']} ({image['file_name']})", "image file not found")
    assert err.fix is not None and path.name in err.fix


def test_truncated_jpeg(root: Path) -> None:
    image, path = first_image(root)
    path.write_bytes(path.read_bytes()[:200])
    expect_train_error(root, f"image id={image['id']} ({image['file_name']})", "unreadable image")


def test_image_size_differs_from_json(root: Path) -> None:
    image, _ = first_image(root)
    edit_coco(root, lambda d: d["images"][0].update(width=640, height=480))
    expect_train_error(root, f"image id={image['id']}", "JSON says 640x480, file is 512x512")


@pytest.mark.parametrize("file_name", ["../../etc/passwd", "/etc/passwd", "sub/../../valid/x.jpg"])
def test_file_name_outside_split_folder(root: Path, file_name: str) -> None:
    edit_coco(root, lambda d: d["images"][0].update(file_name=file_name))
    expect_train_error(root, "image id=0", f"file_name {file_name!r} points outside")


def test_absolute_file_name_inside_split_folder_is_rejected(root: Path) -> None:
    _, path = first_image(root)
    edit_coco(root, lambda d: d["images"][0].update(file_name=str(path)))
    expect_train_error(root, "image id=0", "points outside")


@pytest.mark.parametrize("file_name", [None, "", 42])
def test_file_name_missing_or_not_a_string(root: Path, file_name: Any) -> None:
    edit_coco(root, lambda d: d["images"][0].update(file_name=file_name))
    expect_train_error(root, "image id=0", "file_name missing or not a string")


def test_unlisted_image_file_warns_and_loads(root: Path) -> None:
    _, path = first_image(root)
    shutil.copyfile(path, root / "train" / "extra.jpg")
    split = load_train(root)
    assert len(split.images) == 24
    assert split.warnings == [
        f"{root / 'train'}: 1 image file(s) not in {ANNOTATIONS_FILE}, ignored: ['extra.jpg']"
    ]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_png_in_other_modes_loads(root: Path, mode: str) -> None:
    _, path = first_image(root)
    with Image.open(path) as img:
        img.convert(mode).save(path.with_suffix(".png"))
    path.unlink()
    edit_coco(root, lambda d: d["images"][0].update(file_name=path.with_suffix(".png").name))
    split = load_train(root)
    assert split.images[0]["file_name"] == path.with_suffix(".png").name
    assert split.warnings == []
    with Image.open(path.with_suffix(".png")) as img:
        assert img.mode == mode


def test_file_name_with_spaces_and_unicode_loads(root: Path) -> None:
    _, path = first_image(root)
    name = "fuse neutral ü 日本 (1).jpg"
    path.rename(root / "train" / name)
    edit_coco(root, lambda d: d["images"][0].update(file_name=name))
    split = load_train(root)
    assert split.images[0]["file_name"] == name
    assert split.warnings == []


# --- ids and references ----------------------------------------------------------------------------------


def test_duplicate_image_ids(root: Path) -> None:
    edit_coco(root, lambda d: d["images"][1].update(id=d["images"][0]["id"]))
    expect_train_error(root, "image id=0", "duplicate id")


def test_duplicate_annotation_ids(root: Path) -> None:
    data = edit_coco(root, lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"]))
    expect_train_error(root, f"annotation id={data['annotations'][0]['id']}", "duplicate id")


@pytest.mark.parametrize("kind", ["images", "annotations", "categories"])
@pytest.mark.parametrize("bad_id", [None, "0", 1.0, True])
def test_id_missing_or_not_an_integer(root: Path, kind: str, bad_id: Any) -> None:
    edit_coco(root, lambda d: d[kind][0].update(id=bad_id))
    expect_train_error(root, "id missing or not an integer")


def test_annotation_for_missing_image(root: Path) -> None:
    data = edit_coco(root, lambda d: d["annotations"][0].update(image_id=999))
    expect_train_error(
        root, f"annotation id={data['annotations'][0]['id']}", "image_id 999 has no image record"
    )


def test_unknown_category_id(root: Path) -> None:
    data = edit_coco(root, lambda d: d["annotations"][0].update(category_id=7))
    expect_train_error(
        root, f"annotation id={data['annotations'][0]['id']}", "category_id 7 unknown (known: [0])"
    )


# --- boxes -----------------------------------------------------------------------------------------------


def set_first_box(root: Path, bbox: Any) -> dict[str, Any]:
    """Give the first annotation `bbox`; returns that annotation."""
    return edit_coco(root, lambda d: d["annotations"][0].update(bbox=bbox))["annotations"][0]


def test_box_far_outside_image(root: Path) -> None:
    ann = set_first_box(root, [400, 400, 300, 300])
    expect_train_error(root, f"annotation id={ann['id']}", "lies outside the 512x512 image")


@pytest.mark.parametrize(
    ("bbox", "clipped"),
    [
        ([-0.5, 10, 100, 50], [0.0, 10, 99.5, 50]),
        ([10, -0.9, 100, 50], [10, 0.0, 100, 49.1]),
        ([500, 10, 12.5, 50], [500, 10, 12, 50]),
        ([10, 511.25, 20, 1.5], [10, 511.25, 20, 0.75]),
    ],
)
def test_box_overhanging_less_than_a_pixel_is_clipped(
    root: Path, bbox: list[float], clipped: list[float]
) -> None:
    ann = set_first_box(root, bbox)
    split = load_train(root)
    new = split.annotations[0]["bbox"]
    assert new == pytest.approx(clipped)
    assert split.warnings == [
        f"{json_path(root)}: annotation id={ann['id']}: bbox {bbox} clipped to the image: {new}"
    ]


@pytest.mark.parametrize("bbox", [[10, 10, 0, 20], [10, 10, 20, 0], [10, 10, -5, 20], [10, 10, 20, -5]])
def test_box_with_non_positive_size(root: Path, bbox: list[float]) -> None:
    ann = set_first_box(root, bbox)
    expect_train_error(root, f"annotation id={ann['id']}", "non-positive width/height")


@pytest.mark.parametrize(
    "bbox",
    [
        [float("nan"), 10, 20, 20],
        [10, 10, float("inf"), 20],
        [10, float("-inf"), 20, 20],
        [10, 10, 20],
        ["10", 10, 20, 20],
        None,
    ],
    ids=["nan", "inf", "-inf", "three-numbers", "string", "missing"],
)
def test_box_not_four_finite_numbers(root: Path, bbox: Any) -> None:
    ann = set_first_box(root, bbox)
    expect_train_error(root, f"annotation id={ann['id']}", "is not 4 finite numbers")


# --- files and splits ------------------------------------------------------------------------------------


def test_empty_split(root: Path) -> None:
    edit_coco(root, lambda d: d.update(images=[], annotations=[]))
    err = expect_train_error(root, "images: split is empty")
    assert err.fix is not None and "'train'" in err.fix


def test_train_split_folder_missing(root: Path) -> None:
    shutil.rmtree(root / "train")
    err = expect_error(lambda: load_dataset(root), root / "train", "split: folder missing")
    assert err.fix is not None and "'train'" in err.fix


def test_valid_and_test_split_folders_may_be_missing(root: Path) -> None:
    shutil.rmtree(root / "valid")
    assert [s.name for s in load_dataset(root)] == ["train", "test"]
    shutil.rmtree(root / "test")
    assert [s.name for s in load_dataset(root)] == ["train"]


def test_dataset_folder_missing(tmp_path: Path) -> None:
    expect_error(lambda: load_dataset(tmp_path / "nope"), tmp_path / "nope", "dataset folder not found")


def test_annotations_file_missing(root: Path) -> None:
    json_path(root).unlink()
    expect_train_error(root, "file: missing")


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"images": [', b"", b'{"images": "\xff"}'],
    ids=["syntax", "cut-short", "empty", "not-utf8"],
)
def test_invalid_json(root: Path, content: bytes) -> None:
    json_path(root).write_bytes(content)
    expect_train_error(root, "file: not valid JSON")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"foo": 1}, "'images': missing or not a list: this is not COCO"),
        ({"images": [], "annotations": {}, "categories": []}, "'annotations': missing or not a list"),
        ([1, 2], "file: top level is not a JSON object"),
    ],
)
def test_json_that_is_not_coco(root: Path, data: Any, fragment: str) -> None:
    write_coco(root, data)
    expect_train_error(root, fragment)


# --- Roboflow's parent category and convert_split --------------------------------------------------------


def add_category(root: Path, category: dict[str, Any], supercategory: str | None = None) -> None:
    """Add `category` to every split (keeping them identical); optionally re-parent the real class."""

    def change(data: dict[str, Any]) -> None:
        if supercategory is not None:
            data["categories"][0]["supercategory"] = supercategory
        data["categories"].append(category)

    for split in SPLITS:
        edit_coco(root, change, split)


def test_roboflow_parent_category_is_dropped(root: Path) -> None:
    parent = {"id": 99, "name": "fuse-neutral-parent", "supercategory": "none"}
    add_category(root, parent, supercategory="fuse-neutral-parent")
    splits = load_dataset(root)
    assert all(len(s.categories) == 2 for s in splits)
    categories = resolve_categories(splits, {})
    assert categories == [Category(id=1, name=CLASS, prompt=CLASS)]
    assert convert_split(splits[0], categories)["categories"] == [
        {"id": 1, "name": CLASS, "roboflow_name": CLASS, "supercategory": "none"}
    ]


def test_prompt_for_parent_category_is_unknown(root: Path) -> None:
    parent = {"id": 99, "name": "fuse-neutral-parent", "supercategory": "none"}
    add_category(root, parent, supercategory="fuse-neutral-parent")
    with pytest.raises(DatasetError, match="fuse-neutral-parent"):
        resolve_categories(load_dataset(root), {"fuse-neutral-parent": "fuse"})


def test_convert_split_renumbers_and_fills_fields(root: Path) -> None:
    add_category(root, {"id": 5, "name": "fuse body", "supercategory": "none"})

    def change(data: dict[str, Any]) -> None:
        data["annotations"][0]["category_id"] = 5
        for ann in data["annotations"]:
            del ann["iscrowd"]
        del data["annotations"][1]["area"]
        del data["annotations"][1]["segmentation"]

    original = edit_coco(root, change)
    splits = load_dataset(root)
    categories = resolve_categories(splits, {CLASS: "fuse cutout"})
    assert categories == [Category(1, CLASS, "fuse cutout"), Category(2, "fuse body", "fuse body")]

    coco = convert_split(splits[0], categories)
    assert coco["categories"] == [
        {"id": 1, "name": "fuse cutout", "roboflow_name": CLASS, "supercategory": "none"},
        {"id": 2, "name": "fuse body", "roboflow_name": "fuse body", "supercategory": "none"},
    ]
    anns = coco["annotations"]
    assert [a["category_id"] for a in anns] == [2] + [1] * (len(anns) - 1)
    assert all(a["iscrowd"] == 0 for a in anns)
    assert [a["id"] for a in anns] == [a["id"] for a in original["annotations"]]
    assert [a["bbox"] for a in anns] == [a["bbox"] for a in original["annotations"]]
    w, h = original["annotations"][1]["bbox"][2:]
    assert anns[1]["area"] == pytest.approx(w * h)  # filled from the box when missing
    assert "segmentation" not in anns[1]
    assert anns[0]["segmentation"] == original["annotations"][0]["segmentation"]
    assert coco["images"][0] == {k: original["images"][0][k] for k in ("id", "file_name", "width", "height")}
    assert len(coco["images"]) == 24


def test_convert_split_keeps_iscrowd(root: Path) -> None:
    edit_coco(root, lambda d: d["annotations"][0].update(iscrowd=1))
    split = load_train(root)
    coco = convert_split(split, resolve_categories([split], {}))
    assert [a["iscrowd"] for a in coco["annotations"][:2]] == [1, 0]


# --- malformed records that once crashed with a raw exception instead of a DatasetError ---------------


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        pytest.param(
            lambda d: d["images"].__setitem__(0, "foo.jpg"),
            "image",
            id="image-not-an-object",
        ),
        pytest.param(
            lambda d: d["annotations"].__setitem__(0, None),
            "annotation",
            id="annotation-not-an-object",
        ),
        pytest.param(
            lambda d: d["annotations"][0].update(category_id=[0]),
            "category_id [0]",
            id="category-id-list",
        ),
        pytest.param(
            lambda d: d["annotations"][0].update(image_id={"id": 0}),
            "image_id",
            id="image-id-object",
        ),
        pytest.param(
            lambda d: d["images"][0].update(file_name="a\x00b.jpg"),
            "image id=0",
            id="file-name-nul-byte",
        ),
    ],
)
def test_malformed_record_raises_dataset_error(
    root: Path, change: Callable[[dict[str, Any]], None], fragment: str
) -> None:
    edit_coco(root, change)
    expect_train_error(root, fragment)


def test_category_without_name(root: Path) -> None:
    for split in SPLITS:
        edit_coco(root, lambda d: d["categories"][0].pop("name"), split)
    expect_error(lambda: resolve_categories(load_dataset(root), {}), json_path(root), "category")


def test_duplicate_category_names(root: Path) -> None:
    add_category(root, {"id": 5, "name": CLASS, "supercategory": "none"})

    def prepare() -> None:
        splits = load_dataset(root)
        convert_split(splits[0], resolve_categories(splits, {}))

    expect_error(prepare, json_path(root), CLASS)


def test_dot_slash_file_name_is_not_reported_unlisted(root: Path) -> None:
    edit_coco(root, lambda d: d["images"][0].update(file_name="./" + d["images"][0]["file_name"]))
    assert load_train(root).warnings == []


def test_negatives_folder_becomes_a_split_without_annotations(root: Path) -> None:
    negatives = root / "negatives"
    negatives.mkdir()
    Image.new("RGB", (64, 48)).save(negatives / "empty box.jpg")
    splits = {s.name: s for s in load_dataset(root)}
    (image,) = splits["negatives"].images
    assert {k: image[k] for k in ("id", "file_name", "width", "height")} == {
        "id": 0,
        "file_name": "empty box.jpg",
        "width": 64,
        "height": 48,
    }
    coco = convert_split(splits["negatives"], resolve_categories(list(splits.values()), {}))
    assert coco["annotations"] == [] and coco["categories"][0]["id"] == 1
    (negatives / "bad.jpg").write_bytes(b"nope")
    expect_error(lambda: load_dataset(root), negatives / "bad.jpg", "image")


@pytest.mark.parametrize(
    ("segmentation", "fragment"),
    [
        ([[10, 10, 20, 20]], "at least 3 (x, y) points"),
        ([[10, 10, 20, 20, 30]], "at least 3 (x, y) points"),
        ({"size": [100, 100], "counts": "abc"}, "RLE size [100, 100] does not match"),
        ("poly", "segmentation is str"),
    ],
)
def test_bad_masks_are_rejected(root: Path, segmentation: Any, fragment: str) -> None:
    edit_coco(root, lambda d: d["annotations"][0].update(segmentation=segmentation))
    expect_train_error(root, "annotation id=", fragment)


def _replace_first_image(
    root: Path, image: Image.Image, name: str, size: tuple[int, int], **save: Any
) -> None:
    image.save(root / "train" / name, **save)

    def change(d: dict[str, Any]) -> None:
        d["images"][0].update(file_name=name, width=size[0], height=size[1])
        d["annotations"][0].update(bbox=[1, 1, 10, 10])

    edit_coco(root, change)


def test_16_bit_png_is_scaled_to_8_bit(root: Path, tmp_path: Path) -> None:
    import numpy as np

    wide = Image.fromarray(
        (np.arange(512 * 512, dtype=np.uint32).reshape(512, 512) % 65536).astype(np.uint16)
    )
    assert wide.mode.startswith("I;16")
    _replace_first_image(root, wide, "deep.png", (512, 512))
    split = load_train(root)
    assert any("I;16-to-8-bit" in w or "to-8-bit" in w for w in split.warnings)
    out = tmp_path / "deep.png"
    copy_image(root / "train" / "deep.png", out, split.images[0]["_fixes"])
    with Image.open(out) as img:
        assert img.mode == "L" and img.getextrema() == (0, 255)


def test_exif_rotated_photo_is_turned_upright(root: Path, tmp_path: Path) -> None:
    stored = Image.new("RGB", (60, 40), (200, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 10, 10))  # blue marker top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the annotator saw a 40x60 portrait photo
    _replace_first_image(root, stored, "phone.jpg", (40, 60), exif=exif, quality=95)
    split = load_train(root)
    assert split.images[0]["_fixes"] == ["exif-orientation-6"]
    out = tmp_path / "phone.jpg"
    copy_image(root / "train" / "phone.jpg", out, split.images[0]["_fixes"])
    with Image.open(out) as img:
        assert img.size == (40, 60)
        assert img.getexif().get(0x0112, 1) == 1
        r, _, b = img.getpixel((35, 3))  # the marker moved to the top-right
        assert b > 150 and r < 100
    edit_coco(root, lambda d: d["images"][0].update(width=60, height=40))
    expect_train_error(root, "after applying its EXIF orientation")
