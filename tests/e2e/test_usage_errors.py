"""Usage errors (unknown command, missing or extra arguments, bad option values) exit 2 with
click's one-line message and no traceback, whichever typer the install brings (typer >= 0.29
raises them as its own copy of click's exceptions, older typer as click's)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.conftest import run_cli

QUICKSTART = "examples/quickstart.yaml"

USAGE_ERRORS = [  # (argv, what click's message says)
    (["foo"], "No such command 'foo'"),
    (["train"], "Missing argument 'config'"),
    (["init-tiny", "gemma4-moe"], "Missing argument"),
    (["docs", "extra"], "unexpected extra argument"),
    (["check", QUICKSTART, "--nproc", "two"], "Invalid value for '--nproc'"),
    (["check", QUICKSTART, "--no-such-option"], "No such option: --no-such-option"),
]


@pytest.mark.parametrize("argv, message", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_a_usage_error_exits_2_with_one_message(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (out, err)
    assert message in err and "Error:" in err
    assert "Traceback" not in err + out


def test_the_installed_command_prints_no_traceback_for_an_unknown_command():
    # The console script itself, as a user runs it (the exception leaves main() in-process above).
    run = subprocess.run([sys.executable, "-m", "archtune", "foo"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "No such command 'foo'" in run.stderr and "Traceback" not in run.stderr
