"""Faults at scale on 2 gloo processes: torchrun's restarts (`archtune train --max-restarts 1`).

One rank SIGKILLs itself on the first attempt only (tests/dist/hooks.py); torchrun stops the
other and starts the group again; the restarted workers continue from the last complete
checkpoint and end with the uninterrupted run's weights. Then a stalled rank, a NaN on one rank,
and SIGTERM (as Slurm and Kubernetes send it) under DDP and FSDP2.
"""
from __future__ import annotations

import json

import pytest

from tests.dist import hooks
from tests.dist.conftest import max_rel_diff
from tests.dist.test_distributed import FSDP, TOWERS, _ok

RESTART = ("--max-restarts", "1")


def test_max_restarts_is_passed_to_torchrun():
    from archtune.train.launch import torchrun_argv

    argv = torchrun_argv("c.yaml", [], nproc=2, max_restarts=3)
    assert argv[argv.index("--max-restarts") + 1] == "3"
    assert "--max-restarts" not in torchrun_argv("c.yaml", [], nproc=2)


def _restarted_from(run, checkpoint: str) -> None:
    assert f"torchrun restart 1 of this run: continuing from {checkpoint}" in run.stdout, run.stdout[-2000:]
    assert run.summary["resumed_from"] == checkpoint and run.summary["steps"] == 4
    record = json.loads((run.out / "run_record.json").read_text())
    first = record["earlier_starts"][-1]["launch"]
    assert record["launch"]["restart"] == 1 and first["restart"] == 0
    assert record["launch"]["run_id"] == first["run_id"]  # one run, two attempts
    assert not (run.out / ".staging").exists()


def test_a_rank_killed_mid_step_is_restarted_and_ends_with_the_uninterrupted_weights(train_run):
    # Rank 1 dies in the forward of step 3, after checkpoint-2 was saved.
    run = _ok(train_run("ddp_full_elastic", args=RESTART, save_steps=2, env={hooks.KILL_RANK_ENV: "1:2"}, **TOWERS))
    assert "exitcode: -9" in run.stderr  # the first attempt did die
    _restarted_from(run, "checkpoint-2")
    straight = _ok(train_run("ddp_full", **TOWERS))
    diff = max_rel_diff(run.weights(), straight.weights())
    print(f"elastic restart (SIGKILL of rank 1 in step 3) vs uninterrupted: max relative difference {diff:.3g}")
    assert diff == 0.0
    assert run.summary["train_losses"] == straight.summary["train_losses"]
    rank0, rank1 = run.rank_states()
    assert max_rel_diff(rank0, rank1) == 0.0


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_rank_killed_while_saving_leaves_no_checkpoint_the_restart_would_take(train_run, strategy):
    # Rank 0 dies while checkpoint-4 is half written (FSDP2: its shards are on disk, its scheduler
    # state is not): the restart takes checkpoint-2, not 4.
    keys = {**TOWERS, **(FSDP if strategy == "fsdp2" else {})}
    run = _ok(train_run(f"{strategy}_full_elastic_save", args=RESTART, save_steps=2,
                        env={hooks.KILL_SAVE_RANK_ENV: "0:4"}, **keys))
    assert "exitcode: -9" in run.stderr
    _restarted_from(run, "checkpoint-2")
    assert sorted(p.name for p in run.out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    straight = _ok(train_run("fsdp_full" if strategy == "fsdp2" else "ddp_full", **keys))
    diff = max_rel_diff(run.weights(), straight.weights())
    print(f"{strategy}: elastic restart (SIGKILL of rank 0 saving checkpoint-4) vs uninterrupted: max relative "
          f"difference {diff:.3g}")
    assert diff == 0.0


# ----------------------------------------------------------------------------- no silent hangs

def test_a_stalled_rank_ends_the_run_within_ddp_timeout_naming_the_rank_and_phase_on_every_rank(train_run):
    import re
    import time

    timeout = 20
    run = train_run("ddp_full_stalled", ddp_timeout=timeout, env={hooks.STALL_RANK_ENV: "1:2"}, **TOWERS)
    ended = time.time()
    assert run.rc == 4, run.stderr[-3000:]  # progress.EXIT_NO_PROGRESS
    stalled = float(re.search(re.escape(hooks.STALL_STARTED) + r" ([\d.]+)", run.stderr).group(1))
    took = ended - stalled
    print(f"rank 1's data loader stalled in step 3: the run ended {took:.1f} s later (ddp_timeout {timeout} s)")
    assert timeout <= took <= timeout + 15
    text = " ".join(run.stderr.split())
    for rank in (0, 1):
        assert (f"rank {rank}: stopping: rank 1 made no progress for" in text
                and "while loading the batches of step 3" in text), run.stderr[-3000:]
    assert "Traceback" not in run.stderr and not (run.out / "train_summary.json").exists()


# ----------------------------------------------------------------------------- one voice

def test_a_nan_loss_on_one_rank_stops_every_rank_at_that_step_with_one_message(train_run):
    run = train_run("ddp_full_nan", save_steps=2, env={hooks.NAN_RANK_ENV: "1:2"}, **TOWERS)
    assert run.rc == 3, run.stderr[-3000:]  # guards.EXIT_NONFINITE
    assert run.stderr.count("archtune: stopped at step 3") == 1, run.stderr[-3000:]
    # Rank 0 names the rank whose loss was NaN and the rows (FILE:LINE) of every rank's batch, that one's first.
    text = " ".join(run.stderr.split())
    message = text[text.index("archtune: stopped at step 3"):]
    assert message.startswith("archtune: stopped at step 3: on rank 1 the loss is nan"), message[:500]
    rank1, rank0 = message.index("rank 1: "), message.index("rank 0: ")
    assert rank1 < rank0 and "train.jsonl:" in message[rank1:rank0] and "train.jsonl:" in message[rank0:], message[:800]
    assert sorted(p.name for p in run.out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("strategy, who", [("ddp", "all"), ("fsdp2", "agent")])
def test_sigterm_saves_one_checkpoint_every_rank_exits_75_and_the_rerun_ends_as_an_uninterrupted_run(
        train_run, tmp_path, strategy, who):
    """SIGTERM after step 1. `all`: to every rank and to torchrun's agent, as Slurm signals a job
    step (the workers get it twice: the agent passes it on); `agent`: to the agent alone, as
    Kubernetes signals a container's first process."""
    keys = {**TOWERS, **(FSDP if strategy == "fsdp2" else {})}
    out = tmp_path / strategy
    run = train_run(f"{strategy}_full_sigterm", output_dir=out, save_steps=10, env={hooks.SIGTERM_ENV: f"{who}:1"},
                    **keys)
    assert run.rc == 75, run.stderr[-3000:]  # guards.EXIT_STOPPED, from the launcher as from each worker
    text = " ".join((run.stdout + run.stderr).split())
    assert "every worker of this node (rank 0, 1) stopped after the same step and exited 75" in text, text[-3000:]
    assert text.count("SIGTERM received") == 1 and text.count("archtune: stopped by SIGTERM") == 1, text[-3000:]
    assert "Traceback" not in run.stderr
    saved = sorted(p.name for p in out.glob("checkpoint-*"))  # save_steps 10: the stop's save alone
    assert len(saved) == 1 and f"stopped by SIGTERM after step {saved[0].split('-')[1]};" in text, saved
    assert not list(out.glob(".staging/*")) and not (out / "train_summary.json").exists()

    resumed = _ok(train_run(f"{strategy}_full_sigterm_resumed", output_dir=out, save_steps=10,
                            resume_from_checkpoint=True, **keys))
    assert resumed.summary["resumed_from"] == saved[0] and resumed.summary["steps"] == 4
    straight = _ok(train_run("fsdp_full" if strategy == "fsdp2" else "ddp_full", **keys))
    diff = max_rel_diff(resumed.weights(), straight.weights())
    print(f"{strategy}: SIGTERM ({who}) after step 1, stopped with {saved[0]}, rerun vs uninterrupted: "
          f"max relative difference {diff:.3g}")
    assert diff == 0.0
