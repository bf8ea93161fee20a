"""Checkpoints and outputs that are either complete or absent.

A checkpoint is written into `output_dir/.staging/checkpoint-N/` and renamed to
`output_dir/checkpoint-N/` once every file of it is on disk (a rename within one file system is
atomic), so a kill during a save leaves at most a staging directory, which resume never reads and
the next save clears. Final outputs are written the same way, file by file, with
`train_summary.json` last: an output_dir holds a finished run exactly when it has that file.

    last_complete_checkpoint(out)   # the newest checkpoint-N with its trainer state, or None
    rotate(out, limit)              # save_total_limit; never the newest complete checkpoint
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STAGING = ".staging"  # inside output_dir: checkpoints and outputs being written
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Written last by transformers' Trainer into a checkpoint: a checkpoint without it is incomplete
# (one written by an older archtune, or copied half-way).
TRAINER_STATE = "trainer_state.json"
SUMMARY = "train_summary.json"


def checkpoint_step(path: Path) -> int | None:
    m = _CHECKPOINT.match(path.name)
    return int(m.group(1)) if m else None


def complete_checkpoints(out: Path) -> list[Path]:
    """checkpoint-N directories of `out` that hold their trainer state, oldest step first."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if checkpoint_step(p) is not None and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=checkpoint_step)


def last_complete_checkpoint(out: Path) -> Path | None:
    done = complete_checkpoints(out)
    return done[-1] if done else None


def staging_dir(out: Path) -> Path:
    return out / STAGING


def clear_staging(out: Path, name: str) -> Path:
    """`out/.staging/NAME`, removed if a killed save left it; its parent exists."""
    target = staging_dir(out) / name
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _fsync_tree(path: Path) -> None:
    """Flush every file under `path` (and the directories) to disk before the rename publishes it."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_checkpoint(staged: Path, out: Path) -> Path:
    """Rename a fully written `out/.staging/checkpoint-N` to `out/checkpoint-N`."""
    _fsync_tree(staged)
    final = out / staged.name
    if final.exists():  # the same step saved again (a resumed run): the new one replaces it whole
        old = staging_dir(out) / f"{staged.name}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staged.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.rename(final)
    _fsync_dir(out)
    return final


def publish_outputs(staged: Path, out: Path) -> list[str]:
    """Move every file of a fully written `staged` directory into `out`, each by an atomic rename
    (replacing an older file of the same name); the staging directory is removed. Returns the names."""
    _fsync_tree(staged)
    names = []
    for item in sorted(staged.iterdir()):
        target = out / item.name
        if item.is_dir():
            if target.exists():
                shutil.rmtree(target)
            item.rename(target)
        else:
            os.replace(item, target)
        names.append(item.name)
    shutil.rmtree(staged, ignore_errors=True)
    try:
        staged.parent.rmdir()  # .staging itself, when nothing else is being written
    except OSError:
        pass
    _fsync_dir(out)
    return names


def write_json_atomic(path: Path, data: dict) -> Path:
    """`path` holds either its old content or all of `data`, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def rotate(out: Path, limit: int | None) -> list[Path]:
    """save_total_limit: delete the oldest complete checkpoints beyond `limit` (None or < 1: keep
    all). The newest complete checkpoint is never deleted. Returns what was deleted."""
    if not limit or limit < 1:
        return []
    done = complete_checkpoints(out)
    doomed = done[: max(0, len(done) - max(limit, 1))]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def is_finished(out: Path) -> bool:
    """A finished run: its summary was written (last of its outputs)."""
    return (out / SUMMARY).is_file()


__all__ = ["STAGING", "TRAINER_STATE", "SUMMARY", "checkpoint_step", "complete_checkpoints",
           "last_complete_checkpoint", "staging_dir", "clear_staging", "publish_checkpoint", "publish_outputs",
           "write_json_atomic", "rotate", "is_finished"]
