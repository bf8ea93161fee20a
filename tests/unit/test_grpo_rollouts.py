"""Seeded rollouts (train/rollouts.py) on the tiny Llama: a completion depends on its prompt and its
seed only, not on the rows beside it in the batch or their order, and the sampler draws from the
warped distribution (top-k 1 is greedy)."""
from __future__ import annotations

import torch
from transformers import GenerationConfig

from archtune.models.tiny import build_tiny_model
from archtune.train.rollouts import TRAINING_STREAM, completion_seeds, generate_completions

PROMPTS = [[5, 17, 99], [8, 300, 41, 7, 12], [1200, 3], [64, 65, 66, 67]]


def _model():
    model, _ = build_tiny_model("llama")
    model.eval()
    return model


def _config(**sampling) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": 10, "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                               "pad_token_id": 0, "eos_token_id": [1], **sampling})


def test_a_completion_is_the_same_in_any_batch():
    model = _model()
    seeds = completion_seeds(7, TRAINING_STREAM, 3, 0, len(PROMPTS))
    together = generate_completions(model, PROMPTS, _config(), seeds=seeds, device="cpu")
    # Two "processes" of two rows each, the second in reverse order.
    apart = generate_completions(model, PROMPTS[:2], _config(), seeds=seeds[:2], device="cpu") + \
        generate_completions(model, PROMPTS[:1:-1], _config(), seeds=seeds[:1:-1], device="cpu")[::-1]
    assert together == apart and len({tuple(c) for c in together}) == 4
    # The global RNG is neither read nor decides anything.
    torch.manual_seed(123)
    assert generate_completions(model, PROMPTS, _config(), seeds=seeds, device="cpu") == together
    other = completion_seeds(7, TRAINING_STREAM, 4, 0, len(PROMPTS))  # the next step: other completions
    assert generate_completions(model, PROMPTS, _config(), seeds=other, device="cpu") != together


def test_the_sampler_applies_the_warpers_top_k_1_is_greedy():
    model = _model()
    greedy = generate_completions(model, PROMPTS, GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0,
                                                                   eos_token_id=[1]), seeds=None, device="cpu")
    seeds = completion_seeds(7, TRAINING_STREAM, 0, 0, len(PROMPTS))
    assert generate_completions(model, PROMPTS, _config(top_k=1), seeds=seeds, device="cpu") == greedy
