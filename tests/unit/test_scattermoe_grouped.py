"""scattermoe's grouped strategy (one grouped_mm per product over all experts) against its loop
strategy and transformers' eager experts, both strategies asked for explicitly, on CPU; and the
default strategy's rule.

fp32, 1e-5 relative, per tensor: outputs and every gradient (hidden states, routing weights, PEFT
expert LoRA A/B, the base tensors when trained), for Gemma 4 and Qwen 3.5 (and the transposed
Aria and biased gpt-oss layouts), with experts that receive no tokens; whole tiny models with
expert LoRA (router and attention gradients included); bf16 autocast with a LoRA rank grouped_mm
cannot take as is (padded); and the fallbacks to the loop (4-bit experts, unaligned sizes, no
pairs), which run no grouped_mm at all.
"""
from __future__ import annotations

import functools

import pytest
import torch

from archtune.moe import scattermoe
from archtune.moe.scattermoe import CPU_FP32_GROUPED_MAX_BYTES, GROUPED, LOOP, default_strategy, resolve_strategy
from tests.unit.test_scattermoe import (
    KINDS,
    ROUTINGS,
    TOL,
    assert_same,
    lora_config,
    make_experts,
    rel_err,
    routing,
    run_block,
)

GROUPED_IMPL, LOOP_IMPL = "scattermoe_grouped_test", "scattermoe_loop_test"


@pytest.fixture(autouse=True)
def strategy_impls(monkeypatch):
    """transformers' experts registry entries running scattermoe with strategy GROUPED / LOOP, for this module only."""
    from transformers.integrations.moe import ExpertsInterface

    for name, strategy in ((GROUPED_IMPL, GROUPED), (LOOP_IMPL, LOOP)):
        forward = functools.partial(scattermoe.scattermoe_experts_forward, strategy=strategy)
        monkeypatch.setitem(ExpertsInterface._global_mapping, name, forward)


@pytest.fixture
def grouped_calls(monkeypatch):
    """Counts torch.nn.functional.grouped_mm calls (the grouped strategy's products)."""
    calls = []
    real = torch.nn.functional.grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", counting)
    return calls


def _block(kind: str, lora: bool, base_trainable: bool):
    block, config = make_experts(kind)
    if lora:
        from peft import inject_adapter_in_model

        block = inject_adapter_in_model(lora_config(), block)
    for name, p in block.named_parameters():
        p.requires_grad_("lora_" in name or base_trainable)
    return block, config


def _inputs(tokens: int, allowed=None, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x, grad_out = torch.randn(tokens, 32, generator=gen), torch.randn(tokens, 32, generator=gen)
    index, weights = routing(tokens, 8, 2, allowed)
    return x, index, weights, grad_out


MODES = [("lora", True, False), ("full_finetune", False, True)]


@pytest.mark.parametrize("routing_name", list(ROUTINGS))
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("kind", KINDS)
def test_grouped_matches_loop_and_eager(kind, mode, routing_name, grouped_calls):
    _, lora, base_trainable = mode
    block, config = _block(kind, lora, base_trainable)
    x, index, weights, grad_out = _inputs(24, ROUTINGS[routing_name])

    eager = run_block(block, config, "eager", x, index, weights, grad_out)
    loop = run_block(block, config, LOOP_IMPL, x, index, weights, grad_out)
    assert grouped_calls == []
    grouped = run_block(block, config, GROUPED_IMPL, x, index, weights, grad_out)
    # gate/up and down: one grouped GEMM each, plus two per LoRA'd tensor
    assert len(grouped_calls) == (6 if lora else 2)
    assert_same(*grouped, *eager)
    assert_same(*grouped, *loop)
    assert sum("lora_" in n for n in grouped[1]) == (4 if lora else 0)
    if routing_name == "empty_experts":
        for name, g in grouped[1].items():
            if "lora_A" in name or name.endswith(("gate_up_proj", "down_proj")):
                assert g.reshape(8, -1)[[0, 3, 4, 7]].abs().max() == 0, name


def test_grouped_bf16_autocast_pads_the_lora_rank(grouped_calls):
    """r=4 in bf16 is an 8-byte row: grouped_mm refuses it, so the factors are zero-padded to r=8."""
    block, config = _block("qwen3_5", lora=True, base_trainable=False)
    x, index, weights, grad_out = _inputs(32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = run_block(block, config, "eager", x, index, weights, grad_out)
        loop = run_block(block, config, LOOP_IMPL, x, index, weights, grad_out)
        grouped = run_block(block, config, GROUPED_IMPL, x, index, weights, grad_out)
    assert grouped[0].dtype == eager[0].dtype
    ranks = sorted({shape[-1] for shape in grouped_calls})
    assert 8 in ranks and 4 not in ranks, ranks  # z = x @ A (padded) feeds the second LoRA product
    assert_same(*grouped, *loop, tol=3e-2)
    assert_same(*grouped, *eager, tol=3e-2)


def test_grouped_expert_parallel_sentinels_and_no_pairs(grouped_calls):
    block, config = _block("gemma4", lora=True, base_trainable=False)
    x, index, weights, grad_out = _inputs(6)
    index[0, 1] = 8
    index[3, 0] = 8
    eager = run_block(block, config, "eager", x, index, weights, grad_out)
    grouped = run_block(block, config, GROUPED_IMPL, x, index, weights, grad_out)
    assert grouped_calls
    assert_same(*grouped, *eager)
    # every pair on another rank: nothing to group (grouped_mm's backward refuses 0 rows)
    base = block.experts.get_base_layer()
    none = torch.full_like(index, 8)
    assert resolve_strategy(base, x, none, GROUPED) == (LOOP, "grouped unavailable: no (token, expert) pair for "
                                                              "these experts")
    grouped_calls.clear()
    out = run_block(block, config, GROUPED_IMPL, x, none, weights, grad_out)
    assert grouped_calls == [] and out[0].abs().max() == 0


def test_unaligned_sizes_fall_back_to_the_loop(grouped_calls):
    """An intermediate size of 6 fp32 values (24-byte rows): grouped_mm cannot take it."""
    import transformers as tf
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeExperts

    from tests.unit.test_scattermoe import Holder

    config = tf.Qwen3_5MoeTextConfig(hidden_size=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=6,
                                     num_hidden_layers=1, vocab_size=64)
    block = Holder(Qwen3_5MoeExperts(config))
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
    x, index, weights, grad_out = _inputs(12)
    strategy, reason = resolve_strategy(block.experts, x, index, GROUPED)
    assert strategy == LOOP and "32x6" in reason and "16 bytes" in reason
    eager = run_block(block, config, "eager", x, index, weights, grad_out)
    grouped = run_block(block, config, GROUPED_IMPL, x, index, weights, grad_out)
    assert grouped_calls == []
    assert_same(*grouped, *eager)


def test_4bit_experts_take_the_loop(grouped_calls):
    """The grouped strategy would dequantize every expert at once: 4-bit experts keep the loop."""
    pytest.importorskip("bitsandbytes")
    from peft import inject_adapter_in_model

    from archtune.moe import quant4

    block, config = make_experts("gemma4")
    quant4.quantize_experts(block, ("experts.gate_up_proj", "experts.down_proj"))
    block = inject_adapter_in_model(lora_config(), block)
    quant4.adapt_peft(block)
    for name, p in block.named_parameters():
        p.requires_grad_("lora_" in name)
    x, index, weights, grad_out = _inputs(16)
    strategy, reason = resolve_strategy(block.experts.get_base_layer(), x, index, GROUPED)
    assert strategy == LOOP and "4-bit" in reason
    loop = run_block(block, config, LOOP_IMPL, x, index, weights, grad_out)
    default = run_block(block, config, "scattermoe", x, index, weights, grad_out)
    grouped = run_block(block, config, GROUPED_IMPL, x, index, weights, grad_out)
    assert grouped_calls == []
    assert_same(*grouped, *loop, tol=1e-12)
    assert_same(*default, *loop, tol=1e-12)


def test_default_strategy_rule():
    """CUDA: grouped; CPU: grouped for bf16, and for fp32 up to 4 MiB of gate/up activations."""
    fp32, bf16 = torch.float32, torch.bfloat16
    assert default_strategy("cuda", fp32, 1 << 20, 4096)[0] == GROUPED
    assert default_strategy("cpu", bf16, 1 << 20, 4096)[0] == GROUPED
    at_limit = CPU_FP32_GROUPED_MAX_BYTES // (4 * 512)  # pairs whose [pairs, 512] fp32 rows fill 4 MiB
    assert default_strategy("cpu", fp32, at_limit, 512)[0] == GROUPED
    strategy, reason = default_strategy("cpu", fp32, at_limit + 1, 512)
    assert strategy == LOOP and "4.0 MiB of gate/up activations (> 4 MiB)" in reason
    assert default_strategy("mps", bf16, 16, 64)[0] == LOOP


def test_resolve_strategy_through_the_module():
    block, _ = make_experts("gemma4")
    x, index, _, _ = _inputs(4)
    assert resolve_strategy(block.experts, x, index)[0] == GROUPED  # 8 pairs x 32 fp32 features
    assert resolve_strategy(block.experts, x, index, LOOP) == (LOOP, "asked for")
    assert resolve_strategy(block.experts, x, index, GROUPED) == (GROUPED, "asked for")
    # fp64 is not a grouped_mm dtype: the default falls back to the loop
    block.double()
    strategy, reason = resolve_strategy(block.experts, x.double(), index)
    assert strategy == LOOP and "float64" in reason
    with pytest.raises(KeyError, match="known: loop, grouped"):
        resolve_strategy(block.experts, x, index, "triton")


@pytest.fixture(scope="module")
def tiny_models():
    from archtune.models.tiny import build_tiny_model

    return {name: build_tiny_model(name)[0] for name in ("gemma4-moe", "qwen3_5-moe")}


@pytest.mark.parametrize("name", ["gemma4-moe", "qwen3_5-moe"])
def test_tiny_model_with_expert_lora_grouped_equals_loop(tiny_models, name, grouped_calls):
    """Whole model, PEFT LoRA incl. expert LoRA, routers trainable: logits and every gradient of the
    grouped strategy equal the loop's (fp32, 1e-5; the loop itself is tested against eager)."""
    import copy

    from peft import get_peft_model

    model = copy.deepcopy(tiny_models[name])
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(model, lora_config())
    for n, p in model.named_parameters():
        if "router" in n or ".gate.weight" in n:  # Gemma 4's router.proj / Qwen 3.5's gate
            p.requires_grad_(True)
    input_ids = torch.randint(10, 1000, (2, 16), generator=torch.Generator().manual_seed(5))

    def run(impl):
        model.set_experts_implementation(impl)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits_l, grads_l = run(LOOP_IMPL)
    assert grouped_calls == []
    logits_g, grads_g = run(GROUPED_IMPL)
    assert grouped_calls
    assert set(grads_g) == set(grads_l)
    assert sum("lora_" in n and "experts" in n for n in grads_g) == 4 * 4
    routers = [n for n in grads_g if "router" in n or ".gate.weight" in n]
    assert routers
    assert rel_err(logits_g, logits_l) < TOL
    top = max(g.abs().max().item() for g in grads_l.values())
    bad = {n: f"{rel_err(grads_g[n], grads_l[n], 1e-6 * top):.2e}" for n in grads_l
           if not rel_err(grads_g[n], grads_l[n], 1e-6 * top) < TOL}
    assert not bad, bad
