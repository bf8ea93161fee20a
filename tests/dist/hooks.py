"""Test-side hooks for the multi-process runs, injected as an archtune plugin (`plugins:
[tests.dist.hooks.TestHooks]` with `allow_external_plugins: true`), so product code carries
no test-only branch (the resume tests' kill is tests/e2e/kill_plugin.py). It acts only when its
environment variable is set: ARCHTUNE_TEST_DUMP_RANK_STATE=DIR makes every rank write
DIR/rank{R}.safetensors with its trainable parameters (full values) at the end of training, to
check that the ranks hold identical weights.

ARCHTUNE_TEST_KILL_RANK=R:S makes rank R SIGKILL itself in the middle of step S+1 (in the model's
forward, before its gradients are all-reduced), in the first attempt only (torchrun's
TORCHELASTIC_RESTART_COUNT 0): the restarted workers run undisturbed. ARCHTUNE_TEST_STALL_RANK=R:S
makes rank R's data loader block for good when it fetches the first batch of step S+1 (a stalled
file system, a dead data worker), in the first attempt only. ARCHTUNE_TEST_KILL_SAVE_RANK=R:S
makes rank R SIGKILL itself while checkpoint-S is being written (its weights are on disk, its
optimizer state or, FSDP2, its scheduler state is not yet), in the first attempt only. ARCHTUNE_TEST_SIGTERM=WHO:S sends SIGTERM
right after step S, in the first attempt only: WHO `all` to every rank and to the torchrun agent
(as Slurm signals every process of a job step: the workers then get it twice, once forwarded by
the agent), `agent` to the agent alone (as Kubernetes signals the container's first process,
which forwards it).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from archtune.plugins import BasePlugin

DUMP_RANK_STATE_ENV = "ARCHTUNE_TEST_DUMP_RANK_STATE"
PLUGIN = "tests.dist.hooks.TestHooks"
KILL_RANK_ENV = "ARCHTUNE_TEST_KILL_RANK"
STALL_RANK_ENV = "ARCHTUNE_TEST_STALL_RANK"
STALL_STARTED = "archtune-test: the data loader stalls at"  # + time.time(), on stderr
KILL_SAVE_RANK_ENV = "ARCHTUNE_TEST_KILL_SAVE_RANK"
NAN_RANK_ENV = "ARCHTUNE_TEST_NAN_RANK"  # R:S: rank R's loss of step S+1 is NaN (first attempt)
SIGTERM_ENV = "ARCHTUNE_TEST_SIGTERM"


def _target(env: str) -> int | None:
    """The step of `env` (R:S) when this process is rank R of the first attempt, else None."""
    rank, _, step = os.environ.get(env, "").partition(":")
    if not step or int(rank) != _rank() or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) != 0:
        return None
    return int(step)


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


class KillMidStep(TrainerCallback):
    """SIGKILL in the forward of step `step` + 1 (the model's forward pre-hook, armed at step begin)."""

    def __init__(self, step: int):
        self.step, self.armed = step, False

    def hook(self, module, args, kwargs):
        if self.armed:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_begin(self, args, state, control, **kwargs):
        self.armed = state.global_step == self.step


class StallDataLoader(TrainerCallback):
    """The data loader's collate function blocks for good once step `step` is done."""

    def __init__(self, step: int):
        self.step, self.done = step, False

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        # accelerate's DataLoaderShard iterates the DataLoader it wraps (base_dataloader).
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
        collate = loader.collate_fn

        def stalling(rows):
            if self.done:
                print(f"{STALL_STARTED} {time.time():.3f}", file=sys.stderr, flush=True)
                threading.Event().wait()  # never set
            return collate(rows)

        loader.collate_fn = stalling

    def on_step_end(self, args, state, control, **kwargs):
        self.done = state.global_step >= self.step


def kill_while_saving(step: int) -> None:
    """SIGKILL this process when it writes checkpoint-`step`'s optimizer state (DDP: optimizer.pt)
    or, FSDP2, its scheduler state (scheduler.pt, after the sharded model and optimizer), with torch.save."""
    import torch

    real_save = torch.save
    folder = f"checkpoint-{step}"

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(("optimizer.pt", "scheduler.pt")) and folder in str(f):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


class NanLoss(TrainerCallback):
    """The model's output logits become NaN in step `step` + 1 (a forward hook, armed at step begin)."""

    def __init__(self, step: int):
        self.step, self.armed = step, False

    def hook(self, module, args, output):
        if self.armed and getattr(output, "logits", None) is not None:
            output.logits = output.logits * float("nan")
            if getattr(output, "loss", None) is not None:
                output.loss = output.loss * float("nan")
        return output

    def on_step_begin(self, args, state, control, **kwargs):
        self.armed = state.global_step == self.step


class SigtermAfterStep(TrainerCallback):
    """SIGTERM once step `step` is done: to the agent (rank 0 sends it: the workers' parent) and,
    with `everyone`, to every rank too (each sends it to itself)."""

    def __init__(self, step: int, everyone: bool):
        self.step, self.everyone = step, everyone

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step:
            return
        if _rank() == 0:
            os.kill(os.getppid(), signal.SIGTERM)
        if self.everyone:
            os.kill(os.getpid(), signal.SIGTERM)


def _sigterm() -> SigtermAfterStep | None:
    who, _, step = os.environ.get(SIGTERM_ENV, "").partition(":")
    if not step or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) != 0:
        return None
    return SigtermAfterStep(int(step), everyone=who == "all")


class TestHooks(BasePlugin):
    __test__ = False  # not a pytest test class
    name = "test_hooks"

    def __init__(self) -> None:
        kill = _target(KILL_RANK_ENV)
        self.kill = KillMidStep(kill) if kill is not None else None
        stall = _target(STALL_RANK_ENV)
        self.stall = StallDataLoader(stall) if stall is not None else None
        self.kill_save = _target(KILL_SAVE_RANK_ENV)
        nan = _target(NAN_RANK_ENV)
        self.nan = NanLoss(nan) if nan is not None else None
        self.sigterm = _sigterm()

    def pre_model_load(self, cfg, plan) -> None:
        if self.kill_save is not None:
            kill_while_saving(self.kill_save)

    def post_model_load(self, model, plan) -> None:
        if self.kill is not None:
            model.register_forward_pre_hook(self.kill.hook, with_kwargs=True)
        if self.nan is not None:
            model.register_forward_hook(self.nan.hook)

    def callbacks(self, plan) -> list:
        return [DumpRankState()] + [c for c in (self.kill, self.stall, self.nan, self.sigterm) if c is not None]
