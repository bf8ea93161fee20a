"""Trainer callbacks: the training-loop clock (tokens/s excludes loading and preprocessing)."""
from __future__ import annotations

import time

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


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


class LossBar(ProgressCallback):
    """The Trainer's progress bar, with the latest losses (and `keys`: more logged values, e.g. a
    GRPO run's rewards) in the bar instead of a dict per log line. Each value stays until it is
    logged again (GRPO logs rewards only on the steps that generate)."""

    def __init__(self, keys: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.keys = ("loss", "eval_loss", *keys)
        self.shown: dict[str, str] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        shown = {k.rpartition("/")[2]: f"{logs[k]:.4f}" if k in ("loss", "eval_loss") else f"{logs[k]:.4g}"
                 for k in self.keys if isinstance(logs.get(k), float)}
        if "learning_rate" in logs:
            shown["lr"] = f"{logs['learning_rate']:.2e}"
        if shown:
            self.shown.update(shown)
            self.training_bar.set_postfix(self.shown, refresh=False)
