"""sam3's Trainer with one switch more: a single training process may skip the DDP wrapper."""

from __future__ import annotations

import contextlib
from typing import Any

import torch.distributed as dist
from sam3.train.trainer import Trainer as Sam3Trainer


class Trainer(Sam3Trainer):  # type: ignore[misc]  # sam3 ships no type information
    """`ddp_one_process: false` leaves the model unwrapped when the run has one process.

    DDP with gradient_as_bucket_view allocates every gradient in its buckets when it wraps the model,
    so 4 B per trainable parameter (3.3 GB for the full model) sit in memory through the forward
    pass too; without it, gradients exist only from the backward pass on (set_to_none frees them).
    With one process DDP's all-reduce is an identity, so the numbers are the same.
    """

    def __init__(self, *, ddp_one_process: bool = True, **kwargs: Any) -> None:
        self.ddp_one_process = ddp_one_process
        super().__init__(**kwargs)

    def _setup_ddp_distributed_training(self, distributed_conf: Any, accelerator: str) -> None:
        if self.ddp_one_process or dist.get_world_size() > 1:
            super()._setup_ddp_distributed_training(distributed_conf, accelerator)
            return
        # the training loop calls model.no_sync() between accumulated micro-batches (trainer.py:936)
        self.model.no_sync = contextlib.nullcontext
