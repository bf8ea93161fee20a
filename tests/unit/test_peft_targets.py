"""patches/peft_targets.py: LoRA on Qwen3-Next's shared expert (`mlp.shared_expert.down_proj`, real
nn.Linear modules) stays there, where stock PEFT 0.21's transformers-v5 MoE conversion moves it onto
the routed experts' 3D tensors; the adapter saved by a run loads back with the same outputs."""
from __future__ import annotations

import pytest
import torch

TARGETS = ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj", "q_proj"]


@pytest.fixture(scope="module")
def qwen3_next():
    import transformers as tf

    config = tf.Qwen3NextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, linear_num_value_heads=2, linear_num_key_heads=1,
        linear_key_head_dim=16, linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    return tf.Qwen3NextForCausalLM(config).eval()


def _lora(model, patched: bool):
    import copy

    from peft import LoraConfig, get_peft_model

    from archtune.patches.peft_targets import keep_module_targets

    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False)
    torch.manual_seed(1)
    if not patched:
        return get_peft_model(copy.deepcopy(model), config)
    with keep_module_targets():
        return get_peft_model(copy.deepcopy(model), config)


def _adapted(peft_model) -> tuple[set[str], set[str]]:
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    modules, params = set(), set()
    for name, m in peft_model.named_modules():
        if isinstance(m, ParamWrapper):
            params.add(m.parameter_name)
        elif isinstance(m, LoraLayer):
            modules.add(name.split(".mlp.")[-1] if ".mlp." in name else name.rsplit(".", 1)[-1])
    return modules, params


def test_stock_peft_moves_shared_expert_lora_onto_the_experts(qwen3_next):
    # The control: without the patch the shared expert gets no adapter and the experts get one.
    modules, params = _adapted(_lora(qwen3_next, patched=False))
    assert not any(m.startswith("shared_expert") for m in modules)
    assert params == {"gate_up_proj", "down_proj"}


def test_shared_expert_lora_stays_on_the_shared_expert(qwen3_next):
    modules, params = _adapted(_lora(qwen3_next, patched=True))
    assert modules == {"shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj", "q_proj"}
    assert params == set()


def test_saved_adapter_loads_back_with_the_same_outputs(qwen3_next, tmp_path):
    from archtune.adapters.lora import load_adapter

    trained = _lora(qwen3_next, patched=True).eval()
    trained.save_pretrained(tmp_path)
    ids = torch.arange(1, 13).reshape(2, 6)
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        base = qwen3_next(input_ids=ids).logits
        loaded = load_adapter(qwen3_next, str(tmp_path)).eval()
        got = loaded(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the outputs
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
