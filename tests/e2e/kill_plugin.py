"""A plugin for the resume tests: the training process SIGKILLs itself at a chosen point, as an
out-of-memory kill or a lost machine would (no cleanup, no flush, nothing caught).

ARCHTUNE_TEST_KILL_AT (read when the plugin loads; loaded through `plugins:` with
`allow_external_plugins: true`, like any user plugin):
  step:N      right after optimizer step N (between checkpoints)
  substep:N   after the first micro-batch of step N+1 (mid gradient accumulation)
  save:N      while checkpoint-N is being written: its weights are on disk, its optimizer state
              is not yet
  term:N / int:N      sends itself SIGTERM / SIGINT right after step N (a preempted job, Ctrl-C)
  term2:N / int2:N    the same signal twice in a row
"""
from __future__ import annotations

import os
import signal

from transformers import TrainerCallback

from archtune.plugins import BasePlugin

ENV = "ARCHTUNE_TEST_KILL_AT"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _KillCallback(TrainerCallback):
    def __init__(self, what: str, step: int):
        self.what, self.step = what, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step:
            return
        if self.what == "step":
            _die()
        sig = {"term": signal.SIGTERM, "int": signal.SIGINT}.get(self.what.rstrip("2"))
        if sig is not None:
            for _ in range(2 if self.what.endswith("2") else 1):
                os.kill(os.getpid(), sig)

    def on_substep_end(self, args, state, control, **kwargs):
        if self.what == "substep" and state.global_step == self.step:
            _die()


class KillPlugin(BasePlugin):
    name = "kill"

    def __init__(self) -> None:
        what, _, step = os.environ.get(ENV, "").partition(":")
        self.what, self.step = what, int(step or -1)

    def pre_model_load(self, cfg, plan) -> None:
        if self.what != "save":
            return
        import torch

        real_save = torch.save
        folder = f"checkpoint-{self.step}"

        def save(obj, f, *args, **kwargs):
            if str(f).endswith("optimizer.pt") and folder in str(f):
                _die()
            return real_save(obj, f, *args, **kwargs)

        torch.save = save

    def callbacks(self, plan) -> list:
        return [_KillCallback(self.what, self.step)] if self.what != "save" else []
