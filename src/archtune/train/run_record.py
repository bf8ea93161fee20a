"""What an output_dir holds before a run starts, and the record every run leaves in it.

Order in the recipe: `resume_checkpoint` and `refuse_reuse` read output_dir (nothing is written);
only once the config, the plan, the data and the model have all passed their checks does
`claim_output_dir` write there: an earlier run's weights and checkpoints are set aside (when
`overwrite_output_dir: true`), and `run_record.json` is written:

    {"config": the keys as given (file and overrides), "plan": the `archtune check --json` object,
     "versions": {archtune, torch, transformers, peft, ...}, "data_cache_key": "...",
     "world_size": N, "resumed_from": "checkpoint-N" | null, "started_at": "...",
     "launch": {"run_id": torchrun's attempts' shared id | null, "restart": TORCHELASTIC_RESTART_COUNT},
     "threads": {"torch_threads": N, "omp_wait_policy": "PASSIVE" | "libgomp default ..."},
     "earlier_starts": [the records of earlier starts of this run (resumed runs)]}
"""
from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

from archtune.errors import UserError
from archtune.plan.train_settings import TrainSettings
from archtune.train.checkpoints import (
    TRAINER_STATE,
    complete_checkpoints,
    is_finished,
    last_complete_checkpoint,
    write_json_atomic,
)

RECORD = "run_record.json"
PACKAGES = ("archtune", "torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def threads() -> dict:
    """torch's CPU threads and how idle ones wait (the command line chose that before torch loaded:
    archtune/cli/threads.py)."""
    import torch

    return {"torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "libgomp default (spin briefly, then sleep)"}


def resume_checkpoint(settings: TrainSettings, out: Path) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh start.

    `resume_from_checkpoint: true`: the last complete checkpoint in output_dir (an error when there
    is none). `auto_resume_from_checkpoints: true` or `resume_from_checkpoint: auto`: the same, or a
    fresh start when there is none. A path: that checkpoint, which must be complete.
    """
    value = settings.resume_from_checkpoint
    if value is True:
        found = last_complete_checkpoint(out)
        if found is None:
            raise UserError.single("resume_from_checkpoint", f"{out} holds no complete checkpoint to resume from",
                                   "point output_dir at the run to continue, or remove resume_from_checkpoint "
                                   "to start fresh")
        return found
    if value == "auto" or (value in (None, False) and settings.auto_resume_from_checkpoints):
        return last_complete_checkpoint(out)
    if isinstance(value, str) and value:
        path = Path(value)
        if not (path / TRAINER_STATE).is_file():
            what = "does not exist" if not path.exists() else f"is not a complete checkpoint (no {TRAINER_STATE})"
            raise UserError.single("resume_from_checkpoint", f"{value} {what}",
                                   "give a checkpoint-N directory of an earlier run, or `true` for the last "
                                   "complete one in output_dir")
        return path
    return None


def refuse_reuse(settings: TrainSettings, out: Path, resume: Path | None) -> None:
    """An output_dir that holds a finished run, or checkpoints of an unfinished one, is not reused
    for a fresh start unless `overwrite_output_dir: true` says so."""
    if resume is not None or settings.overwrite_output_dir:
        return
    if is_finished(out):
        raise UserError.single("output_dir", f"{out} holds a finished run (train_summary.json)",
                               "choose another output_dir, set overwrite_output_dir: true to replace it (its "
                               "files are moved to a previous-<time>/ folder), or resume_from_checkpoint: true")
    done = complete_checkpoints(out)
    if done:
        raise UserError.single("output_dir", f"{out} holds checkpoints of an unfinished run (up to {done[-1].name})",
                               "resume_from_checkpoint: true continues it; overwrite_output_dir: true starts over "
                               "(its files are moved to a previous-<time>/ folder)")


def restart_resume(out: Path, run_id: str | None, restart: int) -> tuple[bool, Path | None]:
    """A torchrun restart (`restart` > 0) of the run that claimed `out` (its record holds `run_id`)
    continues that run: (True, its last complete checkpoint or None). Anything else: (False, None),
    the config decides."""
    if restart < 1 or run_id is None:
        return False, None
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        return False, None
    if (record.get("launch") or {}).get("run_id") != run_id:
        return False, None
    return True, last_complete_checkpoint(out)


def write_run_record(out: Path, *, config: dict, plan: dict, cache_key: str | None, world_size: int,
                     resumed_from: Path | None, launch: dict | None = None) -> Path:
    path = out / RECORD
    earlier: list = []
    if (resumed_from is not None or (launch or {}).get("restart")) and path.is_file():
        try:
            old = json.loads(path.read_text())
            earlier = old.pop("earlier_starts", []) + [old]
        except (OSError, ValueError):
            earlier = []
    record = {
        "config": config,
        "plan": plan,
        "versions": versions(),
        "data_cache_key": cache_key,
        "world_size": world_size,
        "resumed_from": resumed_from.name if resumed_from is not None else None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "launch": launch or {"run_id": None, "restart": 0},
        "threads": threads(),
        "earlier_starts": earlier,
    }
    return write_json_atomic(path, record)


__all__ = ["RECORD", "versions", "threads", "resume_checkpoint", "refuse_reuse", "restart_resume", "write_run_record"]
