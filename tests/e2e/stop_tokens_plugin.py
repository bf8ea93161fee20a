"""A plugin for the GRPO tests that need completions of different lengths: 128 more token ids end a
completion (the model's generation_config declares them as eos ids, which TRL's GRPOTrainer, the
rollouts and the evaluation all read), so a random tiny model (2048 tokens, nearly uniform) stops
early in about 6% of its steps instead of almost never. Without it every completion runs to
max_completion_length and GRPO's loss normalizations (per sequence, per token, per batch) coincide."""
from __future__ import annotations

from archtune.plugins import BasePlugin

STOP_TOKENS = tuple(range(100, 228))


class StopTokensPlugin(BasePlugin):
    name = "stop_tokens"

    def post_model_load(self, model, plan) -> None:
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        model.generation_config.eos_token_id = eos + [t for t in STOP_TOKENS if t not in eos]
