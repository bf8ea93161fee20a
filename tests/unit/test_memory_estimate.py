"""The memory estimate (diagnostics/memory.py) on the tiny models' config.json: its parts respond to the
settings as training does, and its activation count matches what autograd really saves."""
from __future__ import annotations

import json

import pytest
import torch

from archtune.config import config_from_dict
from archtune.models.tiny import build_tiny_config, build_tiny_model
from archtune.plan import resolve
from archtune.diagnostics.memory import (PARTS, estimate_memory, fitting_settings, measure_activations, parse_bytes,
                                  weight_bytes)
from archtune.diagnostics.memory import layer_classes as estimate_layer_classes
from archtune.plan.structure import meta_model


def _estimate(name="llama", world_size=1, **keys):
    cfg = config_from_dict({"base_model": f"tiny:{name}", "datasets": [{"path": "d.jsonl"}], "sequence_len": 256,
                            "micro_batch_size": 2, **keys})
    plan = resolve(cfg, build_tiny_config(name).to_dict(), world_size=world_size)
    assert not plan.errors, plan.errors
    return plan, estimate_memory(plan)


def test_json_object_has_the_documented_shape():
    _, e = _estimate()
    out = json.loads(json.dumps(e.to_json()))
    assert set(out) == {"peak_bytes", "parts", "per_device", "load_peak_bytes", "host_peak_bytes",
                        "device_peak_bytes", "device", "load_parts"} and out["per_device"] is True
    assert list(out["parts"]) == list(PARTS) and out["peak_bytes"] == sum(out["parts"].values())
    assert all(isinstance(v, int) and v >= 0 for v in out["parts"].values())
    assert list(out["load_parts"]) == ["resident", "mapped", "transient"] and out["device"] in ("cpu", "cuda")
    assert out["device_peak_bytes"] == max(out["peak_bytes"], out["load_peak_bytes"])


def test_parts_follow_the_settings():
    _, full = _estimate()
    _, lora = _estimate(adapter="lora", lora_r=8)
    _, ckpt = _estimate(gradient_checkpointing=True)
    _, chunked = _estimate(chunked_cross_entropy=True, chunked_cross_entropy_num_chunks=4)
    _, fsdp = _estimate(world_size=2, fsdp=["full_shard", "auto_wrap"])
    _, ddp = _estimate(world_size=2)
    _, qlora = _estimate(adapter="qlora", load_in_4bit=True)
    assert lora.parts["adapter"] > 0 and lora.parts["gradients"] < full.parts["gradients"] / 10
    assert full.parts["optimizer"] == 2 * full.parts["gradients"]  # AdamW: two states in the parameters' dtype
    assert ckpt.parts["activations"] < full.parts["activations"] * 0.75
    assert chunked.parts["logits"] == pytest.approx(full.parts["logits"] / 4, rel=0.01)
    assert fsdp.parts["weights"] == pytest.approx(full.parts["weights"] / 2, rel=0.01)
    assert ddp.parts["buffers"] >= full.parts["gradients"]  # DDP's gradient buckets
    assert qlora.parts["weights"] < full.parts["weights"]


def test_nf4_bytes_per_parameter():
    assert weight_bytes(64 * 256, "nf4") == 64 * 256 // 2 + 256 + 4
    assert weight_bytes(10, "bfloat16") == 20
    assert parse_bytes("80GiB") == parse_bytes("80 GB") == 80 * 2**30 and parse_bytes("512MiB") == 2**29


@pytest.mark.parametrize("name", ["llama", "gemma4-dense", "qwen3_5-moe"])
def test_meta_activations_match_what_autograd_saves_on_cpu(name):
    """The meta-device count (fused attention, balanced experts) against a real CPU forward of the
    same tiny model, whose SDPA runs the fused CPU kernel (no [T x T] matrix either)."""
    plan, _ = _estimate(name)
    meta = meta_model(plan.model_config, plan.family.auto_class)
    saved = measure_activations(meta, estimate_layer_classes(plan, meta), 2, 256)
    model, _ = build_tiny_model(name)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    decoder = getattr(model, "model", None) or model.get_decoder()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder(input_ids=torch.randint(3, 1000, (2, 256)), use_cache=False)
    assert len(saved.per_layer) == 4
    assert saved.outside + sum(saved.per_layer) == pytest.approx(sum(seen.values()), rel=0.2)


def test_a_budget_names_settings_that_fit():
    plan, e = _estimate(micro_batch_size=8)
    budget = int(e.peak_bytes * 0.8)
    fits = fitting_settings(plan, budget)
    assert "micro_batch_size: 4 with gradient_accumulation_steps: 2" in fits
    assert not any("qlora" in f for f in fits)  # QLoRA barely changes a tiny model's memory: not a fit
    generous = fitting_settings(plan, e.peak_bytes * 10)  # every candidate change fits
    assert {"gradient_checkpointing: true", "adapter: lora", "chunked_cross_entropy: true"} <= set(generous)


def _parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters(): shared ones once


def test_four_bit_experts_count_as_the_real_quantized_tensors():
    """quantize_moe_experts: the estimate's weights shrink by exactly what quantizing the real model's
    expert tensors (archtune.moe.quant4, bitsandbytes NF4) takes off its parameter and buffer bytes."""
    from archtune.moe import quant4

    keys = {"adapter": "qlora", "load_in_4bit": True}
    plan, four_bit = _estimate("gemma4-moe", **keys)
    assert plan.quantize_moe_experts
    _, dense = _estimate("gemma4-moe", quantize_moe_experts=False, **keys)
    model, _ = build_tiny_model("gemma4-moe")
    before = quant4.model_bytes(model)
    assert quant4.quantize_experts(model, plan.expert_param_names)  # 2 tensors in each of the layers
    saved = before - quant4.model_bytes(model)
    assert saved > 0.6 * before / 2  # most of this model's weights are experts
    assert dense.parts["weights"] - four_bit.parts["weights"] == saved


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_preference_training_of_a_full_fine_tune_holds_a_frozen_reference_copy(adapter):
    keys = {"adapter": adapter} if adapter else {}
    _, sft = _estimate(**keys)
    plan, dpo = _estimate(rl="dpo", datasets=[{"path": "d.jsonl", "type": "chat_template.default"}], **keys)
    model, _ = build_tiny_model("llama")
    real = _parameter_bytes(model)
    if adapter is None:
        assert plan.get("rl_reference_model") == "frozen_copy"
        assert sft.parts["weights"] == real and dpo.parts["weights"] == 2 * real
        assert dpo.parts["buffers"] == 2 * sft.parts["buffers"]
    else:  # the reference is the base with the adapter disabled: no copy
        assert plan.get("rl_reference_model") == "adapter_disabled"
        assert dpo.parts["weights"] == sft.parts["weights"] == real


def test_bf16_auto_counts_what_the_plan_trains_in():
    """`bf16: auto` resolved to true (what resolve decides on a GPU with bfloat16; this machine has
    none) counts 2-byte weights, as `bf16: true` does: the estimate reads the plan, not the raw key."""
    plan, fp32 = _estimate(bf16="auto")
    assert plan.training.bf16 is False  # no GPU here: fp32
    plan.set("bf16", True, "auto", "bf16: auto: the GPU supports bfloat16")
    auto = estimate_memory(plan)
    _, bf16 = _estimate(bf16=True)
    model, _ = build_tiny_model("llama")
    assert auto.parts["weights"] == bf16.parts["weights"] == _parameter_bytes(model) // 2 == fp32.parts["weights"] // 2
    assert auto.parts == bf16.parts


@pytest.mark.parametrize("case", ["causal", "mask", "gqa"])
def test_the_meta_attention_patch_is_sdpa(case):
    """Patch meta_fused_attention: the fused kernel it puts in SDPA's place gives SDPA's result."""
    from archtune.patches.meta_forward import fused_sdpa

    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8)
    kv_heads = 2 if case == "gqa" else 4
    k, v = torch.randn(2, kv_heads, 16, 8), torch.randn(2, kv_heads, 16, 8)
    kwargs = {"is_causal": case != "mask", "enable_gqa": case == "gqa"}
    if case == "mask":
        kwargs["attn_mask"] = torch.randn(2, 1, 16, 16)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.allclose(fused_sdpa(q, k, v, **kwargs), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["qwen3_5-moe", "gemma4-moe"])
def test_the_balanced_experts_patch_is_the_experts_forward_when_experts_are_equal(name):
    """Patch meta_balanced_experts: every routed copy through expert 0's weights is the model's own
    experts forward once every expert holds expert 0's weights (the shapes it saves are theirs)."""
    from archtune.patches.meta_forward import balanced_experts_forward

    model, _ = build_tiny_model(name)
    experts = next(m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj"))
    with torch.no_grad():
        experts.gate_up_proj.copy_(experts.gate_up_proj[:1].expand_as(experts.gate_up_proj))
        experts.down_proj.copy_(experts.down_proj[:1].expand_as(experts.down_proj))
    torch.manual_seed(0)
    hidden = torch.randn(12, model.config.get_text_config().hidden_size)
    top_k = 2
    index = torch.randint(0, experts.gate_up_proj.shape[0], (12, top_k))
    weights = torch.rand(12, top_k)
    model.set_experts_implementation("eager")
    with torch.no_grad():
        expected = experts(hidden, index, weights)
        got = balanced_experts_forward(experts, hidden, index, weights)
    assert torch.allclose(got, expected, atol=1e-5)


def test_load_peak_counts_dense_experts_unless_read_one_expert_at_a_time(tmp_path):
    """QLoRA with 4-bit experts: from a local safetensors checkpoint the experts are read one expert at
    a time (nothing mapped, nothing dense beyond the trained weights); a model that loads whole (tiny:)
    holds its experts dense in the compute dtype and the mapped shards while loading."""
    keys = {"adapter": "qlora", "load_in_4bit": True, "quantize_moe_experts": True,
            "lora_target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}
    _, whole = _estimate("qwen3_5-moe", **keys)
    model, tokenizer = build_tiny_model("qwen3_5-moe", seed=0)
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    cfg = config_from_dict({"base_model": str(tmp_path), "datasets": [{"path": "d.jsonl"}], "sequence_len": 256,
                            "micro_batch_size": 2, **keys})
    plan = resolve(cfg, json.loads((tmp_path / "config.json").read_text()))
    assert not plan.errors, plan.errors
    read = estimate_memory(plan)
    assert read.load.mapped == 0 and read.load.resident == read.parts["weights"] + read.parts["adapter"]
    experts_fp32 = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n and p.dim() == 3)
    assert whole.load.mapped > 0
    assert whole.load.resident > read.load.resident + 0.7 * experts_fp32
    assert read.device_peak_bytes == max(read.peak_bytes, read.load.device_bytes)


def test_fsdp2_ranks_reading_their_own_rows_load_a_shard_of_the_weights(tmp_path):
    """Under FSDP2 from a local safetensors base each rank holds its shards (and the adapters) while
    loading; with fsdp_cpu_ram_efficient_loading: false every rank loads the whole model first."""
    model, _ = build_tiny_model("gemma3", seed=0)
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    keys = {"base_model": str(tmp_path), "datasets": [{"path": "d.jsonl"}], "fsdp": ["full_shard", "auto_wrap"],
            "adapter": "lora", "sequence_len": 64, "bf16": True}  # the fp32 checkpoint cast while loading
    own = estimate_memory(resolve(config_from_dict(keys), json.loads((tmp_path / "config.json").read_text()),
                                  world_size=2))
    whole = estimate_memory(resolve(config_from_dict({**keys, "fsdp_config": {"fsdp_cpu_ram_efficient_loading": False}}),
                                    json.loads((tmp_path / "config.json").read_text()), world_size=2))
    assert own.load.mapped == whole.load.mapped == 0  # read tensor by tensor, nothing mapped
    assert own.load.resident == own.parts["weights"] + 2 * own.parts["adapter"]  # adapters whole until sharded
    assert whole.load.resident == 2 * own.parts["weights"] + 2 * own.parts["adapter"]
    assert own.load.transient * 2 <= whole.load.transient and own.load.device_bytes < whole.load.device_bytes


def test_a_checkpoint_in_the_training_dtype_loads_as_its_mapped_pages(tmp_path):
    """Stored in the dtype training uses, transformers' tensors are the mapped shards' pages: no
    second copy and nothing in flight; cast to another dtype, the largest tensor is in flight."""
    model, _ = build_tiny_model("gemma3", seed=0)
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    plans = [resolve(config_from_dict({"base_model": str(tmp_path), "datasets": [{"path": "d.jsonl"}], "bf16": bf16}),
                     json.loads((tmp_path / "config.json").read_text())) for bf16 in (False, True)]
    same, cast = (estimate_memory(p).load for p in plans)
    assert same.mapped == same.transient == 0 and same.resident > 0
    assert cast.mapped == 0 and cast.transient == max(p.numel() for p in model.parameters()) * 4


def test_training_tied_embeddings_counts_their_second_gradient():
    """Full fine-tuning with tied embeddings: lm_head's and the lookup's gradients are both dense
    and summed (one more embedding's size); untied, or with LoRA (frozen embeddings), nothing."""
    config = build_tiny_config("gemma3").to_dict()
    untied = json.loads(json.dumps(config))
    untied["text_config"]["tie_word_embeddings"] = untied["tie_word_embeddings"] = False
    estimates = {}
    for name, model_config, adapter in (("tied", config, None), ("untied", untied, None), ("lora", config, "lora")):
        cfg = config_from_dict({"base_model": "tiny:gemma3", "datasets": [{"path": "d.jsonl"}], "adapter": adapter})
        estimates[name] = estimate_memory(resolve(cfg, model_config)).parts["buffers"]
    embedding = meta_model(config, "AutoModelForImageTextToText").get_input_embeddings().weight.numel() * 4
    assert estimates["tied"] - estimates["untied"] == embedding
    assert estimates["lora"] == estimates["untied"]


@pytest.mark.parametrize("name, per_expert", [("qwen3_5-moe", True), ("gemma4-moe", False)])
def test_experts_stored_per_expert_stay_mapped_while_transformers_fuses_them(tmp_path, name, per_expert):
    model, _ = build_tiny_model(name, seed=0)
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    cfg = config_from_dict({"base_model": str(tmp_path), "datasets": [{"path": "d.jsonl"}], "adapter": "lora"})
    load = estimate_memory(resolve(cfg, json.loads((tmp_path / "config.json").read_text()))).load
    experts = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n and p.dim() == 3)
    assert load.mapped == (experts if per_expert else 0)
