"""A plugin for the GRPO family tests: it records every parameter when training begins and, when
it ends, writes ARCHTUNE_TEST_PARAM_WATCH (a JSON file) with, per parameter name, whether it was
trainable, whether it changed, and whether it stayed finite (loaded through `plugins:` with
`allow_external_plugins: true`, like any user plugin)."""
from __future__ import annotations

import json
import os

import torch
from transformers import TrainerCallback

from archtune.plugins import BasePlugin

ENV = "ARCHTUNE_TEST_PARAM_WATCH"


class _Watch(TrainerCallback):
    def __init__(self) -> None:
        self.before: dict = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        target = os.environ.get(ENV)
        if not target or model is None:
            return
        report = {}
        for name, p in model.named_parameters():
            old = self.before[name]
            report[name] = {"trainable": p.requires_grad, "changed": not torch.equal(old, p.detach()),
                            "finite": bool(torch.isfinite(p.detach().float()).all())}
        with open(target, "w") as f:
            json.dump(report, f)


class ParamWatchPlugin(BasePlugin):
    name = "param_watch"

    def callbacks(self, plan) -> list:
        return [_Watch()]
