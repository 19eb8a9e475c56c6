"""Host-to-device copies that join the stream's queue instead of waiting for it."""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch

ALIGN = 64  # bytes: every tensor starts at a multiple of this in a packed buffer


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU tensor `host` on `device`; to CUDA through pinned memory, so the copy is queued without a
    host wait (a copy from pageable memory waits for every kernel queued before it)."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where a tensor was in a packed batch: its bytes in the buffer, its dtype and shape."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class PackedBatch:
    """A collated batch (dicts, lists, tuples and dataclasses around tensors: sam3's BatchedDatapoint)
    with all its tensors in one byte buffer, made in the loader's worker.

    A full SAM3 batch holds ~180 tensors. Unpacked, each crossed from the worker in a shared-memory
    handle of its own and was copied to the GPU by its own `.to` from pageable memory in the training
    step (sam3's copy_data_to_device: the DataLoader's pin_memory cannot see inside a dataclass), a
    host wait each. Packed, it is one tensor: one handle,
    pinned by the loader's pin_memory thread (`pin_memory`), one queued copy in `unpack`.
    """

    def __init__(self, batch: Any) -> None:
        tensors: list[torch.Tensor] = []
        self.skeleton = _strip(batch, tensors)
        slots, offset = [], 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            slots.append(_Slot(offset, nbytes, t.dtype, tuple(t.shape)))
            offset += -(-nbytes // ALIGN) * ALIGN
        self.slots = slots
        self.buffer = torch.empty(offset, dtype=torch.uint8)
        for t, slot in zip(tensors, slots, strict=True):
            if slot.nbytes:
                self.buffer[slot.offset : slot.offset + slot.nbytes].view(t.dtype).copy_(t.reshape(-1))

    def pin_memory(self, device: Any = None) -> PackedBatch:
        """The DataLoader's pin-memory thread calls this (torch.utils.data._utils.pin_memory)."""
        self.buffer = self.buffer.pin_memory()
        return self

    def unpack(self, device: torch.device) -> Any:
        """The batch, every tensor on `device`: views of one copy of the buffer, queued without a host
        wait where the buffer is pinned."""
        buffer = self.buffer.to(device, non_blocking=True)
        tensors = [buffer[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self.slots]
        return _fill(self.skeleton, tensors)


def unpack(batch: Any, device: torch.device) -> Any:
    """`batch` with a PackedBatch (or a list of them: micro-batches) unpacked onto `device`."""
    if isinstance(batch, PackedBatch):
        return batch.unpack(device)
    if isinstance(batch, list) and batch and all(isinstance(b, PackedBatch) for b in batch):
        return [b.unpack(device) for b in batch]
    return batch


def _mapping(data: Mapping[Any, Any], items: dict[Any, Any]) -> Any:
    if isinstance(data, defaultdict):
        return type(data)(data.default_factory, items)
    kind: Any = type(data)
    return kind(items)


def _rebuild(data: Any, leaf: Callable[[Any], Any]) -> Any:
    """A copy of `data`'s dicts, lists, tuples, namedtuples and dataclasses (without running their
    __init__ / __post_init__ again) with `leaf` applied to what they hold; `leaf` returns a value it
    leaves alone as it is (then it is looked into)."""
    new = leaf(data)
    if new is not data:
        return new
    if isinstance(data, Mapping):
        return _mapping(data, {k: _rebuild(v, leaf) for k, v in data.items()})
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(_rebuild(v, leaf) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(_rebuild(v, leaf) for v in data)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        rebuilt = copy.copy(data)
        for field in dataclasses.fields(data):
            object.__setattr__(rebuilt, field.name, _rebuild(getattr(data, field.name), leaf))
        return rebuilt
    return data


def _strip(data: Any, tensors: list[torch.Tensor]) -> Any:
    """A copy of `data` with each tensor replaced by its index in `tensors` (as _Index)."""

    def index(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        tensors.append(value.detach())
        return _Index(len(tensors) - 1)

    return _rebuild(data, index)


def _fill(data: Any, tensors: list[torch.Tensor]) -> Any:
    """_strip's inverse, with `tensors` in place of the indices."""
    return _rebuild(data, lambda value: tensors[value.i] if isinstance(value, _Index) else value)


@dataclasses.dataclass(frozen=True)
class _Index:
    i: int
