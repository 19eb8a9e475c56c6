"""PackedBatch: a collated batch's tensors in one buffer, through a DataLoader's workers, unpacked
to the same structure and values."""

from __future__ import annotations

import dataclasses
from collections import defaultdict, namedtuple
from typing import Any

import pytest
import torch

from sam3ft.train.transfer import PackedBatch, unpack

Pair = namedtuple("Pair", ["a", "b"])


@dataclasses.dataclass
class Inner:
    boxes: torch.Tensor
    names: list[str]
    derived: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.derived = self.boxes.sum(-1)


@dataclasses.dataclass
class Outer:  # the shape of sam3's BatchedDatapoint: dataclasses, lists and dicts around tensors
    img: torch.Tensor
    stages: list[Inner]
    extra: dict[str, Any]


def _batch(seed: int) -> dict[str, Outer]:
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(2, 3, 8, 8, generator=gen)
    stages = [Inner(torch.rand(n, 4, generator=gen), [f"s{n}"]) for n in (3, 0)]
    extra: dict[str, Any] = defaultdict(list)
    extra.update(
        ids=torch.arange(5).view(5, 1),
        mask=torch.rand(7, generator=gen) > 0.5,
        half=torch.randn(3, generator=gen).to(torch.bfloat16),
        scalar=torch.tensor(4.5, dtype=torch.float64),
        strided=torch.randn(4, 6, generator=gen).t(),  # not contiguous
        pair=Pair(torch.ones(2, dtype=torch.int32), "x"),
        plain=3,
    )
    return {"all": Outer(img, stages, extra)}


def _flat(data: Any) -> list[Any]:
    """Every leaf in order, tensors as (dtype, shape, values), with the containers' types."""
    if isinstance(data, torch.Tensor):
        return [(data.dtype, tuple(data.shape), data.tolist())]
    if isinstance(data, dict):
        return [type(data), *[x for k, v in data.items() for x in (k, *_flat(v))]]
    if isinstance(data, (list, tuple)):
        return [type(data), *[x for v in data for x in _flat(v)]]
    if dataclasses.is_dataclass(data):
        return [type(data), *[x for f in dataclasses.fields(data) for x in _flat(getattr(data, f.name))]]
    return [data]


def _collate(items: list[int]) -> PackedBatch:
    return PackedBatch(_batch(items[0]))


def test_a_packed_batch_unpacks_to_the_same_structure_and_values() -> None:
    packed = PackedBatch(_batch(1))
    assert len(packed.slots) == 11 and all(s.offset % 64 == 0 for s in packed.slots)
    out = unpack(packed, torch.device("cpu"))
    assert _flat(out) == _flat(_batch(1))
    assert out["all"].extra.default_factory is list
    assert out["all"].stages[0].derived.data_ptr() != _batch(1)["all"].stages[0].derived.data_ptr()
    assert unpack([PackedBatch(_batch(2)), PackedBatch(_batch(3))], torch.device("cpu"))[1]["all"].img.equal(
        _batch(3)["all"].img
    )
    plain = _batch(4)
    assert unpack(plain, torch.device("cpu")) is plain  # not packed: as it came


def test_packed_batches_cross_from_loader_workers_as_one_tensor() -> None:
    loader = torch.utils.data.DataLoader(range(3), batch_size=1, num_workers=2, collate_fn=_collate)
    got = list(loader)
    assert all(isinstance(b, PackedBatch) and b.buffer.dtype == torch.uint8 for b in got)
    for seed, packed in enumerate(got):
        assert _flat(packed.unpack(torch.device("cpu"))) == _flat(_batch(seed))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_pinned_batch_reaches_the_gpu_in_one_queued_copy() -> None:
    packed = PackedBatch(_batch(5)).pin_memory()  # as the DataLoader's pin-memory thread does
    assert packed.buffer.is_pinned()
    torch.cuda.set_sync_debug_mode("error")  # a copy from pageable memory would raise here
    try:
        out = packed.unpack(torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out["all"].img.is_cuda and _flat(out) == _flat(_batch(5))
