"""Trainer callbacks: the training-loop clock (tokens/s excludes loading and preprocessing)."""
from __future__ import annotations

import time

from transformers import TrainerCallback


class TrainClock(TrainerCallback):
    """Wall time of the training loop only."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        if self.started is not None:
            self.seconds += time.perf_counter() - self.started
            self.started = None
