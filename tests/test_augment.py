"""params.yaml `augment`: each knob moves images and boxes together, is seeded per (seed, epoch,
image), and reaches what the trainer's data loader serves."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image as PILImage
from sam3.train.data.sam3_image_dataset import Datapoint, Image, Object

from conftest import REPO, write_params
from sam3ft import params
from sam3ft.errors import ConfigError
from sam3ft.stages import prepare
from sam3ft.stages.train import config_name
from sam3ft.train.augment import Augment, _rotate_boxes, crop_region, rotate
from sam3ft.train.compose import compose_trainer_config, resolved_yaml
from sam3ft.train.data import reseed
from test_compose import knobs_for

OFF = {"hflip": 0.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "crop_min": 1.0, "rotate": 0.0}


def _datapoint(box: list[float], size: tuple[int, int] = (80, 100), mask: bool = False) -> Datapoint:
    """One image (height, width = size) of a gradient, one object with `box` (xyxy pixels)."""
    h, w = size
    pixels = (torch.arange(w).repeat(h, 1) * 255 // w).to(torch.uint8)
    image = PILImage.fromarray(torch.stack([pixels] * 3, dim=-1).numpy())
    segment = None
    if mask:
        segment = torch.zeros(size, dtype=torch.bool)
        segment[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] = True
    obj = Object(bbox=torch.tensor(box), area=(box[2] - box[0]) * (box[3] - box[1]), segment=segment)
    return Datapoint(find_queries=[], images=[Image(data=image, objects=[obj], size=size)])


def test_all_off_is_the_identity_and_draws_nothing():
    point = _datapoint([10, 20, 40, 60])
    before = point.images[0].data.tobytes()
    random.seed(3)
    Augment(**OFF)(point)
    assert random.random() == random.Random(3).random()  # no draw taken from the chain's RNG
    assert point.images[0].data.tobytes() == before
    assert point.images[0].objects[0].bbox.tolist() == [10, 20, 40, 60]


def test_flip_mirrors_the_box_and_the_pixels():
    point = _datapoint([10, 20, 40, 60])  # width 100
    left = point.images[0].data.getpixel((5, 5))
    Augment(**dict(OFF, hflip=1.0))(point)
    assert point.images[0].objects[0].bbox.reshape(4).tolist() == [60, 20, 90, 60]
    assert point.images[0].data.getpixel((94, 5)) == left


def test_rotation_by_90_degrees_turns_the_box_counter_clockwise():
    # centre (50, 50): (x, y) -> (50 + (y - 50), 50 - (x - 50)) in image coordinates (y down)
    box = _rotate_boxes(torch.tensor([10.0, 20.0, 30.0, 60.0]), 90.0, (100, 100))
    assert box.reshape(4).tolist() == pytest.approx([20.0, 70.0, 60.0, 90.0], abs=1e-4)


def test_rotation_takes_the_box_from_the_rotated_mask():
    point = _datapoint([30, 30, 60, 50], size=(100, 100), mask=True)
    rotate(point, 0, 90.0)
    obj = point.images[0].objects[0]
    ys, xs = torch.nonzero(obj.segment, as_tuple=True)
    assert obj.bbox.tolist() == [[xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]]
    assert obj.bbox.reshape(4).tolist() == pytest.approx([30, 40, 50, 70], abs=1)
    assert obj.area == pytest.approx(20 * 30, abs=60)


def test_crop_keeps_every_box_whole_and_at_least_crop_min_of_each_side():
    rng = random.Random(0)
    for _ in range(200):
        point = _datapoint([30, 20, 70, 50])  # height 80, width 100
        top, left, h, w = crop_region(point.images[0], 0.5, rng.random)
        assert left <= 30 and left + w >= 70 and top <= 20 and top + h >= 50
        assert 50 <= w <= 100 and 40 <= h <= 80 and left + w <= 100 and top + h <= 80


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Shipped params with the sample prepared into a temporary paths.prepared (a clean clone has none)."""
    tmp = tmp_path_factory.mktemp("augment")
    data = params.read_params(REPO / "params.yaml")
    data["paths"].update(data=str(REPO / "data"), prepared=str(tmp / "prepared"))
    path = write_params(tmp / "params.yaml", data)
    prepare.run(params.load(prepare.SECTIONS, path))
    return params.load(list(params.SECTIONS), path)


def _train_item(
    p: params.Params, augment: dict, epoch: int = 0, image: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tensor and boxes the trainer's train dataset serves for (base.seed, epoch, image)."""
    cfg = compose_trainer_config(knobs_for(p.replace(augment=params.Augment(**augment))))
    resolved_yaml(cfg)  # registers sam3's resolvers
    dataset = instantiate(cfg.trainer.data.train.dataset)
    reseed(p.base.seed, epoch, image)
    image_ = dataset[image].images[0]
    return image_.data, torch.cat([o.bbox.reshape(1, 4) for o in image_.objects])


def test_every_knob_changes_what_the_trainer_trains_on(loaded):
    """`-S augment.<key>=<value>` reaches the training batches, so it changes the checkpoint."""
    baseline = _train_item(loaded, OFF)
    on = {
        "hflip": 1.0,
        "brightness": 0.3,
        "contrast": 0.3,
        "saturation": 0.3,
        "crop_min": 0.5,
        "rotate": 10.0,
    }
    for key, value in on.items():
        image, boxes = _train_item(loaded, dict(OFF, **{key: value}))
        assert not torch.equal(image, baseline[0]), f"augment.{key} does not change the training image"
        if key not in ("brightness", "contrast", "saturation"):
            assert not torch.equal(boxes, baseline[1]), f"augment.{key} does not move the boxes"


def test_draws_depend_on_seed_epoch_and_image_only(loaded):
    """The same (seed, epoch, image) gets the same augmentation; another epoch another one."""
    on = {
        "hflip": 0.5,
        "brightness": 0.3,
        "contrast": 0.3,
        "saturation": 0.3,
        "crop_min": 0.5,
        "rotate": 10.0,
    }
    first, again = _train_item(loaded, on, epoch=2), _train_item(loaded, on, epoch=2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], _train_item(loaded, on, epoch=3)[0])


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("hflip", 1.5, "augment.hflip=1.5 is invalid"),
        ("crop_min", 0.0, "augment.crop_min=0.0 is invalid"),
        ("rotate", 90.0, "augment.rotate=90.0 is invalid"),
        ("contrast", -0.1, "augment.contrast=-0.1 is invalid"),
    ],
)
def test_bad_values_name_the_key(key, value, fragment):
    data = params.read_params(REPO / "params.yaml")["augment"]
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        params.section_from_dict(params.Augment, dict(data, **{key: value}), "augment")


def test_shipped_defaults_are_valid(loaded):
    assert dataclasses.asdict(loaded.augment).keys() == OFF.keys()


def test_masks_move_with_their_boxes(loaded):
    """With trainer.segmentation, crop, rotation and flip move each mask with its box: after the whole
    train chain (resize, pad, normalise) the box still encloses its mask, to 2 px."""
    seg = loaded.replace(trainer=dataclasses.replace(loaded.trainer, segmentation=True))
    augment = params.Augment(**dict(OFF, hflip=1.0, crop_min=0.5, rotate=15.0))
    cfg = compose_trainer_config(knobs_for(seg.replace(augment=augment)), name=config_name(True))
    resolved_yaml(cfg)
    dataset = instantiate(cfg.trainer.data.train.dataset)
    for index in range(3):
        reseed(loaded.base.seed, 0, index)
        (obj,) = dataset[index].images[0].objects
        ys, xs = torch.nonzero(obj.segment, as_tuple=True)
        size = obj.segment.shape[-1]  # square after padding, px
        cx, cy, w, h = obj.bbox.reshape(4).tolist()  # normalised cxcywh
        box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        mask = [xs.min() / size, ys.min() / size, (xs.max() + 1) / size, (ys.max() + 1) / size]
        assert box == pytest.approx([float(v) for v in mask], abs=2 / size)
