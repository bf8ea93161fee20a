"""The launcher's side of a signal (train/launch.py) and a worker's (train/guards.py StopRequest),
without processes: exit codes as the workers leave them, and a signal delivered twice."""
from __future__ import annotations

import os
import signal

from archtune.train.guards import EXIT_STOPPED, StopRequest
from archtune.train.launch import stopped_by_signal, worker_exit_codes


def test_the_launcher_exits_75_only_when_every_worker_of_the_latest_attempt_stopped_with_75(tmp_path, capsys):
    for name, code in (("attempt0-rank0", 1), ("attempt0-rank1", 1), ("attempt1-rank0", 75), ("attempt1-rank1", 75)):
        (tmp_path / name).write_text(str(code))
    codes = worker_exit_codes(tmp_path)
    assert codes == {0: 75, 1: 75}
    assert stopped_by_signal(signal.SIGTERM, codes, nproc=2) == EXIT_STOPPED
    assert "every worker of this node (rank 0, 1) stopped after the same step and exited 75" in capsys.readouterr().err
    # A worker that said nothing was killed (torchrun's shutdown timeout): the signal's own code.
    assert stopped_by_signal(signal.SIGTERM, {0: 75}, nproc=2) == 128 + signal.SIGTERM
    assert "rank 0 exited 75; 1 ended without an exit code" in " ".join(capsys.readouterr().err.split())
    assert worker_exit_codes(tmp_path / "none") == {}


def test_a_worker_acts_on_the_first_signal_only_when_the_agent_passes_it_on_again():
    # Under torchrun the same SIGTERM arrives twice (the scheduler's and the agent's copy).
    said, before = [], signal.getsignal(signal.SIGTERM)
    with StopRequest(say=said.append, first_only=True) as request:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # would end this process without first_only
    assert request.name == "SIGTERM" and len(said) == 1 and "shutdown timeout" in said[0]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is removed after training


def test_train_help_lists_every_exit_code(capsys):
    from archtune.train.guards import EXIT_NONFINITE
    from archtune.train.progress import EXIT_NO_PROGRESS
    from tests.e2e.conftest import run_cli

    code, out, _ = run_cli(capsys, "train", "--help")
    text = " ".join(out.replace("│", " ").split())
    assert code == 0 and "Exit codes: 0 finished; 2 a user error" in text, text
    for exit_code, what in ((EXIT_NONFINITE, "a NaN/Inf"), (EXIT_NO_PROGRESS, "a rank made no progress for ddp_timeout"),
                            (EXIT_STOPPED, "stopped by SIGTERM/SIGINT with a checkpoint")):
        assert f"{exit_code} {what}" in text
