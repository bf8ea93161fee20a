"""4-bit experts (archtune.moe.quant4): storage, exactness against eager, bytes.

* the torch dequantization equals bitsandbytes' dequantize_4bit, expert by expert;
* scattermoe on 4-bit experts equals transformers' eager experts on the dequantized tensors
  (output and every gradient, fp32, 1e-5 relative), with and without PEFT expert LoRA, for the
  usual [E, out, in] layout (Gemma 4, Qwen 3.5) and the transposed one (Aria), and never
  dequantizes a whole tensor;
* the stored bytes are what `expert_4bit_bytes` says (whole models: tests/e2e/test_quant4_train.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

import archtune.moe  # noqa: E402,F401  (registers scattermoe)
from archtune.moe import quant4  # noqa: E402
from tests.unit.test_scattermoe import assert_same, lora_config, make_experts, routing, run_block  # noqa: E402

TARGETS = ("experts.gate_up_proj", "experts.down_proj")


def _quantized(kind: str):
    """(4-bit block, dequantized twin, config): the twin holds exactly the weights the 4-bit one computes with."""
    block, config = make_experts(kind)
    twin = copy.deepcopy(block)
    assert quant4.quantize_experts(block, TARGETS) == list(TARGETS)
    quant4.quantize_experts(twin, TARGETS)  # the same bitsandbytes codes (deterministic) ...
    assert quant4.dequantize_experts(twin) == 2  # ... held as plain dense tensors
    return block, twin, config


def test_dequantization_equals_bitsandbytes_expert_by_expert():
    import bitsandbytes.functional as bnbf

    gen = torch.Generator().manual_seed(0)
    # 70 elements per expert: not a multiple of the 64-element block (a partial last block)
    for shape in [(3, 10, 7), (4, 48, 64)]:
        w = torch.randn(shape, generator=gen)
        packed, state = quant4.quantize_tensor(w)
        for e in range(shape[0]):
            q, s = bnbf.quantize_4bit(w[e].contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
            assert torch.equal(state.expert(packed, e), bnbf.dequantize_4bit(q, s))
        # 4 bits lose information, but not much: NF4 error stays well within the block's range
        err = (state(packed) - w).abs().max() / w.abs().max()
        assert 0 < err < 0.15


def test_stored_bytes_match_the_public_accounting():
    block, _ = make_experts("gemma4")
    dense = {n: tuple(p.shape) for n, p in block.named_parameters()}
    before = quant4.model_bytes(block)
    quant4.quantize_experts(block, TARGETS)
    stored = quant4.model_bytes(block)
    expected = sum(quant4.expert_4bit_bytes(dense[t]) for t in TARGETS)
    assert stored == expected
    # a stand-in for the real 26B-A4B shape: the ratio to bf16 is 4.13 / 16
    assert quant4.expert_4bit_bytes((128, 1408, 2816)) / (128 * 1408 * 2816 * 2) == pytest.approx(0.258, abs=1e-3)


def quantized_pair(kind: str, lora: bool):
    """`_quantized`, with the same PEFT expert LoRA values on both when `lora` (only LoRA trains)."""
    block, twin, config = _quantized(kind)
    if lora:
        from peft import inject_adapter_in_model
        from peft.tuners.lora.layer import ParamWrapper

        block = inject_adapter_in_model(lora_config(), block)
        twin = inject_adapter_in_model(lora_config(), twin)
        assert quant4.adapt_peft(block) == 2
        # the same adapter values on both, matched by the tensor they adapt
        wrappers = {m.parameter_name: m for m in twin.modules() if isinstance(m, ParamWrapper)}
        with torch.no_grad():
            for m in block.modules():
                if isinstance(m, ParamWrapper):
                    for part in ("lora_A", "lora_B"):
                        getattr(wrappers[m.parameter_name], part)["default"].weight.copy_(
                            getattr(m, part)["default"].weight)
    for b in (block, twin):
        for name, p in b.named_parameters():
            p.requires_grad_("lora_" in name)
    return block, twin, config


def twin_config(twin, lora: bool):
    return twin.experts.get_base_layer().config if lora else twin.experts.config


def by_tensor(model, grads):
    """Gradients keyed by the adapted tensor: LoRA parameter names differ by nesting order."""
    from peft.tuners.lora.layer import ParamWrapper

    out = {k: v for k, v in grads.items() if "lora_" not in k}
    for m in model.modules():
        if isinstance(m, ParamWrapper):
            for part in ("lora_A", "lora_B"):
                out[f"{m.parameter_name}.{part}"] = getattr(m, part)["default"].weight.grad
    return out


@pytest.mark.parametrize("lora", [False, True], ids=["frozen", "expert_lora"])
@pytest.mark.parametrize("kind", ["gemma4", "qwen3_5", "aria"])
def test_4bit_scattermoe_equals_eager_on_the_dequantized_weights(kind, lora, monkeypatch):
    block, twin, config = quantized_pair(kind, lora)
    gen = torch.Generator().manual_seed(2)
    x, grad_out = torch.randn(24, 32, generator=gen), torch.randn(24, 32, generator=gen)
    index, weights = routing(24, 8, 2, [0, 1, 2, 4, 5, 6])  # experts 3 and 7 get no tokens

    # scattermoe never evaluates the whole dequantized tensor (NF4Experts.forward)
    def whole_tensor(self, packed):
        raise AssertionError("a whole 4-bit tensor was dequantized")

    with monkeypatch.context() as m:
        m.setattr(quant4.NF4Experts, "forward", whole_tensor)
        out4, grads4 = run_block(block, config, "scattermoe", x, index, weights, grad_out)
    ref = run_block(twin, twin_config(twin, lora), "eager", x, index, weights, grad_out)

    assert_same(out4, by_tensor(block, grads4), ref[0], by_tensor(twin, ref[1]))
    assert len(by_tensor(block, grads4)) == (6 if lora else 2)
    # PEFT's proxy was removed after the call: only the 4-bit storage stays
    experts = block.experts.get_base_layer() if lora else block.experts
    assert all(len(experts.parametrizations[n]) == 1 for n in ("gate_up_proj", "down_proj"))


def test_merge_refuses_4bit_and_works_after_dequantizing():
    from peft import inject_adapter_in_model

    block, twin, config = _quantized("gemma4")
    block = inject_adapter_in_model(lora_config(), block)
    quant4.adapt_peft(block)
    index, weights = routing(16, 8, 2)
    x = torch.randn(16, 32)
    config._experts_implementation = "scattermoe"
    with torch.no_grad():
        before = block(x, index, weights)
    with pytest.raises(RuntimeError, match="dequantize_experts"):
        next(m for m in block.modules() if hasattr(m, "parameter_name")).merge()
    assert quant4.dequantize_experts(block) == 2 and not quant4.quantized_experts(block)
    from peft.tuners.lora.layer import ParamWrapper

    for m in [m for m in block.modules() if isinstance(m, ParamWrapper)]:
        m.merge()
    experts = block.experts
    while isinstance(experts, ParamWrapper):
        experts = experts.base_layer
    merged = Holder(experts)
    config._experts_implementation = "eager"
    with torch.no_grad():
        after = merged(x, index, weights)
    assert (after - before).abs().max() / before.abs().max() < 1e-5


class Holder(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, x, index, weights):
        return self.experts(x, index, weights)
