"""Test-side plugin for the reward-model tests (`plugins: [tests.e2e.reward_probe.RewardProbe]` with
`allow_external_plugins: true`), so product code carries no test-only branch. When
ARCHTUNE_TEST_REWARD_PROBE=DIR is set it writes, into DIR:

- before.safetensors: every parameter of the assembled model (adapters on) before the first step;
- after.safetensors: the same parameters after the last step;
- trainable.json: the names of the parameters that train;
- scores.safetensors: per batch I of one more pass of the training loader (as TRL collates it: the
  batch's chosen sequences, then its rejected ones), `input_ids.I`, `attention_mask.I` and the trained model's
  scores of them in evaluation mode, `scores.I`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from archtune.plugins import BasePlugin

PROBE_ENV = "ARCHTUNE_TEST_REWARD_PROBE"
PLUGIN = "tests.e2e.reward_probe.RewardProbe"


def _save(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(path))


class _Scores(TrainerCallback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        _save(self.out / "after.safetensors", dict(model.named_parameters()))
        mode = model.training
        model.eval()
        batches = {}
        with torch.no_grad():
            for i, batch in enumerate(train_dataloader):
                batch = {k: batch[k].to(model.device) for k in ("input_ids", "attention_mask")}
                batches.update({f"scores.{i}": model(**batch, use_cache=False).logits.float(),
                                f"input_ids.{i}": batch["input_ids"], f"attention_mask.{i}": batch["attention_mask"]})
        model.train(mode)
        from safetensors.torch import save_file

        save_file({k: v.cpu().contiguous() for k, v in batches.items()}, str(self.out / "scores.safetensors"))


class RewardProbe(BasePlugin):
    name = "reward_probe"

    def __init__(self):
        target = os.environ.get(PROBE_ENV)
        self.out = Path(target) if target else None

    def post_adapters(self, model, plan) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        _save(self.out / "before.safetensors", dict(model.named_parameters()))
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        (self.out / "trainable.json").write_text(json.dumps(trainable))

    def callbacks(self, plan) -> list:
        return [_Scores(self.out)] if self.out is not None else []
