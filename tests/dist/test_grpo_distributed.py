"""GRPO under DDP (2 gloo processes, `archtune train --nproc 2`) equals one process on the same
seeds: tiny Llama with LoRA, SGD, 4 steps of 4 prompts x 4 completions of at most 8 tokens.

Each completion is sampled from its own seed (the run's seed, the step, its row in the step's
generation batch over all processes), so both runs sample the same completions. TRL hands rank R
rows [R*n, (R+1)*n) of the step's batch, gathers the rewards for the group advantages and slices
them back; what stays to compare is how the loss is reduced:

- dapo (TRL's default): token sum / the tokens of the whole generation batch (gathered), times
  the processes, then DDP's mean over processes: the same as one process;
- grpo: the mean over sequences of each sequence's token mean; dr_grpo: the token sum /
  (sequences x max_completion_length): with the same number of sequences on every rank, DDP's mean
  is the mean over all sequences, as for one process;
- bnpo is left out: it divides by the tokens of this rank's micro-batch, so 2 processes weigh
  the ranks' token means equally where one process takes the token mean of the whole batch; the two
  agree only when both halves hold as many tokens.

One process takes the same global batch as micro_batch_size 16 (2 x 8); for dapo also as
micro_batch_size 8 with gradient_accumulation_steps 2 (one generation of 16 completions, trained on
in 2 micro-batches). A test-side plugin (tests/e2e/stop_tokens_plugin.py) makes completions end at
different lengths, without which every normalization above coincides.
"""
from __future__ import annotations

import pytest

from tests.dist import hooks
from tests.dist.conftest import REPO, max_rel_diff

REWARDS = (
    "def number_prompts(cfg, *args, **kwargs):\n"
    "    return (lambda row, tokenizer=None: {'prompt': [{'role': 'user', 'content': row['question']}]}), "
    "{'remove_columns': ['question']}\n"
    "def distinct(prompts, completions, **kwargs):\n"
    "    return [len(set(c[0]['content'])) / 10 for c in completions]\n")
GRPO = {"base_model": "tiny:llama", "rl": "grpo", "micro_batch_size": 8,
        "trl": {"reward_funcs": ["grpo_rewards.distinct"], "num_generations": 4, "max_completion_length": 8},
        "datasets": [{"path": str(REPO / "examples/grpo/data/train.jsonl"), "type": "grpo_rewards.number_prompts"}],
        "test_datasets": None, "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "plugins": [hooks.PLUGIN, "tests.e2e.stop_tokens_plugin.StopTokensPlugin"]}


def _grpo(train_run, name: str, loss_type: str, nproc: int = 2, **keys):
    (train_run.root / "grpo_rewards.py").write_text(REWARDS)
    run = train_run(f"grpo_{name}_{loss_type}", nproc=nproc,
                    **{**GRPO, "trl": {**GRPO["trl"], "loss_type": loss_type}, **keys})
    assert run.rc == 0, run.stderr[-4000:]
    return run


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grpo_on_two_processes_equals_one_process_with_the_same_global_batch(train_run, loss_type):
    ddp = _grpo(train_run, "ddp", loss_type)
    single = _grpo(train_run, "single", loss_type, nproc=1, micro_batch_size=16)
    s = ddp.summary
    assert s["world_size"] == 2 and s["strategy"] == "ddp" and single.summary["world_size"] == 1
    assert s["steps"] == single.summary["steps"] == 4
    # Completions of different lengths: the loss types differ, and each is compared as itself.
    assert s["completions/min_length"] < s["completions/max_length"]
    # The same completions were sampled, so the same rewards, step by step.
    assert len(s["train_rewards"]) == 4 and s["train_rewards"] == single.summary["train_rewards"]
    diff = max_rel_diff(ddp.weights(), single.weights())
    print(f"GRPO {loss_type}: 2 processes vs 1, adapter max relative difference {diff:.3g}")
    assert diff < 1e-5
    rank0, rank1 = ddp.rank_states()
    assert rank0 and max_rel_diff(rank0, rank1) == 0.0


def test_grpo_with_gradient_accumulation_equals_two_processes(train_run):
    ddp = _grpo(train_run, "ddp", "dapo")
    accumulated = _grpo(train_run, "accumulated", "dapo", nproc=1, gradient_accumulation_steps=2)
    assert accumulated.summary["train_rewards"] == ddp.summary["train_rewards"]
    diff = max_rel_diff(accumulated.weights(), ddp.weights())
    print(f"GRPO dapo: 1 process x 2 accumulated micro-batches vs 2 processes, max relative difference {diff:.3g}")
    assert diff < 1e-5
