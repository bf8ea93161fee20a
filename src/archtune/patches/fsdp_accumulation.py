"""Gradient accumulation for a model archtune shards itself with FSDP2 (`fully_shard`).

transformers' Trainer (5.25) treats a model sharded before training as one "sharded at load
time by transformers": on every micro-batch but the last it enters
`Trainer._defer_fsdp_gradient_reduction`, which reads `model.config.distributed_config` — an
attribute only transformers' own `from_pretrained(distributed_config=...)` sets, so every rank
of an archtune FSDP2 run with `gradient_accumulation_steps > 1` died with an AttributeError.
archtune's mesh is one-dimensional (plain FSDP, no replicas), so deferring is FSDP2's own switch:
gradients accumulate unsharded on each rank and the last micro-batch reduce-scatters their sum,
the same update as one reduction per micro-batch (tests/dist compares it with DDP).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from archtune.patches import Patch, register_patch


@contextlib.contextmanager
def defer_gradient_reduction(model: torch.nn.Module) -> Iterator[None]:
    """No reduce-scatter of `model`'s (an FSDP2 module's) gradients inside the block."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


FSDP_DEFERRED_REDUCTION = register_patch(Patch(
    name="fsdp_deferred_reduction",
    doc="With FSDP2 and gradient accumulation, the Trainer's deferred gradient reduction uses FSDP2's own "
        "switch on the model archtune sharded (transformers' version reads a config only its loader sets).",
    apply=defer_gradient_reduction,
    upstream="transformers 5.25.0",
    relies_on={"transformers.trainer.Trainer._defer_fsdp_gradient_reduction": "e8b6a1ca3958"},
))

__all__ = ["defer_gradient_reduction"]
