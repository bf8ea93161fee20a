"""The crash-safety guards hold for `rl: grpo` (real `archtune train` subprocesses, tiny Llama with
LoRA, 4 steps of 2 prompts x 4 sampled completions):

- SIGKILL after step 3 and a resume from checkpoint-2 end with exactly the weights of an
  uninterrupted run: the rollouts sample the same completions after the resume (the RNG state of
  the checkpoint comes back), so the updates are the same;
- SIGTERM: a checkpoint at the step end, exit 75, and the resumed run finishes;
- a rollout whose sampling probabilities are not finite (a poisoned prompt) stops the run with one
  message naming the step and the prompt's FILE:LINE.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import REPO, read_json
from tests.e2e.poison_plugin import POISON
from tests.e2e.test_resume import assert_identical, killed, resumed_from, weights

KILL_ENV = "ARCHTUNE_TEST_KILL_AT"
REWARDS = (
    "def distinct(prompts, completions, **kwargs):\n"
    "    text = lambda c: c[0]['content'] if isinstance(c, list) else c\n"
    "    return [len(set(text(c))) / 10 for c in completions]\n")
BASE = {"base_model": "tiny:llama", "rl": "grpo",
        "trl": {"reward_funcs": ["rewards_distinct.distinct"], "num_generations": 4, "max_completion_length": 6},
        "datasets": [{"path": str(REPO / "examples/grpo/data/train.jsonl"), "type": "rewards.number_prompts"}],
        "sequence_len": 64, "micro_batch_size": 8, "max_steps": 4, "save_steps": 2, "learning_rate": 0.01,
        "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "logging_steps": 1, "seed": 7,
        "use_tensorboard": False, "plugins": ["tests.e2e.kill_plugin.KillPlugin"], "allow_external_plugins": True}


def grpo_run(tmp: Path, name: str, kill_at: str | None = None, **keys) -> subprocess.CompletedProcess:
    (tmp / "rewards_distinct.py").write_text(REWARDS)
    (tmp / "rewards.py").write_text((REPO / "examples/grpo/rewards.py").read_text())
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "output_dir": str(tmp / name), **keys}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "archtune", "train", str(cfg)], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo_guards")
    proc = grpo_run(tmp, "straight")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def test_grpo_killed_and_resumed_ends_with_the_uninterrupted_runs_weights(straight):
    first = grpo_run(straight, "killed", kill_at="step:3")
    assert killed(first), first.stderr[-3000:]
    resumed = grpo_run(straight, "killed", resume_from_checkpoint=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_from(resumed) == 2
    assert_identical(weights(straight / "killed"), weights(straight / "straight"))
    a, b = read_json(straight / "killed/train_summary.json"), read_json(straight / "straight/train_summary.json")
    assert a["reward_mean_last"] == b["reward_mean_last"]  # the same completions were sampled


def test_grpo_sigterm_saves_a_checkpoint_and_exits_75_then_resumes(straight):
    proc = grpo_run(straight, "term", kill_at="term:2", save_steps=10)
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "stopped by SIGTERM after step 3" in text and "Traceback" not in text
    assert sorted(p.name for p in (straight / "term").glob("checkpoint-*")) == ["checkpoint-3"]
    resumed = grpo_run(straight, "term", save_steps=10, resume_from_checkpoint=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_json(straight / "term/train_summary.json")["steps"] == 4


def test_grpo_non_finite_rollout_stops_naming_the_step_and_the_prompt(straight):
    """A prompt whose tokens embed as +inf (tests/e2e/poison_plugin.py) makes the sampling
    probabilities nan: one message naming the step and that prompt's FILE:LINE, exit 3."""
    rows = (REPO / "examples/grpo/data/train.jsonl").read_text().splitlines()[:16]
    row = json.loads(rows[5])
    row["question"] += f" {POISON}"
    rows[5] = json.dumps(row, ensure_ascii=False)
    path = straight / "poisoned.jsonl"
    path.write_text("\n".join(rows) + "\n")
    # The policy never samples the poisoned tokens itself (suppress_tokens): only the prompt carries them.
    from archtune.assets import load_tokenizer

    poison = load_tokenizer()(POISON, add_special_tokens=False)["input_ids"]
    proc = grpo_run(straight, "nan", datasets=[{"path": str(path), "type": "rewards.number_prompts"}], save_steps=1,
                    max_steps=8, plugins=["tests.e2e.poison_plugin.PoisonPlugin"],
                    trl={**BASE["trl"], "generation_kwargs": {"suppress_tokens": poison}})
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert text.count("stopped at step") == 1 and "Traceback" not in text
    step = int(text.split("stopped at step ")[1].split(":")[0])
    assert "probabilities are not finite" in text and f"{path}:6" in text
    assert step == 1 or f"checkpoint-{step - 1}" in text
