"""No silent hangs: every rank says what it is doing, and a rank that makes no progress for
ddp_timeout seconds ends the run with one message naming it and its phase, on every rank.

A collective only fails on the ranks that wait in it (after ddp_timeout); the rank that stopped
(a stalled data loader, a dead file system) sits where it is and says nothing, and torchrun then
waits on it too. So each rank keeps its phase ("loading the batches of step 3") in this module,
a watchdog thread publishes it to the run's key-value store (torchrun's, distributed.store()),
and when one phase outlasts the timeout that thread prints the message and ends its own process
(the main thread is the one that is stuck). The ranks waiting on it then see their collective
fail and report the same rank and phase from the store (`Progress.describe`).

Between steps (logging, evaluation) there is no deadline: those wait in collectives bounded by
ddp_timeout anyway, and an evaluation may rightly take longer.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

EXIT_NO_PROGRESS = 4  # a rank made no progress for ddp_timeout seconds (or one was lost)
KEY = "archtune/progress/{rank}"

# Phases in the order a step goes through them: a rank in an earlier one is behind.
LOADING, COMPUTING, SAVING = "loading the batches of", "the forward and backward of", "saving"
ORDER = {LOADING: 0, COMPUTING: 1, SAVING: 2}


class Progress:
    """This rank's phase, and the watchdog that ends the process when a phase lasts `timeout` s.

    `store`: the run's key-value store (None: nothing published, nothing read back)."""

    def __init__(self, timeout: float, rank: int, world_size: int, store=None, say=None):
        self.timeout, self.rank, self.world_size, self.store = float(timeout), rank, world_size, store
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.phase: str | None = None  # None: no deadline (between steps)
        self.step = 0
        self.since = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tick = max(0.2, min(5.0, self.timeout / 20))

    # ------------------------------------------------------------------ the main thread's side

    def enter(self, phase: str | None, step: int) -> None:
        """This rank now runs `phase` of optimizer step `step` (None: between steps, no deadline)."""
        self.phase, self.step, self.since = phase, step, time.monotonic()

    def start(self) -> "Progress":
        self._stop.clear()
        self.since = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="archtune-progress", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "Progress":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ the watchdog thread

    def _record(self, stuck: bool = False) -> dict:
        return {"rank": self.rank, "phase": self.phase, "step": self.step, "stuck": stuck,
                "seconds": round(time.monotonic() - self.since, 1)}

    def _publish(self, record: dict) -> None:
        if self.store is None:
            return
        try:
            self.store.set(KEY.format(rank=self.rank), json.dumps(record))
        except Exception:  # the store is gone (torchrun is stopping the run): nothing to tell
            pass

    def _watch(self) -> None:
        while not self._stop.wait(self.tick):
            self._publish(self._record())  # each tick: how long this phase has lasted, for the message
            if self._is_stuck_here():
                self._publish(self._record(stuck=True))
                self.say(self.describe())
                os._exit(EXIT_NO_PROGRESS)  # the main thread is the one that is stuck

    # ------------------------------------------------------------------ the message

    def records(self) -> dict[int, dict]:
        """Every rank's last published phase (ranks that published nothing are left out)."""
        found: dict[int, dict] = {self.rank: self._record(stuck=self._is_stuck_here())}
        if self.store is None:
            return found
        for r in range(self.world_size):
            if r == self.rank:
                continue
            try:
                if self.store.check([KEY.format(rank=r)]):
                    found[r] = json.loads(self.store.get(KEY.format(rank=r)))
            except Exception:
                break
        return found

    def _is_stuck_here(self) -> bool:
        return self.phase is not None and time.monotonic() - self.since > self.timeout

    def culprits(self, records: dict[int, dict]) -> list[int]:
        """The ranks that stopped the run: those furthest behind (an earlier step, an earlier phase
        of it: the others wait for them in a collective), else, all being level, those that say
        they are stuck."""
        position = {r: (rec["step"], ORDER.get(rec["phase"], 3)) for r, rec in records.items()}
        behind = min(position.values())
        ranks = sorted(r for r, p in position.items() if p == behind)
        if len(ranks) < len(records):
            return ranks
        return sorted(r for r, rec in records.items() if rec.get("stuck"))

    def describe(self, error: str | None = None) -> str:
        """One message, the same on every rank: which rank stopped making progress, in which phase."""
        records = self.records()
        culprits = self.culprits(records)
        head = f"archtune: rank {self.rank}: stopping:"
        if culprits:
            said = "; ".join(f"rank {r} made no progress for {records[r]['seconds']:.0f} s while {_phase(records[r])}"
                             for r in culprits)
            text = f"{head} {said} (ddp_timeout {self.timeout:.0f} s)."
        else:
            text = f"{head} a collective failed while this rank was {_phase(records[self.rank])}."
        others = [f"rank {r} was in {_phase(rec)}" for r, rec in sorted(records.items())
                  if r not in culprits and r != self.rank]
        if others:
            text += f" Meanwhile {', '.join(others)}."
        if error and not culprits:
            text += f" ({error.strip().splitlines()[0][:300]})"
        return text + ("\nfix: look at what that rank was doing (its data files and disk, its data loader workers, "
                       "its device); raise ddp_timeout if that phase is rightly slower")


def _phase(record: dict) -> str:
    phase = record.get("phase")
    if phase is None:
        return f"between steps (after step {record.get('step', 0)})"
    if phase == SAVING:
        return f"saving checkpoint-{record.get('step')}"
    return f"{phase} step {record.get('step')}"


__all__ = ["COMPUTING", "EXIT_NO_PROGRESS", "LOADING", "Progress", "SAVING"]
