"""Stopping a run cleanly: on SIGTERM/SIGINT (a preempted job, Ctrl-C) and on a loss or gradient
norm that is NaN or infinite.

Signals. The first SIGTERM or SIGINT asks the run to stop: the current optimizer step finishes,
a checkpoint is written (atomically, see checkpoints.py), and archtune exits with EXIT_STOPPED
after one line saying where the checkpoint is. A second signal ends the process at once (the
checkpoint being written, if any, stays in staging and is never resumed from). Under torchrun
every rank gets the signal; the ranks agree on it at each step end, so all stop at the same step,
save one checkpoint together and exit with EXIT_STOPPED; rank 0 alone speaks. There a worker acts
on the first signal only: torchrun's agent passes on each signal it gets, so a worker signalled
by the scheduler too (Slurm signals every process of a job step) gets it twice, and stopping at
once is the agent's part (it SIGKILLs the workers that outlast its shutdown timeout, 30 s by default).

Non-finite values. `on_nonfinite: stop` (default): before the optimizer would apply a step whose
loss or gradient norm is not finite, the run stops with one message naming the step and the rows
of its batch, and exits with EXIT_NONFINITE; the weights were not touched and the last checkpoint
stays the last good one. `on_nonfinite: skip`: that step's gradients are dropped (the optimizer
leaves every weight and its own state as they were), the step is counted and reported at the end.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading

import torch
from transformers import TrainerCallback

from archtune.errors import RunStopped
from archtune.train.progress import EXIT_NO_PROGRESS, Progress

EXIT_NONFINITE = 3
EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped on request with a checkpoint; run again to resume
ROW_KEYS = ("input_ids", "attention_mask", "position_ids")


# ---------------------------------------------------------------- signals

class StopRequest:
    """Catches SIGTERM and SIGINT while training (installed from the main thread only)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, say=None, first_only: bool = False) -> None:
        self.signum: int | None = None
        self.first_only = first_only  # later signals are the same request passed on again (torchrun)
        self._previous: dict[int, object] = {}
        self._say = say or (lambda text: print(text, file=sys.stderr, flush=True))

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and self.first_only:
            return
        if self.signum is not None:  # the second signal: stop now, the way the signal would
            self._say(f"archtune: {signal.Signals(signum).name} again: stopping at once, without a checkpoint")
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        again = ("torchrun's agent stops the workers at once after its shutdown timeout" if self.first_only
                 else "send it again to stop at once")
        self._say(f"archtune: {self.name} received: finishing this step, saving a checkpoint, then stopping "
                  f"({again})")

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


def _any_rank(flag: bool) -> bool:
    """True when `flag` is true on any process (a collective: every rank must call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class StopOnSignal(TrainerCallback):
    """At each step end: when any rank got a signal, save a checkpoint and end training."""

    def __init__(self, request: StopRequest):
        self.request = request
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if _any_rank(self.request.signum is not None):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


# ---------------------------------------------------------------- non-finite loss / gradient norm

class NonFinite(Exception):
    """A step whose loss or gradient norm is not finite (raised before the optimizer applies it)."""

    def __init__(self, step: int, what: str, batches: list):
        super().__init__(f"step {step}: {what}")
        self.step, self.what, self.batches = step, what, batches


def _finite(value) -> bool:
    if value is None:
        return True
    if torch.is_tensor(value):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(float(value))


class NonFiniteWatch:
    """What the Trainer saw during the current optimizer step: each micro-batch's loss (and its
    input ids, to name the rows), then the gradient norm. `ArchtuneTrainer` feeds it; the
    `NonFiniteGuard` callback decides before the optimizer steps."""

    def __init__(self, policy: str = "stop"):
        self.policy = policy
        self.bad_losses: list[str] = []
        self.batches: list[dict] = []
        self.grad_norm = None
        self.skipped: list[int] = []

    def start_step(self) -> None:
        self.bad_losses, self.batches, self.grad_norm = [], [], None

    def saw_loss(self, loss, inputs: dict) -> None:
        # The token ids and masks of every sequence of the batch (preference batches name them
        # chosen_input_ids, rejected_input_ids, ...), to name the rows.
        self.batches.append({k: v.detach().cpu() for k, v in inputs.items()
                             if k.endswith(ROW_KEYS) and torch.is_tensor(v)})
        if not _finite(loss):
            self.bad_losses.append(str(float(loss.detach().float().mean())) if torch.is_tensor(loss) else str(loss))

    def saw_grad_norm(self, grad_norm) -> None:
        self.grad_norm = grad_norm

    def problem(self) -> str | None:
        """What is not finite in this step (agreed over all ranks), or None."""
        local = bool(self.bad_losses) or not _finite(self.grad_norm)
        if not _any_rank(local):
            return None
        parts = []
        if self.bad_losses:
            parts.append(f"the loss is {self.bad_losses[0]}")
        if not _finite(self.grad_norm):
            parts.append(f"the gradient norm is {float(self.grad_norm)}")
        return " and ".join(parts) or "the loss on another process is not finite"


class NonFiniteGuard(TrainerCallback):
    def __init__(self, watch: NonFiniteWatch):
        self.watch = watch

    def on_step_begin(self, args, state, control, **kwargs):
        self.watch.start_step()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        what = self.watch.problem()
        if what is None:
            return
        step = state.global_step + 1
        if self.watch.policy == "skip":
            for p in model.parameters():  # the optimizer leaves parameters without gradients alone
                p.grad = None
            self.watch.skipped.append(step)
            return
        raise NonFinite(step, what, self.watch.batches)


# ---------------------------------------------------------------- one run's guards

class RunGuards:
    """The guards every training run gets, supervised or preference: the non-finite watch
    (`on_nonfinite`) and the signal handler, their Trainer callbacks, and the one message each
    kind of stop ends with. The trainer must be a CrashSafeTrainer built with `nonfinite=watch`.
    Under several processes every rank also reports its progress (train/progress.py): one that
    makes none for `timeout` seconds (ddp_timeout) ends the run on every rank."""

    def __init__(self, policy: str = "stop", say=None, timeout: float | None = None):
        from archtune.train import distributed

        self.watch = NonFiniteWatch(policy)
        self.stop = StopRequest(say=say, first_only=distributed.is_distributed())
        self.timeout = timeout

    def callbacks(self) -> list:
        return [NonFiniteGuard(self.watch), StopOnSignal(self.stop)]

    def train(self, trainer, resume, out, name_rows):
        """trainer.train(), resumed from `resume` (a checkpoint path or None); a non-finite step
        or a signal ends it with RunStopped. `name_rows(batches)`: where each row of the step's
        batches came from (FILE:LINE)."""
        from archtune.train import distributed

        progress = None
        if distributed.is_distributed() and self.timeout:
            progress = Progress(self.timeout, distributed.rank(), distributed.world_size(), store=distributed.store())
            trainer.progress = progress
        try:
            with self.stop, progress if progress is not None else contextlib.nullcontext():
                result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        except RuntimeError as exc:
            if progress is None or not _collective_failure(exc):
                raise
            # Another rank stopped or is gone: say which, and where, rather than the backend's error.
            raise RunStopped(progress.describe(str(exc)), EXIT_NO_PROGRESS) from None
        except NonFinite as exc:
            rows = name_rows(exc.batches)
            # Every rank stopped at this step; rank 0 alone says so, naming the rows of every rank.
            seen = distributed.gather((exc.what if self.watch.bad_losses else None, rows))
            if not distributed.is_main():
                raise RunStopped("", EXIT_NONFINITE) from None
            what, held = exc.what, f"The batch held: {', '.join(rows) or 'no rows'}"
            if len(seen) > 1:
                bad = [(r, w) for r, (w, _) in enumerate(seen) if w]
                what = "; ".join(f"on rank {r} {w}" for r, w in bad) or what
                order = [r for r, _ in bad] + [r for r in range(len(seen)) if seen[r][0] is None]
                held = "The batches held: " + "; ".join(f"rank {r}: {', '.join(seen[r][1]) or 'no rows'}" for r in order)
            raise RunStopped(
                f"archtune: stopped at step {exc.step}: {what}. {held}.\n"
                f"Nothing of this step was applied; {_last_good(out)}.\n"
                "fix: lower learning_rate (or raise warmup_steps), check those rows, or set on_nonfinite: skip to "
                "skip such steps", EXIT_NONFINITE) from None
        if self.stop.signum is not None:
            if not distributed.is_main():  # every rank stopped after this step; rank 0 alone says so
                raise RunStopped("", EXIT_STOPPED)
            raise RunStopped(f"archtune: stopped by {self.stop.name} after step {trainer.state.global_step}; "
                             f"{_last_good(out)}", EXIT_STOPPED)
        return result

    def skipped_warning(self) -> str | None:
        skipped = self.watch.skipped
        if not skipped:
            return None
        return (f"skipped {len(skipped)} steps whose loss or gradient norm was not finite (on_nonfinite: skip): "
                f"{', '.join(map(str, skipped[:20]))}")


def _collective_failure(exc: RuntimeError) -> bool:
    """A collective that failed because another rank stopped answering or went away."""
    text = str(exc)
    return any(mark in text for mark in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out",
                                         "timed out"))


def _last_good(out) -> str:
    from archtune.train import checkpoints

    last = checkpoints.last_complete_checkpoint(out)
    return (f"the last good checkpoint is {last} (resume_from_checkpoint: true continues from it)" if last
            else "no checkpoint was written yet (save_steps sets how often)")


def batch_rows(batches: list[dict], dataset, pad_id: int | None, limit: int = 16) -> list[str]:
    """Where each row of `batches` came from: its FILE:LINE (the prepared data keeps a row's
    `source`), else "training row I" (packed rows). Rows are found by their token ids; this runs
    only when a step went wrong."""
    import numpy as np

    lengths = np.asarray(dataset["length"])
    sources = dataset["source"] if "source" in dataset.column_names else None
    names: list[str] = []
    for batch in batches:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        for r in range(ids.shape[0]):
            row = ids[r].tolist()
            if mask is not None:
                low = high = int(mask[r].sum())
            else:  # packed: right padding with the pad id, which may also end a document (eos)
                high = len(row)
                low = high
                while low > 0 and row[low - 1] == pad_id:
                    low -= 1
            found = None
            for i in np.flatnonzero((lengths >= low) & (lengths <= high)).tolist():
                n = int(lengths[i])
                if dataset[i]["input_ids"] == row[:n]:
                    found = i
                    break
            if found is None:
                names.append(f"a row of {low} tokens (not found in the training data)")
            else:
                names.append(sources[found] if sources is not None else f"training row {found}")
            if len(names) >= limit:
                return names + ["..."]
    return names


__all__ = ["batch_rows", "EXIT_NONFINITE", "EXIT_STOPPED", "RunGuards", "RunStopped", "StopRequest", "StopOnSignal",
           "NonFinite", "NonFiniteWatch", "NonFiniteGuard"]
