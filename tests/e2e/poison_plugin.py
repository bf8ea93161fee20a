"""A plugin for the non-finite tests: every token of "☠" embeds as +inf, so exactly the batches
that hold a row with that character get a non-finite loss (a poisoned row, as corrupt data or a
broken embedding row would give)."""
from __future__ import annotations

import torch

from archtune.plugins import BasePlugin

POISON = "☠"


class PoisonPlugin(BasePlugin):
    name = "poison"

    def post_model_load(self, model, plan) -> None:
        from archtune.assets import load_tokenizer

        ids = torch.tensor(load_tokenizer()(POISON, add_special_tokens=False)["input_ids"])

        def hook(module, inputs, output):
            hit = torch.isin(inputs[0], ids).unsqueeze(-1)
            return output.masked_fill(hit, float("inf"))

        model.get_input_embeddings().register_forward_hook(hook)
