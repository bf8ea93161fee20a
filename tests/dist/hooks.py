"""Test-side hooks for the multi-process runs, injected as an archtune plugin (`plugins:
[tests.dist.hooks.TestHooks]` with `allow_external_plugins: true`), so product code carries
no test-only branch (the resume tests' kill is tests/e2e/kill_plugin.py). It acts only when its
environment variable is set: ARCHTUNE_TEST_DUMP_RANK_STATE=DIR makes every rank write
DIR/rank{R}.safetensors with its trainable parameters (full values) at the end of training, to
check that the ranks hold identical weights.
"""
from __future__ import annotations

import os
from pathlib import Path

from transformers import TrainerCallback

from archtune.plugins import BasePlugin

DUMP_RANK_STATE_ENV = "ARCHTUNE_TEST_DUMP_RANK_STATE"
PLUGIN = "tests.dist.hooks.TestHooks"


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


class DumpRankState(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        target = os.environ.get(DUMP_RANK_STATE_ENV)
        if not target or model is None:
            return
        from safetensors.torch import save_file
        from torch.distributed.tensor import DTensor

        tensors = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                full = param.full_tensor() if isinstance(param, DTensor) else param
                tensors[name] = full.detach().clone().contiguous()
        Path(target).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(Path(target) / f"rank{_rank()}.safetensors"))


class TestHooks(BasePlugin):
    __test__ = False  # not a pytest test class
    name = "test_hooks"

    def callbacks(self, plan) -> list:
        return [DumpRankState()]
