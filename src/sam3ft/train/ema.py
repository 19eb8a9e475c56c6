"""Exponential moving average of a model's weights (`trainer.ema_decay`), as RF-DETR and timm keep
one: updated after every optimizer step, validated instead of the raw weights, saved in the
checkpoint beside them so a resumed run continues the same average."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

EMA_KEY = "ema"  # the trainer checkpoint's entry: {"decay", "updates", "state"}


class WeightEma:
    """The average of every floating-point tensor of `model.state_dict()` (parameters and buffers;
    others are copied), starting from the model's weights at creation.

    The decay warms up as `min(decay, (1 + n) / (10 + n))` after n updates (timm's ModelEmaV2
    warmup, TF's num_updates): early on the average follows the weights, so a short run is not
    dominated by the initial weights. The average costs one copy of the model's state in memory.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        copies: dict[int, torch.Tensor] = {}  # one copy per storage: tied weights stay tied
        self.state = {
            k: copies.setdefault(v.data_ptr(), v.detach().clone()) for k, v in model.state_dict().items()
        }

    def _pairs(self, model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(live tensor, its average) once per storage, in state_dict order."""
        seen: set[int] = set()
        pairs = []
        for key, value in model.state_dict().items():
            if value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                pairs.append((value.detach(), self.state[key]))
        return pairs

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """ema <- d * ema + (1 - d) * weights, for the decay d of this update."""
        self.updates += 1
        weight = 1.0 - self.current_decay()
        averaged, current = [], []
        for value, mine in self._pairs(model):
            if mine.is_floating_point():
                averaged.append(mine)
                current.append(value)
            else:
                mine.copy_(value)
        if averaged:
            torch._foreach_lerp_(averaged, current, weight)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "state": self.state}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if saved["decay"] != self.decay or saved["state"].keys() != self.state.keys():
            raise ValueError(
                f"saved EMA (decay {saved['decay']}) does not match this run's (decay {self.decay})"
            )
        self.updates = int(saved["updates"])
        for key, value in saved["state"].items():
            self.state[key].copy_(value)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own ones again after it (swapped
        tensor by tensor in place: no second copy of the model)."""
        pairs = self._pairs(model)
        for live, mine in pairs:
            _swap(live, mine)
        try:
            yield
        finally:
            for live, mine in pairs:
                _swap(live, mine)


def _swap(a: torch.Tensor, b: torch.Tensor) -> None:
    held = a.clone()
    a.copy_(b)
    b.copy_(held)
