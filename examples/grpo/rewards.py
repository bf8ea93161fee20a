"""Reward functions and the dataset transform of examples/grpo/config.yaml (Axolotl's GRPO shape:
`trl.reward_funcs: [rewards.digits]`, `datasets[].type: rewards.number_prompts`).

The task: each prompt asks for a number ("Write a phone number.", "How many legs does a spider
have?"); a completion is rewarded for the share of its characters that are digits. A random tiny
model writes digits rarely; GRPO teaches it to answer in digits, on prompts it never saw too.
"""
from __future__ import annotations


def _text(completion) -> str:
    # Conversational prompts give completions as [{"role": "assistant", "content": ...}].
    return completion[0]["content"] if isinstance(completion, list) else completion


def digits(prompts, completions, **kwargs) -> list[float]:
    """The share of the completion's non-space characters that are digits (0 for an empty one)."""
    out = []
    for completion in completions:
        chars = [c for c in _text(completion) if not c.isspace()]
        out.append(sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0)
    return out


def number_prompts(cfg, *args, **kwargs):
    """Rows {"question": ...} -> a one-turn conversation (the chat template renders it)."""
    def transform_fn(example, tokenizer=None):
        return {"prompt": [{"role": "user", "content": example["question"]}]}

    return transform_fn, {"remove_columns": ["question"]}
