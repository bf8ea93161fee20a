"""archtune.moe: the scattermoe experts implementation against transformers' eager experts loop.

Every case compares outputs and EVERY gradient (inputs, routing weights, expert tensors, PEFT
expert LoRA) in fp32 within 1e-5 relative:
* experts modules alone (strict, per tensor): Gemma 4 and Qwen 3.5 (fused path), Aria
  (transposed layout, fused path), gpt-oss (biases + interleaved custom gate: general path);
  with and without expert LoRA, full fine-tuning, and routings that leave experts empty;
* whole tiny models (gemma4-moe, qwen3_5-moe), logits and all gradients, with and without
  expert LoRA, including a batch too short to reach every expert.
Plus: merged vs unmerged expert LoRA, registry behaviour, the routing sort's worked example.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import archtune.moe
from archtune.moe import scattermoe_experts_forward, sort_by_expert
from archtune.moe.routing_stats import RoutingStats

TOL = 1e-5
EXPERT_TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


# ---- helpers -----------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """max|a - b| / max(max|b|, floor)."""
    denom = max(b.abs().max().item(), floor)
    return (a - b).abs().max().item() / denom if denom > 0 else (a - b).abs().max().item()


def lora_config(**kw):
    from peft import LoraConfig

    # init_lora_weights=False: B != 0, so the adapter changes the output (a B = 0 adapter tests nothing)
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[], target_parameters=EXPERT_TARGETS,
                      init_lora_weights=False, **kw)


def _experts_config(kind: str):
    import transformers as tf

    if kind == "gemma4":
        return tf.Gemma4TextConfig(hidden_size=32, num_experts=8, top_k_experts=2, moe_intermediate_size=16,
                                   enable_moe_block=True, num_hidden_layers=1, vocab_size=64)
    if kind == "qwen3_5":
        return tf.Qwen3_5MoeTextConfig(hidden_size=32, num_experts=8, num_experts_per_tok=2,
                                       moe_intermediate_size=16, num_hidden_layers=1, vocab_size=64)
    if kind == "aria":
        return tf.AriaTextConfig(hidden_size=32, moe_num_experts=8, moe_topk=2, intermediate_size=16,
                                 num_hidden_layers=1, vocab_size=64)
    if kind == "gpt_oss":
        return tf.GptOssConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2, intermediate_size=16,
                               num_hidden_layers=1, vocab_size=64)
    raise KeyError(kind)


def _experts_class(kind: str):
    from transformers.models.aria.modeling_aria import AriaExperts
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeExperts

    return {"gemma4": Gemma4TextExperts, "qwen3_5": Qwen3_5MoeExperts, "aria": AriaExperts,
            "gpt_oss": GptOssExperts}[kind]


class Holder(nn.Module):
    """A parent with an `experts` child, so that PEFT's target_parameters names match."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, x, index, weights):
        return self.experts(x, index, weights)


def make_experts(kind: str, seed: int = 0) -> tuple[Holder, object]:
    config = _experts_config(kind)
    experts = _experts_class(kind)(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return Holder(experts), config


def routing(num_tokens: int, num_experts: int, top_k: int, allowed: list[int] | None = None, seed: int = 1):
    """Distinct top-k experts per token (from `allowed` when given) and positive weights."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor(allowed if allowed is not None else list(range(num_experts)))
    index = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:top_k]] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    return index, weights


def run_block(block: Holder, config, impl: str, x, index, weights, grad_out):
    config._experts_implementation = impl
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    w = weights.detach().clone().requires_grad_(True)
    out = block(x, index, w)
    out.backward(grad_out)
    grads = {"hidden_states": x.grad, "top_k_weights": w.grad}
    grads.update({n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None})
    return out.detach(), grads


def assert_same(out_a, grads_a, out_b, grads_b, tol=TOL, floor=0.0):
    assert set(grads_a) == set(grads_b), (sorted(grads_a), sorted(grads_b))
    assert rel_err(out_a, out_b) < tol, f"output: {rel_err(out_a, out_b):.2e}"
    errors = {n: rel_err(grads_a[n], grads_b[n], floor) for n in grads_b}
    bad = {n: f"{e:.2e}" for n, e in errors.items() if not e < tol}
    assert not bad, f"gradients differ beyond {tol}: {bad}"


# ---- experts modules alone ---------------------------------------------------------------------

KINDS = ["gemma4", "qwen3_5", "aria", "gpt_oss"]
ROUTINGS = {
    "random": None,
    "empty_experts": [1, 2, 5, 6],  # experts 0, 3, 4, 7 receive no tokens
}
# (name, lora, base_trainable)
MODES = [("full_finetune", False, True), ("lora", True, False), ("lora_and_base", True, True)]


@pytest.mark.parametrize("routing_name", list(ROUTINGS))
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("kind", KINDS)
def test_experts_module_matches_eager(kind, mode, routing_name):
    _, lora, base_trainable = mode
    block, config = make_experts(kind)
    if lora:
        from peft import inject_adapter_in_model

        block = inject_adapter_in_model(lora_config(), block)
    for name, p in block.named_parameters():
        p.requires_grad_("lora_" in name or base_trainable)
    num_experts = block.experts.get_base_layer().num_experts if lora else block.experts.num_experts
    gen = torch.Generator().manual_seed(2)
    tokens = 24
    x = torch.randn(tokens, 32, generator=gen)
    grad_out = torch.randn(tokens, 32, generator=gen)
    index, weights = routing(tokens, num_experts, 2, ROUTINGS[routing_name])

    eager = run_block(block, config, "eager", x, index, weights, grad_out)
    scatter = run_block(block, config, "scattermoe", x, index, weights, grad_out)
    assert_same(*scatter, *eager)
    lora_grads = [n for n in eager[1] if "lora_" in n]
    assert len(lora_grads) == (4 if lora else 0)
    if routing_name == "empty_experts" and base_trainable:
        for name, g in scatter[1].items():
            if name.endswith(("gate_up_proj", "down_proj")):
                assert g[[0, 3, 4, 7]].abs().max() == 0, name


def test_fused_lora_does_not_materialise_the_weight(monkeypatch):
    """With one adapter, scattermoe never evaluates the parametrized (W + BA) tensor."""
    from peft import inject_adapter_in_model
    from peft.tuners.lora import layer as peft_layer

    block, config = make_experts("gemma4")
    block = inject_adapter_in_model(lora_config(), block)
    archtune.moe.skip_parametrization_check(block)
    calls = []
    original = peft_layer._LoraFactorsProxy.forward
    monkeypatch.setattr(peft_layer._LoraFactorsProxy, "forward", lambda self, W: calls.append(1) or original(self, W))
    index, weights = routing(8, 8, 2)
    config._experts_implementation = "scattermoe"
    block(torch.randn(8, 32), index, weights).sum().backward()
    assert calls == []
    config._experts_implementation = "eager"  # the stock path does evaluate it (and still works)
    block(torch.randn(8, 32), index, weights).sum().backward()
    assert calls


def test_two_active_adapters_fall_back_to_the_materialised_weight():
    """PEFT materialises W + delta for several active adapters; scattermoe uses it, still exact."""
    import warnings

    from peft import inject_adapter_in_model
    from peft.tuners.lora.layer import ParamWrapper

    block, config = make_experts("gemma4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multiple adapters in the model"
        block = inject_adapter_in_model(lora_config(), block, adapter_name="one")
        block = inject_adapter_in_model(lora_config(), block, adapter_name="two")
    for m in block.modules():
        if isinstance(m, ParamWrapper):
            m.set_adapter(["one", "two"])
    for name, p in block.named_parameters():
        p.requires_grad_("lora_" in name)
    gen = torch.Generator().manual_seed(2)
    x, grad_out = torch.randn(24, 32, generator=gen), torch.randn(24, 32, generator=gen)
    index, weights = routing(24, 8, 2)
    eager = run_block(block, config, "eager", x, index, weights, grad_out)
    scatter = run_block(block, config, "scattermoe", x, index, weights, grad_out)
    assert_same(*scatter, *eager)
    assert sum("lora_" in n for n in scatter[1]) == 8


def test_skip_parametrization_check_keeps_results():
    from peft import inject_adapter_in_model

    block, config = make_experts("qwen3_5")
    block = inject_adapter_in_model(lora_config(), block)
    gen = torch.Generator().manual_seed(3)
    x, grad_out = torch.randn(16, 32, generator=gen), torch.randn(16, 32, generator=gen)
    index, weights = routing(16, 8, 2)
    before = run_block(block, config, "scattermoe", x, index, weights, grad_out)
    assert archtune.moe.skip_parametrization_check(block) == 2
    after = run_block(block, config, "scattermoe", x, index, weights, grad_out)
    eager_after = run_block(block, config, "eager", x, index, weights, grad_out)
    assert_same(*after, *before, tol=1e-12)
    assert_same(*after, *eager_after)


def test_bf16_autocast_close_to_eager():
    block, config = make_experts("gemma4")
    gen = torch.Generator().manual_seed(4)
    x, grad_out = torch.randn(32, 32, generator=gen), torch.randn(32, 32, generator=gen)
    index, weights = routing(32, 8, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = run_block(block, config, "eager", x, index, weights, grad_out)
        scatter = run_block(block, config, "scattermoe", x, index, weights, grad_out)
    assert scatter[0].dtype == eager[0].dtype
    assert_same(*scatter, *eager, tol=3e-2)


def test_expert_parallel_sentinels_are_dropped():
    """An expert id == num_experts (another rank's expert) contributes nothing, as in eager."""
    block, config = make_experts("gemma4")
    gen = torch.Generator().manual_seed(5)
    x, grad_out = torch.randn(6, 32, generator=gen), torch.randn(6, 32, generator=gen)
    index, weights = routing(6, 8, 2)
    index[0, 1] = 8
    index[3, 0] = 8
    eager = run_block(block, config, "eager", x, index, weights, grad_out)
    scatter = run_block(block, config, "scattermoe", x, index, weights, grad_out)
    assert_same(*scatter, *eager)
    assert scatter[1]["top_k_weights"][0, 1] == 0


# ---- routing sort --------------------------------------------------------------------------------


def test_sort_by_expert_worked_example():
    r = sort_by_expert(torch.tensor([[1, 0], [1, 2]]), 3)
    assert r.perm.tolist() == [1, 0, 2, 3]
    assert r.token_idx.tolist() == [0, 0, 1, 1]
    assert r.expert_idx.tolist() == [0, 1, 1, 2]
    assert r.counts == [1, 2, 1]


def test_sort_by_expert_drops_sentinels_and_counts_empty_experts():
    r = sort_by_expert(torch.tensor([[3, 0], [5, 0]]), 4)  # 5 is a sentinel (>= E)
    assert r.counts == [2, 0, 0, 1]
    assert r.token_idx.tolist() == [0, 1, 0]


# ---- registry ------------------------------------------------------------------------------------


def test_registered_in_transformers_registry():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS["scattermoe"] is scattermoe_experts_forward
    archtune.moe.register()  # idempotent
    assert ALL_EXPERTS_FUNCTIONS["scattermoe"] is scattermoe_experts_forward


def test_register_refuses_a_different_function(monkeypatch):
    from transformers.integrations.moe import ExpertsInterface

    monkeypatch.setitem(ExpertsInterface._global_mapping, "scattermoe", lambda *a: None)
    with pytest.raises(KeyError, match="src/archtune/moe/__init__.py"):
        archtune.moe.register()


# ---- whole tiny models ---------------------------------------------------------------------------


def model_run(model, impl, input_ids):
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.fixture(scope="module")
def tiny_models():
    from archtune.models.tiny import build_tiny_model

    return {name: build_tiny_model(name)[0] for name in ("gemma4-moe", "qwen3_5-moe")}


BATCHES = {"batch_2x16": (2, 16), "short_1x3": (1, 3)}  # 3 tokens x top-2 < 8 experts: some get none


def _norm_rel(a: torch.Tensor, b: torch.Tensor, floor: float) -> float:
    return (a.double() - b.double()).norm().item() / max(b.norm().item(), floor)


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("lora", [False, True], ids=["full", "expert_lora"])
@pytest.mark.parametrize("name", ["gemma4-moe", "qwen3_5-moe"])
def test_tiny_model_logits_and_every_gradient_match_eager(tiny_models, name, lora, batch):
    """Whole model, every parameter trainable (full) or PEFT LoRA incl. expert LoRA.

    fp64: logits and every gradient within 1e-5 relative (they agree to ~1e-12: same algorithm).
    fp32: logits within 1e-5; each gradient as close to the fp64 truth as eager's own fp32
    gradient is (within 3x, or 1e-5). A plain fp32 scattermoe-vs-eager bound of 1e-5 on every
    gradient would test fp32 itself: in the tiny Gemma 4, eager fp32 attention gradients are
    1e-4 away from fp64 on some inputs, and transformers' grouped_mm moves them as much.
    """
    import copy

    from peft import get_peft_model

    model = copy.deepcopy(tiny_models[name])
    model.train()
    if lora:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # PEFT draws the adapter from the global RNG
            model = get_peft_model(model, lora_config())
    gen = torch.Generator().manual_seed(5)
    input_ids = torch.randint(10, 1000, BATCHES[batch], generator=gen)

    stats = RoutingStats.attach(model)
    logits_e, grads_e = model_run(model, "eager", input_ids)
    stats.detach()
    if batch == "short_1x3":
        assert any(0 in counts for counts in stats.counts().values()), "the short batch must leave experts empty"
    logits_s, grads_s = model_run(model, "scattermoe", input_ids)
    model64 = copy.deepcopy(model).double()
    logits_e64, grads_e64 = model_run(model64, "eager", input_ids)
    logits_s64, grads_s64 = model_run(model64, "scattermoe", input_ids)

    assert set(grads_s) == set(grads_e) == set(grads_s64) == set(grads_e64)
    if lora:
        assert sum("lora_" in n and "experts" in n for n in grads_e) == 4 * 4  # 4 layers x (A, B) x 2 tensors
    else:
        assert any(n.endswith("experts.gate_up_proj") for n in grads_e)
        if name == "qwen3_5-moe":  # the shared expert runs outside the experts module, in both paths
            assert any("shared_expert." in n for n in grads_e)

    # fp64: the algorithm
    assert rel_err(logits_s64, logits_e64) < TOL
    top64 = max(g.abs().max().item() for g in grads_e64.values())
    bad = {n: f"{rel_err(grads_s64[n], grads_e64[n], 1e-6 * top64):.2e}" for n in grads_e64
           if not rel_err(grads_s64[n], grads_e64[n], 1e-6 * top64) < TOL}
    assert not bad, bad

    # fp32: as accurate as eager
    assert rel_err(logits_s, logits_e) < TOL
    floor = 1e-3 * max(g.norm().item() for g in grads_e64.values())
    bad = {}
    for n, truth in grads_e64.items():
        err_s, err_e = _norm_rel(grads_s[n], truth, floor), _norm_rel(grads_e[n], truth, floor)
        if not err_s <= max(3 * err_e, TOL):
            bad[n] = f"scattermoe {err_s:.2e} vs eager {err_e:.2e}"
    assert not bad, bad


@pytest.mark.parametrize("name", ["gemma4-moe", "qwen3_5-moe"])
def test_merged_expert_lora_matches_unmerged(tiny_models, name):
    """PEFT's merge_and_unload handles 3D expert LoRA: archtune needs no merge code of its own."""
    import copy

    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(tiny_models[name]), lora_config())
    model.eval()
    input_ids = torch.randint(10, 1000, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        model.base_model.model.set_experts_implementation("scattermoe")
        unmerged = model(input_ids=input_ids).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(input_ids=input_ids).logits
    assert (unmerged - base).abs().max() > 1e-3, "the adapter must change the logits"
    assert (merged - unmerged).abs().max() < 1e-4
