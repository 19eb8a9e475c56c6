"""Host-to-device copies that join the stream's queue instead of waiting for it."""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU tensor `host` on `device`; to CUDA through pinned memory, so the copy is queued without a
    host wait (a copy from pageable memory waits for every kernel queued before it)."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
