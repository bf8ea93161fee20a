"""archtune.moe.routing_stats: exact counts and statistics on a crafted router, logging, warnings."""
from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import archtune.moe  # noqa: F401  (registers scattermoe)
from archtune.moe.routing_stats import RoutingStats, experts_modules, load_stats

E, H, K = 4, 4, 2


class CraftedBlock(nn.Module):
    """Router with known decisions: logits = 10 * x + bias, bias [0.3, 0.2, 0.1, 0.0].

    A one-hot token e_i routes to expert i first and to the highest-bias other expert second
    (0, or 1 when i == 0). Tokens [e0, e1, e1, e2] give pairs (0,1) (1,0) (1,0) (2,0):
    counts [4, 3, 1, 0].
    """

    def __init__(self):
        super().__init__()
        from transformers import Gemma4TextConfig
        from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

        self.router = nn.Linear(H, E)
        with torch.no_grad():
            self.router.weight.copy_(10 * torch.eye(E))
            self.router.bias.copy_(torch.tensor([0.3, 0.2, 0.1, 0.0]))
        config = Gemma4TextConfig(hidden_size=H, num_experts=E, top_k_experts=K, moe_intermediate_size=4,
                                  enable_moe_block=True, num_hidden_layers=1, vocab_size=16)
        config._experts_implementation = "scattermoe"
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].experts = Gemma4TextExperts(config)
        with torch.no_grad():
            for p in self.layers[0].experts.parameters():
                p.normal_(0, 0.1)

    def forward(self, x):
        weights, index = torch.topk(torch.softmax(self.router(x), -1), K, dim=-1)
        return self.layers[0].experts(x, index, weights)


TOKENS = torch.eye(E)[[0, 1, 1, 2]]
EXPECTED = [4, 3, 1, 0]
NAME = "layers.0.experts"


def entropy(counts):
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c)


def test_load_stats_worked_example():
    s = load_stats([6, 2, 0, 0])
    assert s["tokens"] == 8 and s["min"] == 0 and s["max"] == 6
    assert s["min_load"] == 0.0 and s["max_load"] == 3.0
    assert s["entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert s["entropy_normalized"] == pytest.approx(0.5623351446 / math.log(4))
    assert s["rare_experts"] == [2, 3]
    assert load_stats([5, 5, 5, 5])["entropy_normalized"] == pytest.approx(1.0)
    assert load_stats([1000, 1000, 1000, 9])["rare_experts"] == []  # 9 >= 1% of 752.25
    assert load_stats([1000, 1000, 1000, 7])["rare_experts"] == [3]  # 7 < 7.5


def test_exact_counts_on_crafted_router():
    block = CraftedBlock().train()
    stats = RoutingStats.attach(block)
    assert list(stats.layers) == [NAME]
    block(TOKENS)
    assert stats.counts() == {NAME: EXPECTED}
    block(TOKENS)
    assert stats.counts() == {NAME: [2 * c for c in EXPECTED]}
    s = stats.summary()
    layer = s["layers"][NAME]
    assert layer["counts"] == [8, 6, 2, 0] and layer["tokens"] == 16 and layer["layer"] == 0
    assert layer["min"] == 0 and layer["max"] == 8
    assert layer["max_load"] == pytest.approx(2.0)
    assert layer["entropy"] == pytest.approx(entropy(EXPECTED))
    assert layer["entropy_normalized"] == pytest.approx(entropy(EXPECTED) / math.log(E))
    assert s["rare_experts"] == {NAME: [3]}
    assert s["top_k"] == K
    json.dumps(s)  # JSON-able for train_summary.json


def test_eval_and_checkpoint_recompute_are_not_counted():
    block = CraftedBlock()
    stats = RoutingStats.attach(block)
    block.eval()
    block(TOKENS)
    assert stats.counts() == {NAME: [0, 0, 0, 0]}
    block.train()
    x = TOKENS.clone().requires_grad_(True)
    out = checkpoint(block, x, use_reentrant=False)
    out.sum().backward()  # re-runs the forward inside backward
    assert stats.counts() == {NAME: EXPECTED}
    stats.detach()
    block(TOKENS)
    assert stats.counts() == {NAME: EXPECTED}


def _state(step=1):
    return SimpleNamespace(global_step=step, log_history=[{"loss": 1.0, "step": step}], is_world_process_zero=True)


def test_on_log_adds_per_layer_scalars_for_the_window():
    block = CraftedBlock().train()
    stats = RoutingStats.attach(block)
    block(TOKENS)
    logs, state = {"loss": 1.0}, _state()
    stats.on_log(None, state, None, logs=logs)
    assert logs["moe/layer_0/min_load"] == 0.0
    assert logs["moe/layer_0/max_load"] == pytest.approx(2.0)
    assert logs["moe/layer_0/entropy"] == pytest.approx(entropy(EXPECTED) / math.log(E), abs=1e-6)
    assert state.log_history[-1]["moe/layer_0/max_load"] == logs["moe/layer_0/max_load"]
    # next window: only tokens routed since the last log
    block(torch.eye(E)[[3, 3]])  # pairs (3,0) (3,0): counts [2, 0, 0, 2]
    logs = {"loss": 0.5}
    stats.on_log(None, _state(2), None, logs=logs)
    assert logs["moe/layer_0/max_load"] == pytest.approx(2.0)
    assert logs["moe/layer_0/entropy"] == pytest.approx(1 / 2)  # ln 2 / ln 4
    assert stats.counts() == {NAME: [6, 3, 1, 2]}  # totals keep everything


def test_rare_experts_warning_at_train_end(caplog):
    block = CraftedBlock().train()
    stats = RoutingStats.attach(block)
    block(TOKENS)
    with caplog.at_level(logging.WARNING, logger="archtune.moe.routing_stats"):
        stats.on_train_end(None, _state(), None)
    assert "under 1% of a uniform share" in caplog.text
    assert "layer_0: [3]" in caplog.text


def test_install_puts_the_callback_first():
    stats = RoutingStats()
    trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=["printer", "tensorboard"]))
    stats.install(trainer)
    assert trainer.callback_handler.callbacks[0] is stats


@pytest.mark.parametrize("name", ["gemma4-moe", "qwen3_5-moe"])
def test_finds_every_experts_module_of_tiny_models_with_and_without_peft(name):
    from peft import LoraConfig, get_peft_model

    from archtune.models.tiny import build_tiny_model

    model, _ = build_tiny_model(name)
    names = [n for n, _ in experts_modules(model)]
    assert len(names) == 4 and all(n.endswith("experts") for n in names)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=[], lora_dropout=0.0,
                                                  target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    wrapped = [n for n, _ in experts_modules(peft_model)]
    assert len(wrapped) == 4 and all(n.endswith("base_layer.base_layer") for n in wrapped)
    stats = RoutingStats.attach(peft_model)
    peft_model.train()
    peft_model(input_ids=torch.randint(10, 500, (2, 8)), use_cache=False)
    counts = stats.counts()
    assert sorted(v["layer"] for v in stats.layers.values()) == [0, 1, 2, 3]
    assert all(sum(c) == 2 * 8 * 2 for c in counts.values())  # tokens x top-2
