"""LoRA on the ViT trunk's attention (qkv and output projection), merged away after training.

A LoRA layer *is* the nn.Linear it adapts (same `weight`/`bias` keys, so sam3.pt loads into it
unchanged) plus `lora_a`/`lora_b` and a `lora_scale` buffer. `merge_state_dict` folds the adapters
into the weights, giving the plain sam3 key layout every other stage expects.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TARGETS = ("attn.qkv", "attn.proj")  # inside backbone.vision_backbone.trunk.blocks.<i>
TRUNK = "backbone.vision_backbone.trunk."
SUFFIXES = ("lora_a", "lora_b", "lora_scale")


class LoRALinear(nn.Linear):
    """y = x W^T + b + scale * (x A^T) B^T, with W and b frozen; B starts at zero (no-op at init)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises weights
        self.register_buffer("lora_scale", torch.tensor(alpha / rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapted = nn.functional.linear(nn.functional.linear(x, self.lora_a), self.lora_b)
        return super().forward(x) + adapted * self.get_buffer("lora_scale")


def add_lora(model: nn.Module, rank: int, alpha: float) -> int:
    """Replace every trunk attention qkv/proj Linear by a LoRALinear; returns how many."""
    targets = [
        name
        for name, module in model.named_modules()
        if name.startswith(TRUNK) and name.endswith(TARGETS) and type(module) is nn.Linear
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return len(targets)


def has_lora(state: dict[str, torch.Tensor]) -> bool:
    return any(key.endswith(".lora_a") for key in state)


def merge_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights with W + scale * B @ A folded in and the adapter keys gone (fp32 math)."""
    merged = {k: v for k, v in state.items() if not k.endswith(SUFFIXES)}
    for key in (k for k in state if k.endswith(".lora_a")):
        prefix = key[: -len("lora_a")]
        a, b = state[key].float(), state[prefix + "lora_b"].float()
        weight = state[prefix + "weight"]
        delta = (b @ a) * state[prefix + "lora_scale"].float()
        merged[prefix + "weight"] = (weight.float() + delta).to(weight.dtype)
    return merged
