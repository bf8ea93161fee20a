"""How torch's idle OpenMP threads wait between operations, chosen once, before torch loads.

torch's CPU kernels run on GNU OpenMP (libgomp), which reads OMP_WAIT_POLICY when the library
loads. Between two parallel operations its worker threads either spin for a few milliseconds
(libgomp's default) or go to sleep at once (PASSIVE). A training step of a small model is tens
of thousands of short operations, so which one is faster depends on whether the CPUs are free:

* CPUs otherwise idle: spinning is faster. A sleeping thread must be woken for every operation,
  and the wake-up costs more than most operations (on a 2-core VM it made 2 threads slower
  than 1: the tiny gemma4-moe's long-row step took 1.6x the single-thread time).
* CPUs busy with other processes: spinning is ruinous, since a thread spins while the one it
  waits for is descheduled. Measured on 2 cores at load 6-13: PASSIVE 39-41 s, a spin count of
  2,000 54 s, 20,000 432 s, libgomp's default over 200 s for the same 28 steps.

`choose_wait_policy` keeps what the user set (OMP_WAIT_POLICY or GOMP_SPINCOUNT in the
environment) and otherwise picks PASSIVE only when the CPUs are busy: fewer idle CPUs than
torch will run threads. `others_busy_cpus` measures that from /proc/stat over the time the
command takes to start (less this process's own CPU time). Only how threads wait changes: the
number of threads, and so every result, stays the same.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Mapping

WAIT_POLICY = "OMP_WAIT_POLICY"
USER_KEYS = (WAIT_POLICY, "GOMP_SPINCOUNT")
# Idle CPUs may fall this far short of the thread count and still count as free (the shell,
# a terminal, a monitor: background noise of a few tenths of a CPU).
SLACK = 0.5


@dataclass(frozen=True)
class WaitChoice:
    policy: str | None  # the OMP_WAIT_POLICY to set, or None: leave it (libgomp's default, or the user's)
    reason: str


def choose_wait_policy(environ: Mapping[str, str], *, cpus: int, others_busy: float | None) -> WaitChoice:
    """PASSIVE when the other processes leave fewer idle CPUs than torch's threads, else None.

    >>> choose_wait_policy({}, cpus=2, others_busy=0.1).policy is None   # a quiet machine: threads spin
    True
    >>> choose_wait_policy({}, cpus=2, others_busy=1.7).policy
    'PASSIVE'
    """
    for key in USER_KEYS:
        if environ.get(key):
            return WaitChoice(None, f"{key}={environ[key]} set in the environment")
    try:
        threads = int(environ.get("OMP_NUM_THREADS") or cpus)
    except ValueError:
        threads = cpus
    if threads <= 1:
        return WaitChoice(None, "one thread: nothing waits")
    if others_busy is None:
        return WaitChoice("PASSIVE", "the CPU load could not be read: threads sleep while idle (safe when shared)")
    idle = cpus - others_busy
    if idle + SLACK >= threads:
        return WaitChoice(None, f"{idle:.1f} of {cpus} CPUs idle for {threads} threads: idle threads spin briefly "
                                "(libgomp's default; faster for many short operations)")
    return WaitChoice("PASSIVE", f"only {max(idle, 0):.1f} of {cpus} CPUs idle for {threads} threads (other "
                                 "processes use the rest): idle threads sleep instead of spinning")


def _cpu_ticks() -> tuple[int, int] | None:
    """(all ticks, idle ticks) of /proc/stat's cpu line, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    return sum(fields), fields[3] + fields[4]  # idle + iowait


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LoadProbe:
    """Started early (at import of the command line), read when the command starts: the CPUs that
    other processes kept busy in between, in CPUs (0 = idle machine)."""

    MIN_WINDOW_S = 0.1

    def __init__(self) -> None:
        self.start = (time.monotonic(), _cpu_ticks(), _own_cpu())

    def others_busy_cpus(self, cpus: int) -> float | None:
        t0, ticks0, own0 = self.start
        if ticks0 is None:
            return None
        left = self.MIN_WINDOW_S - (time.monotonic() - t0)
        if left > 0:
            time.sleep(left)
        ticks1, own1, t1 = _cpu_ticks(), _own_cpu(), time.monotonic()
        if ticks1 is None or ticks1[0] <= ticks0[0]:
            return None
        busy_share = 1 - (ticks1[1] - ticks0[1]) / (ticks1[0] - ticks0[0])
        return max(0.0, busy_share * cpus - (own1 - own0) / max(t1 - t0, 1e-6))


# Started when the command line is imported (archtune.cli imports this module first), read in main().
PROBE = LoadProbe()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_wait_policy(probe: LoadProbe, environ=os.environ) -> WaitChoice:
    """Decide and set OMP_WAIT_POLICY (call before torch is imported); returns the choice."""
    cpus = usable_cpus()
    if any(environ.get(k) for k in USER_KEYS):
        choice = choose_wait_policy(environ, cpus=cpus, others_busy=None)
    else:
        choice = choose_wait_policy(environ, cpus=cpus, others_busy=probe.others_busy_cpus(cpus))
    if choice.policy is not None:
        environ[WAIT_POLICY] = choice.policy
    return choice


__all__ = ["WaitChoice", "choose_wait_policy", "LoadProbe", "set_wait_policy", "usable_cpus"]
