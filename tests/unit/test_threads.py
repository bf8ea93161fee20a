"""How idle OpenMP threads wait (archtune/cli/threads.py): spin on free CPUs, sleep on busy ones,
and whatever the user set wins."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from archtune.cli.threads import LoadProbe, choose_wait_policy, set_wait_policy

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("busy, threads, policy", [
    (0.0, "2", None),        # a quiet 2-core machine: libgomp's default (brief spinning)
    (0.4, "2", None),        # background noise is not load
    (0.8, "2", "PASSIVE"),   # another process holds most of a core
    (1.7, "", "PASSIVE"),    # OMP_NUM_THREADS unset: torch runs one thread per CPU
    (1.7, "1", None),        # one thread never waits for another
    (None, "2", "PASSIVE"),  # load unknown: the safe choice
])
def test_the_policy_follows_the_idle_cpus(busy, threads, policy):
    env = {"OMP_NUM_THREADS": threads} if threads else {}
    assert choose_wait_policy(env, cpus=2, others_busy=busy).policy == policy


@pytest.mark.parametrize("key", ["OMP_WAIT_POLICY", "GOMP_SPINCOUNT"])
def test_what_the_user_set_is_kept(key):
    env = {key: "ACTIVE" if key == "OMP_WAIT_POLICY" else "1000", "OMP_NUM_THREADS": "2"}
    choice = set_wait_policy(LoadProbe(), environ=env)
    assert choice.policy is None and key in choice.reason
    assert env.get("OMP_WAIT_POLICY") == ("ACTIVE" if key == "OMP_WAIT_POLICY" else None)


def test_the_probe_reads_this_machines_cpus_without_counting_its_own_work():
    probe = LoadProbe()
    sum(i * i for i in range(300_000))  # this process's own work in the window
    busy = probe.others_busy_cpus(os.cpu_count() or 1)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1)


def test_the_command_line_sets_the_policy_before_torch_loads():
    # A real start of the command line: main() decides, and the variable is set before torch is
    # imported (libgomp reads it once, when it loads).
    code = ("import os, sys; sys.argv = ['archtune', '--help']\n"
            "from archtune.cli import main\n"
            "assert 'torch' not in sys.modules\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="64")  # more threads than CPUs: never free
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split()[-2:] == ["False", "PASSIVE"]
