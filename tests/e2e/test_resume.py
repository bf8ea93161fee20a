"""A run killed with SIGKILL and resumed ends with exactly the weights of an uninterrupted run.

Real `archtune train` subprocesses; the kill comes from a plugin loaded the way users load theirs
(tests/e2e/kill_plugin.py), at three points: between checkpoints, in the middle of gradient
accumulation, and while a checkpoint is being written. The full fine-tune packs its rows, the
LoRA run uses dropout (the RNG state must come back too); both accumulate 2 micro-batches per
step, cross an epoch boundary and use a warmup + cosine schedule.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import QUICKSTART_DATA, REPO, head_jsonl

KILL_ENV = "ARCHTUNE_TEST_KILL_AT"
STEPS = 8
BASE = {
    "base_model": "tiny:llama",
    "sequence_len": 128,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "max_steps": STEPS,
    "save_steps": 2,
    "learning_rate": 0.002,
    "lr_scheduler": "cosine",
    "warmup_steps": 2,
    "seed": 7,
    "logging_steps": 1,
    "use_tensorboard": False,
    "plugins": ["tests.e2e.kill_plugin.KillPlugin"],
    "allow_external_plugins": True,
}
FULL = {"sample_packing": True}
LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "lora_target_linear": True}


class Trainer:
    """Writes one config per output_dir and runs `archtune train` on it."""

    def __init__(self, tmp: Path, keys: dict):
        self.tmp = tmp
        data = head_jsonl(QUICKSTART_DATA / "train.jsonl", tmp / "train.jsonl", 40)
        self.keys = {**BASE, **keys, "datasets": [{"path": str(data), "type": "alpaca"}],
                     "dataset_prepared_path": str(tmp / "prepared")}

    def run(self, name: str, kill_at: str | None = None, **keys) -> subprocess.CompletedProcess:
        out = self.tmp / name
        cfg = self.tmp / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({**self.keys, "output_dir": str(out), **keys}))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
               "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop(KILL_ENV, None)
        if kill_at:
            env[KILL_ENV] = kill_at
        return subprocess.run([sys.executable, "-m", "archtune", "train", str(cfg)], env=env, cwd=self.tmp,
                              capture_output=True, text=True, timeout=600)


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (out / name).is_file():
            return load_file(str(out / name))
    raise AssertionError(f"no final weights in {out}: {sorted(p.name for p in out.iterdir())}")


def assert_identical(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    differ = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"{len(differ)} of {len(a)} tensors differ; largest: {max(differ.values())}"


def resumed_from(proc: subprocess.CompletedProcess) -> int | None:
    m = re.search(r"resuming from checkpoint-(\d+)", proc.stdout + proc.stderr)
    return int(m.group(1)) if m else None


def killed(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == -9


def complete_checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    t = Trainer(tmp_path_factory.mktemp("resume_full"), FULL)
    straight = t.run("straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    return t


def test_full_fine_tune_killed_three_times_resumes_to_identical_weights(full):
    """One output_dir, killed after step 5, then during the save of checkpoint-6, then in the middle
    of step 7's gradient accumulation; each resume takes the last complete checkpoint."""
    first = full.run("chain", kill_at="step:5")
    assert killed(first), first.stderr[-3000:]
    out = full.tmp / "chain"
    assert complete_checkpoints(out) == [2, 4]

    second = full.run("chain", kill_at="save:6", resume_from_checkpoint=True)
    assert killed(second), second.stderr[-3000:]
    assert resumed_from(second) == 4
    assert complete_checkpoints(out) == [2, 4]  # the half-written checkpoint-6 is not one

    third = full.run("chain", kill_at="substep:6", resume_from_checkpoint=True)
    assert killed(third), third.stderr[-3000:]
    assert resumed_from(third) == 4
    assert complete_checkpoints(out) == [2, 4, 6]

    last = full.run("chain", resume_from_checkpoint=True)
    assert last.returncode == 0, last.stderr[-3000:]
    assert resumed_from(last) == 6
    assert_identical(weights(out), weights(full.tmp / "straight"))


def test_lora_with_dropout_killed_mid_accumulation_resumes_to_identical_weights(tmp_path):
    t = Trainer(tmp_path, LORA)
    straight = t.run("straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = t.run("killed", kill_at="substep:3")
    assert killed(first), first.stderr[-3000:]
    resumed = t.run("killed", auto_resume_from_checkpoints=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_from(resumed) == 2
    assert_identical(weights(tmp_path / "killed"), weights(tmp_path / "straight"))
