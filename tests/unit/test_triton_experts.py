"""`scattermoe_triton` (archtune.moe.triton_experts) under Triton's interpreter on CPU, against
transformers' eager experts loop: the output and EVERY gradient (hidden states, routing weights,
expert tensors when they train, PEFT expert LoRA A/B), per tensor.

* fp32, 1e-5 relative: Gemma 4 and Qwen 3.5 MoE ([E, out, in], fused gather/scatter path), Aria
  (transposed [E, in, out]) and gpt-oss (biases, interleaved custom gate: the general path), full
  fine-tuning, expert LoRA, LoRA + trained base, with routings that leave experts empty;
* bf16 (the experts in bf16, as a bf16 run holds them): within 3e-2 of eager in bf16 and of the
  fp32 result, per tensor;
* 4-bit experts (quantize_moe_experts, dequantized per tile inside the kernel) against eager on the
  dequantized tensors, with and without expert LoRA, never dequantizing a whole tensor;
* the clear error without the interpreter, and the whole tiny MoE models (gemma4-moe, qwen3_5-moe,
  qwen3_next: logits and all gradients, routers included).

Why a fixture and not a subprocess: triton decides at decoration time, i.e. when
archtune.moe.triton_kernels is first imported, whether its kernels run on the GPU or in the
interpreter. `interpreted_kernels` sets TRITON_INTERPRET=1 for this module and imports (or, when
another test imported it first without the variable, reloads) the kernel module under it; the
kernels then stay interpreted whatever the variable says later, and no other test is affected.
Tiny shapes (hidden 32, 8 experts, 24 tokens): each case runs in well under a second.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the optional `triton` extra")

import archtune.moe  # noqa: E402,F401  (registers scattermoe_triton)
from archtune.moe import triton_experts  # noqa: E402
from tests.unit.test_scattermoe import ROUTINGS, TOL, assert_same, lora_config, make_experts, rel_err  # noqa: E402
from tests.unit.test_scattermoe import model_run, routing, run_block  # noqa: E402

IMPL = "scattermoe_triton"
# bf16 against eager in bf16, and against the fp32 result: the tolerance of scattermoe's bf16 tests. Measured
# over 4 layouts x (LoRA with 4 random adapters, full fine-tuning), per tensor: at most 2.3e-2 from eager bf16
# and from fp32 (Aria's gate_up_proj gradient); eager bf16 itself is up to 1.6e-2 from fp32.
BF16_TOL = 3e-2
KINDS = ["gemma4", "qwen3_5", "aria", "gpt_oss"]
# (name, lora, base_trainable)
MODES = [("full_finetune", False, True), ("lora", True, False), ("lora_and_base", True, True)]


def interpret_kernels(mp: pytest.MonkeyPatch) -> None:
    """TRITON_INTERPRET=1 (through `mp`), and the kernel module imported under it (reloaded when an
    earlier import compiled it for a GPU)."""
    mp.setenv(triton_experts.INTERPRET_ENV, "1")
    from triton.runtime.interpreter import InterpretedFunction

    from archtune.moe import triton_kernels

    if not isinstance(triton_kernels.rows_kernel, InterpretedFunction):
        importlib.reload(triton_kernels)
    assert triton_experts.unavailable("cpu") is None


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels():
    with pytest.MonkeyPatch.context() as mp:
        interpret_kernels(mp)
        yield


def _block(kind: str, lora: bool, base_trainable: bool, dtype=torch.float32):
    block, config = make_experts(kind)
    if lora:
        from peft import inject_adapter_in_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # PEFT draws the adapter from the global RNG: the same one in any test order
            block = inject_adapter_in_model(lora_config(), block)
    block.to(dtype)
    for name, p in block.named_parameters():
        p.requires_grad_("lora_" in name or base_trainable)
    return block, config


def _inputs(tokens: int = 24, allowed=None, dtype=torch.float32):
    gen = torch.Generator().manual_seed(2)
    x, grad_out = torch.randn(tokens, 32, generator=gen), torch.randn(tokens, 32, generator=gen)
    index, weights = routing(tokens, 8, 2, allowed)
    return x.to(dtype), index, weights.to(dtype), grad_out.to(dtype)


@pytest.mark.parametrize("routing_name", list(ROUTINGS))
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_output_and_every_gradient_match_eager(kind, mode, routing_name):
    _, lora, base = mode
    block, config = _block(kind, lora, base)
    inputs = _inputs(allowed=ROUTINGS[routing_name])
    eager = run_block(block, config, "eager", *inputs)
    triton = run_block(block, config, IMPL, *inputs)
    assert_same(*triton, *eager, tol=TOL)
    expected = {"hidden_states", "top_k_weights"} | {n for n, p in block.named_parameters() if p.requires_grad}
    assert set(triton[1]) == expected  # every trained tensor got its gradient from the kernels


@pytest.mark.parametrize("lora", [False, True], ids=["full_finetune", "expert_lora"])
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_close_to_eager(kind, lora):
    inputs = _inputs()
    block, config = _block(kind, lora, base_trainable=not lora)
    exact = run_block(block, config, "eager", *inputs)
    block.to(torch.bfloat16)
    low = _inputs(dtype=torch.bfloat16)
    eager = run_block(block, config, "eager", *low)
    triton = run_block(block, config, IMPL, *low)
    assert triton[0].dtype == torch.bfloat16
    assert_same(*triton, *eager, tol=BF16_TOL)
    as_fp32 = triton[0].float(), {n: g.float() for n, g in triton[1].items()}
    assert_same(*as_fp32, *exact, tol=BF16_TOL)  # and as close to the fp32 result


@pytest.mark.parametrize("lora", [False, True], ids=["frozen", "expert_lora"])
@pytest.mark.parametrize("kind", ["gemma4", "qwen3_5", "aria"])
def test_4bit_experts_match_eager_on_the_dequantized_tensors(kind, lora, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from archtune.moe import quant4
    from tests.unit.test_quant4 import by_tensor, quantized_pair, twin_config

    block, twin, config = quantized_pair(kind, lora)
    inputs = _inputs(allowed=[0, 1, 2, 4, 5, 6])

    def dequantized(*args, **kwargs):
        raise AssertionError("a 4-bit tensor was dequantized in PyTorch")

    with monkeypatch.context() as m:  # neither the whole tensor nor one expert: the kernel's tiles only
        m.setattr(quant4.NF4Experts, "forward", dequantized)
        m.setattr(quant4.NF4Experts, "expert", dequantized)
        out4, grads4 = run_block(block, config, IMPL, *inputs)
    ref = run_block(twin, twin_config(twin, lora), "eager", *inputs)
    assert_same(out4, by_tensor(block, grads4), ref[0], by_tensor(twin, ref[1]))
    assert len(by_tensor(block, grads4)) == (6 if lora else 2)


def test_pairs_routed_to_another_rank_are_dropped():
    """Expert ids == num_experts (expert-parallel sentinels) contribute nothing, as in eager: tokens
    whose pairs all went elsewhere get zero output and zero gradients."""
    block, config = _block("gemma4", lora=True, base_trainable=False)
    x, index, weights, grad_out = _inputs(tokens=6)
    index[:3] = 8
    index[3, 1] = 8
    eager = run_block(block, config, "eager", x, index, weights, grad_out)
    triton = run_block(block, config, IMPL, x, index, weights, grad_out)
    assert triton[0][:3].abs().max() == 0 and triton[1]["hidden_states"][:3].abs().max() == 0
    assert_same(*triton, *eager)


@pytest.mark.parametrize("name", ["gemma4-moe", "qwen3_5-moe", "qwen3_next"])
def test_tiny_model_logits_and_every_gradient_match_eager(name):
    """Whole model with PEFT expert LoRA (router, attention and the other layers' gradients pass
    through the kernels' input gradients). In fp64, so that eager is the exact reference: the
    kernels accumulate in fp32, and nothing else differs (fp32 vs fp32 would compare eager's own
    round-off as it grows through the layers)."""
    from peft import get_peft_model

    from archtune.models.tiny import build_tiny_model
    from archtune.moe.routing_stats import experts_modules

    model = build_tiny_model(name)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # PEFT draws the adapter from the global RNG
        model = get_peft_model(model, lora_config())
    model.double()
    layers = len(experts_modules(model))
    assert layers >= 3 and sum("lora_" in n and "experts" in n for n, _ in model.named_parameters()) == 4 * layers
    for n, p in model.named_parameters():
        if "router" in n or ".gate.weight" in n:  # Gemma 4's router.proj / Qwen 3.5's gate: the routing weights' gradient
            p.requires_grad_(True)
    ids = torch.randint(10, 1000, (2, 8), generator=torch.Generator().manual_seed(5))
    eager, triton = model_run(model, "eager", ids), model_run(model, IMPL, ids)
    assert rel_err(triton[0], eager[0]) < TOL
    assert set(triton[1]) == set(eager[1]) and any("router" in n or ".gate.weight" in n for n in eager[1])
    floor = 1e-6 * max(g.abs().max().item() for g in eager[1].values())
    errors = {n: rel_err(triton[1][n], g, floor) for n, g in eager[1].items()}
    bad = {n: f"{e:.1e}" for n, e in errors.items() if not e < TOL}
    assert not bad, bad


def test_cpu_without_the_interpreter_says_so(monkeypatch):
    """Kernels compiled for a GPU (no TRITON_INTERPRET at import) refuse CPU tensors with the fix named."""
    monkeypatch.setattr(triton_experts, "_interpreted", lambda: False)
    monkeypatch.delenv(triton_experts.INTERPRET_ENV, raising=False)
    assert "set TRITON_INTERPRET=1" in triton_experts.unavailable("cpu")
    block, config = _block("gemma4", lora=False, base_trainable=True)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        run_block(block, config, IMPL, *_inputs())
    assert os.environ.get(triton_experts.INTERPRET_ENV) is None
