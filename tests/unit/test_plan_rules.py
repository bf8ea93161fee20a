"""plan.resolve on the tiny models' real config.json dicts: one test (or table) per rule.

Each test fails when its rule is taken out of GENERIC_RULES / Family.rules.
"""
from __future__ import annotations

import copy
import functools
import json
import re

import pytest
import torch

from archtune.config import config_from_dict
from archtune.families import all_families, get_family
from archtune.plan.rules import GENERIC_RULES, family_rules, names_to_language_model_regex
from archtune.models.tiny import build_tiny_config
from archtune.plan import Plan, model_structure, resolve

TOWERED = ["gemma4-moe", "gemma4-dense", "gemma4-e2b", "gemma3", "qwen3_5-moe"]
ALL_TINY = TOWERED + ["llama"]
SEED_FSDP2 = {
    "fsdp": ["full_shard", "auto_wrap"],
    "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                    "fsdp_transformer_layer_cls_to_wrap": "Gemma4TextDecoderLayer"},
}
SEED_EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


@functools.cache
def _model_config(name: str) -> dict:
    return build_tiny_config(name).to_dict()


def model_config(name: str) -> dict:
    return copy.deepcopy(_model_config(name))


def plan_for(name: str, world_size: int = 1, **keys) -> Plan:
    cfg = config_from_dict({"base_model": f"tiny:{name}", "datasets": [{"path": "data.jsonl"}], **keys})
    return resolve(cfg, model_config(name), world_size=world_size)


def decision(plan: Plan, key: str) -> tuple:
    d = plan.settings[key]
    return d.value, d.source


def error_keys(plan: Plan) -> list[str]:
    return [p.key for p in plan.errors]


# ---------------------------------------------------------------- 1. freeze_mm_modules

@pytest.mark.parametrize("name, value, source", [
    ("gemma4-moe", True, "family"),
    ("gemma4-dense", True, "family"),
    ("gemma4-e2b", True, "family"),
    ("gemma3", True, "family"),
    ("qwen3_5-moe", True, "family"),
    ("llama", False, "default"),
])
def test_freeze_mm_modules_defaults_to_true_for_models_with_towers(name, value, source):
    assert decision(plan_for(name), "freeze_mm_modules") == (value, source)


def test_freeze_mm_modules_user_value_wins():
    assert decision(plan_for("gemma4-moe", freeze_mm_modules=False), "freeze_mm_modules") == (False, "user")


def test_freeze_mm_modules_is_false_for_a_text_only_config_of_a_towered_family():
    text_only = model_config("gemma3")
    text_only = {**text_only["text_config"], "model_type": "gemma3_text"}
    cfg = config_from_dict({"base_model": "x/y", "datasets": [{"path": "d.jsonl"}]})
    plan = resolve(cfg, text_only)
    assert plan.family.name == "gemma3"
    assert decision(plan, "freeze_mm_modules") == (False, "default")


# ---------------------------------------------------------------- 2. non-reentrant checkpointing

@pytest.mark.parametrize("name, source", [
    ("gemma4-moe", "family"), ("gemma4-e2b", "family"), ("gemma3", "family"), ("qwen3_5-moe", "family"),
    ("llama", "default"),
])
def test_checkpointing_is_non_reentrant(name, source):
    plan = plan_for(name, gradient_checkpointing=True)
    assert decision(plan, "gradient_checkpointing_kwargs.use_reentrant") == (False, source)
    # The dotted child replaces the whole-value parent (gradient_checkpointing_kwargs: null).
    assert "gradient_checkpointing_kwargs" not in plan.settings
    assert plan.section("gradient_checkpointing_kwargs") == {"use_reentrant": False}


@pytest.mark.parametrize("name, refused", [("gemma4-moe", True), ("gemma3", True), ("qwen3_5-moe", True),
                                           ("llama", False)])
def test_explicit_reentrant_checkpointing_is_refused_on_the_families(name, refused):
    plan = plan_for(name, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert ("gradient_checkpointing_kwargs.use_reentrant" in error_keys(plan)) is refused
    if refused:
        problem = plan.errors[0]
        assert "use_reentrant: false" in problem.fix
    assert decision(plan, "gradient_checkpointing_kwargs.use_reentrant") == (True, "user")


def test_explicit_non_reentrant_stays_the_users_and_other_kwargs_are_kept():
    plan = plan_for("gemma4-moe", gradient_checkpointing=True,
                    gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})
    assert not plan.errors
    assert plan.section("gradient_checkpointing_kwargs") == {"use_reentrant": False, "preserve_rng_state": False}
    assert plan.source("gradient_checkpointing_kwargs.use_reentrant") == "user"


# ---------------------------------------------------------------- 3. DDP find_unused_parameters

@pytest.mark.parametrize("name, world_size, keys, value, source, reason", [
    ("gemma4-moe", 2, {}, True, "family", "reduction"),
    ("gemma4-e2b", 4, {}, True, "family", "reduction"),
    ("gemma3", 2, {}, True, "family", "reduction"),
    ("gemma4-moe", 2, {"activation_offloading": True}, False, "family", "ready twice"),
    ("gemma3", 2, {"activation_offloading": True}, False, "family", "ready twice"),
    ("gemma4-moe", 1, {}, False, "default", "single process"),
    ("gemma4-moe", 2, SEED_FSDP2, False, "default", "FSDP"),
    ("qwen3_5-moe", 2, {}, True, "default", "transformers"),
    ("llama", 2, {}, True, "default", "transformers"),
    ("llama", 2, {"gradient_checkpointing": True}, False, "default", "gradient checkpointing"),
    ("llama", 1, {}, False, "default", "single process"),
])
def test_ddp_find_unused_parameters(name, world_size, keys, value, source, reason):
    plan = plan_for(name, world_size=world_size, **keys)
    assert decision(plan, "ddp_find_unused_parameters") == (value, source)
    assert reason in plan.settings["ddp_find_unused_parameters"].reason
    assert not plan.warnings and not plan.errors


@pytest.mark.parametrize("keys, warned", [
    ({"ddp_find_unused_parameters": False}, True),
    ({"ddp_find_unused_parameters": True}, False),
    ({"ddp_find_unused_parameters": True, "activation_offloading": True}, True),
])
def test_ddp_user_value_wins_with_a_warning_when_it_contradicts_the_family(keys, warned):
    plan = plan_for("gemma4-moe", world_size=2, **keys)
    assert decision(plan, "ddp_find_unused_parameters") == (keys["ddp_find_unused_parameters"], "user")
    assert any("ddp_find_unused_parameters" in w for w in plan.warnings) is warned


def test_world_size_is_recorded():
    assert decision(plan_for("llama"), "world_size") == (1, "default")
    plan = plan_for("llama", world_size=3)
    assert plan.world_size == 3 and plan.get("world_size") == 3


# ---------------------------------------------------------------- 4. LoRA targets

@pytest.mark.parametrize("name, value, source", [
    ("gemma4-moe", get_family("gemma4").lora_target_regex, "family"),
    ("gemma3", get_family("gemma3").lora_target_regex, "family"),
    ("qwen3_5-moe", get_family("qwen3_5_moe").lora_target_regex, "family"),
    ("llama", "all-linear", "auto"),
])
def test_lora_without_targets_gets_the_family_regex(name, value, source):
    assert decision(plan_for(name, adapter="lora"), "lora_target_modules") == (value, source)


@pytest.mark.parametrize("name", ["gemma4-moe", "gemma4-e2b", "gemma3", "qwen3_5-moe"])
def test_lora_target_linear_on_a_multimodal_model_means_the_language_model_while_towers_are_frozen(name):
    plan = plan_for(name, adapter="lora", lora_target_linear=True)
    assert plan.errors == [] and not [w for w in plan.warnings if "towers" in w]
    d = plan.settings["lora_target_modules"]
    assert d.value == "all-linear" and plan.get("freeze_mm_modules") is True
    assert "the language model" in d.reason and "frozen" in d.reason and "loss ~12" in d.reason
    # Towers trained on purpose: they are adapted too, as Axolotl does, with the trap named and the fix.
    off = plan_for(name, adapter="lora", lora_target_linear=True, freeze_mm_modules=False)
    assert off.errors == [] and off.get("lora_target_modules") == "all-linear"
    (warning,) = [w for w in off.warnings if "lora_target_linear with freeze_mm_modules: false" in w]
    assert "loss ~12" in warning and "freeze_mm_modules: true" in warning and plan.family.lora_target_regex in warning


def test_all_linear_string_on_a_multimodal_model_reads_the_same():
    plan = plan_for("gemma4-dense", adapter="lora", lora_target_modules="all-linear")
    assert plan.errors == [] and "the language model" in plan.settings["lora_target_modules"].reason
    off = plan_for("gemma4-dense", adapter="lora", lora_target_modules="all-linear", freeze_mm_modules=False)
    assert [w for w in off.warnings if w.startswith("lora_target_modules with freeze_mm_modules: false")]


def test_lora_target_linear_on_a_text_model_is_fine():
    plan = plan_for("llama", adapter="lora", lora_target_linear=True)
    assert not plan.errors and decision(plan, "lora_target_modules") == ("all-linear", "auto")


@pytest.mark.parametrize("name, names", [
    ("gemma4-moe", ["q_proj", "v_proj"]),
    ("gemma4-e2b", ["q_proj", "v_proj", "down_proj"]),
    ("gemma3", ["q_proj", "v_proj"]),
    ("qwen3_5-moe", ["q_proj", "qkv"]),  # the vision blocks' fused attention projection is `attn.qkv`
])
def test_a_name_list_is_confined_to_the_language_model(name, names):
    plan = plan_for(name, adapter="lora", lora_target_modules=names)
    regex, source = decision(plan, "lora_target_modules")
    assert source == "auto" and isinstance(regex, str) and "tower" in plan.settings["lora_target_modules"].reason
    modules = model_structure(model_config(name), plan.family.auto_class).module_names
    hit = [m for m in modules if re.fullmatch(regex, m)]
    by_name = [m for m in modules if m.rsplit(".", 1)[-1] in names]  # what PEFT's list rule would hit
    lm = plan.family.language_model_prefix + "."
    # Every listed module of the language model, none of the towers' that the list would also hit.
    assert hit and hit == [m for m in by_name if m.startswith(lm)]
    assert any(not m.startswith(lm) for m in by_name), "the tiny model's tower should share a listed name"
    # torch's checkpoint wrapper segment is matched too.
    wrapped = hit[0].replace(".self_attn.", "._checkpoint_wrapped_module.self_attn.")
    assert wrapped != hit[0] and re.fullmatch(regex, wrapped)


def test_a_name_list_stays_as_given_on_a_model_without_towers():
    plan = plan_for("llama", adapter="lora", lora_target_modules=["q_proj", "v_proj"])
    assert decision(plan, "lora_target_modules") == (["q_proj", "v_proj"], "user")


@pytest.mark.parametrize("names, matches, misses", [
    (["q_proj"], ["model.language_model.layers.0.self_attn.q_proj",
                  "model.language_model.layers.11._checkpoint_wrapped_module.self_attn.q_proj"],
     ["model.vision_tower.encoder.layers.0.self_attn.q_proj", "model.language_model.layers.0.self_attn.q_proj.linear",
      "model.language_model.layers.0.self_attn.xq_proj"]),
    (["self_attn.o_proj", "down_proj"], ["model.language_model.layers.3.self_attn.o_proj",
                                         "model.language_model.layers.3.mlp.down_proj"],
     ["model.language_model.layers.3.mlp.o_proj", "model.audio_tower.layers.0.mlp.down_proj"]),
    (["a.b"], ["lm.a.b"], ["lm.aXb"]),  # dots in a name are literal
])
def test_names_to_language_model_regex(names, matches, misses):
    prefix = "lm" if names == ["a.b"] else "model.language_model"
    regex = names_to_language_model_regex(names, prefix)
    assert all(re.fullmatch(regex, m) for m in matches)
    assert not any(re.fullmatch(regex, m) for m in misses)


# ---------------------------------------------------------------- 6. expert LoRA

@pytest.mark.parametrize("name, given, resolved, source", [
    ("gemma4-moe", ["gate_proj", "up_proj", "down_proj"], SEED_EXPERTS, "auto"),
    ("gemma4-moe", ["gate_up_proj"], ["experts.gate_up_proj"], "auto"),
    ("gemma4-moe", SEED_EXPERTS, SEED_EXPERTS, "user"),
    ("qwen3_5-moe", ["down_proj", "experts.gate_up_proj"], ["experts.down_proj", "experts.gate_up_proj"], "auto"),
    ("qwen3_5-moe", ["mlp.experts.down_proj"], ["mlp.experts.down_proj"], "user"),
])
def test_lora_target_parameters_resolve_to_expert_tensors(name, given, resolved, source):
    plan = plan_for(name, adapter="lora", lora_target_parameters=given)
    assert not plan.errors
    assert decision(plan, "lora_target_parameters") == (resolved, source)


@pytest.mark.parametrize("name, given, expect", [
    ("gemma4-moe", ["foo_proj"], "experts.gate_up_proj"),
    ("qwen3_5-moe", ["experts.gate_proj"], "experts.down_proj"),
    ("gemma4-dense", SEED_EXPERTS, "no expert parameters"),
    ("llama", ["experts.gate_up_proj"], "no expert parameters"),
])
def test_unknown_lora_target_parameters_are_errors_listing_valid_names(name, given, expect):
    plan = plan_for(name, adapter="lora", lora_target_parameters=given)
    assert error_keys(plan) == ["lora_target_parameters"]
    assert expect in plan.errors[0].message + plan.errors[0].fix


def test_lora_dropout_with_target_parameters_is_an_error():
    plan = plan_for("gemma4-moe", adapter="lora", lora_target_parameters=SEED_EXPERTS, lora_dropout=0.05)
    assert error_keys(plan) == ["lora_dropout"]
    assert "lora_dropout: 0" in plan.errors[0].fix
    assert not plan_for("gemma4-moe", adapter="lora", lora_target_parameters=SEED_EXPERTS).errors


@pytest.mark.parametrize("name, keys, warned", [
    ("gemma4-moe", {"adapter": "lora"}, True),
    ("gemma4-moe", {"adapter": "qlora"}, True),
    ("qwen3_5-moe", {"adapter": "lora", "lora_target_modules": ["q_proj"]}, True),
    ("gemma4-moe", {"adapter": "lora", "lora_target_parameters": SEED_EXPERTS}, False),
    ("gemma4-dense", {"adapter": "lora"}, False),
    ("gemma4-e2b", {"adapter": "lora"}, False),
    ("gemma4-moe", {}, False),  # full fine-tune trains the experts
])
def test_moe_lora_without_expert_targets_warns_with_the_yaml_to_add(name, keys, warned):
    plan = plan_for(name, **keys)
    hits = [w for w in plan.warnings if "lora_target_parameters" in w]
    assert bool(hits) is warned
    if warned:
        assert "lora_target_parameters:\n  - experts.gate_up_proj\n  - experts.down_proj" in hits[0]
        assert "13.5 MB" in hits[0]


def test_the_moe_hooks_read_the_config():
    assert get_family("gemma4").moe(model_config("gemma4-moe"))
    assert not get_family("gemma4").moe(model_config("gemma4-dense"))
    assert get_family("qwen3_5_moe").moe(model_config("qwen3_5-moe"))
    assert not get_family("generic").moe(model_config("llama"))


# ---------------------------------------------------------------- 7. FSDP

def test_the_seed_fsdp2_block_is_accepted_verbatim():
    plan = plan_for("gemma4-moe", world_size=2, adapter="lora", **SEED_FSDP2)
    assert not plan.errors
    assert decision(plan, "fsdp_config.fsdp_transformer_layer_cls_to_wrap") == ("Gemma4TextDecoderLayer", "user")
    assert plan.section("fsdp_config")["fsdp_version"] == 2


@pytest.mark.parametrize("name, keys, value, source", [
    ("gemma4-moe", {"fsdp": ["full_shard", "auto_wrap"]}, "Gemma4TextDecoderLayer", "family"),
    ("gemma4-e2b", {"fsdp": ["full_shard", "auto_wrap"], "fsdp_config": {"fsdp_version": 2}},
     "Gemma4TextDecoderLayer", "family"),
    ("gemma3", {"fsdp": ["full_shard", "auto_wrap"]}, "Gemma3DecoderLayer", "family"),
    ("qwen3_5-moe", {"fsdp": ["full_shard", "auto_wrap"]}, "Qwen3_5MoeDecoderLayer", "family"),
    ("llama", {"fsdp": ["full_shard", "auto_wrap"]}, "LlamaDecoderLayer", "auto"),
])
def test_fsdp_wrap_class_defaults_to_the_text_decoder_layer(name, keys, value, source):
    plan = plan_for(name, world_size=2, **keys)
    assert not plan.errors
    assert decision(plan, "fsdp_config.fsdp_transformer_layer_cls_to_wrap") == (value, source)
    if "fsdp_config" not in keys:
        assert plan.source("fsdp_config.fsdp_version") == "default"


@pytest.mark.parametrize("name, cls, ok", [
    ("gemma4-moe", "Gemma4DecoderLayer", False),
    ("gemma4-moe", "Gemma4AudioLayer", False),  # in _no_split_modules, but no audio tower
    ("gemma4-e2b", "Gemma4AudioLayer", True),
    ("gemma4-moe", "Gemma4TextDecoderLayer,Gemma4VisionEncoderLayer", True),
    ("gemma3", "Gemma3TextDecoderLayer", False),
])
def test_a_wrap_class_missing_from_the_model_is_an_error_with_the_fix(name, cls, ok):
    plan = plan_for(name, world_size=2, fsdp=["full_shard", "auto_wrap"],
                    fsdp_config={"fsdp_transformer_layer_cls_to_wrap": cls})
    assert (error_keys(plan) == []) is ok
    if not ok:
        assert error_keys(plan) == ["fsdp_config.fsdp_transformer_layer_cls_to_wrap"]
        assert plan.family.decoder_layer_cls in plan.errors[0].fix


def test_no_wrap_class_check_without_fsdp():
    plan = plan_for("gemma4-moe", world_size=2)
    assert not plan.errors and "fsdp_config.fsdp_transformer_layer_cls_to_wrap" not in plan.settings


def test_fsdp_config_turns_fsdp_on_by_itself_as_in_axolotl():
    plan = plan_for("gemma4-moe", world_size=2, fsdp_config={"fsdp_version": 2})
    assert decision(plan, "fsdp") == (["full_shard", "auto_wrap"], "auto")
    assert plan.get("fsdp_config.fsdp_transformer_layer_cls_to_wrap") == "Gemma4TextDecoderLayer"
    top = plan_for("gemma4-moe", world_size=2, fsdp_version=2)  # Axolotl's top-level spelling
    assert top.get("fsdp") and top.get("fsdp_config.fsdp_version") == 2
    assert not plan_for("gemma4-moe", world_size=2).get("fsdp")


def test_fsdp_with_one_process_trains_unsharded_with_an_info_line():
    plan = plan_for("gemma4-moe", fsdp_config={"fsdp_version": 2})
    assert decision(plan, "fsdp") == (None, "auto")
    assert not plan.errors and any(line.startswith("fsdp: one process") for line in plan.info)


@pytest.mark.parametrize("name, keys, refused", [
    ("gemma4-moe", {"load_in_4bit": True, "adapter": "lora"}, True),
    ("gemma4-dense", {"adapter": "qlora"}, True),
    ("gemma4-moe", {"load_in_8bit": True, "adapter": "lora"}, True),
    ("gemma4-moe", {"adapter": "lora"}, False),  # unquantized
    ("gemma3", {"load_in_4bit": True, "adapter": "lora"}, False),  # a Gemma 4 problem
])
def test_fsdp1_with_a_quantized_gemma4_is_refused(name, keys, refused):
    plan = plan_for(name, world_size=2, fsdp=["full_shard", "auto_wrap"], fsdp_config={"fsdp_version": 1}, **keys)
    messages = [p.message for p in plan.errors if p.key == "fsdp_config.fsdp_version"]
    # FSDP1 is refused for every model (not supported in this release), once; Gemma 4 with a
    # quantized base gets its own reason (the reference's out-of-memory failure) instead.
    assert len(messages) == 1
    assert ("dequantizing" in messages[0]) is refused
    fsdp2 = plan_for(name, world_size=2, fsdp=["full_shard", "auto_wrap"], fsdp_config={"fsdp_version": 2}, **keys)
    assert "fsdp_config.fsdp_version" not in error_keys(fsdp2)


def test_model_structure_is_weightless_cached_and_leaves_the_rng_alone():
    big = build_tiny_config("gemma4-moe").to_dict()
    for derived in ("layer_types", "per_layer_config"):  # per layer: the config derives them for 30 layers
        big["text_config"].pop(derived)
    big["text_config"].update(hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_experts=128,
                              moe_intermediate_size=704)
    state = torch.random.get_rng_state()
    structure = model_structure(big, "AutoModelForImageTextToText")  # ~20B parameters: only possible on meta
    assert torch.equal(state, torch.random.get_rng_state())
    assert sum(torch.Size(s).numel() for s in structure.parameters.values()) > 10e9
    assert "Gemma4TextDecoderLayer" in structure.class_names
    assert model_structure(big, "AutoModelForImageTextToText") is structure


# ---------------------------------------------------------------- 8. use_cache

@pytest.mark.parametrize("keys, source, reason", [
    ({}, "default", "KV cache"),
    ({"gradient_checkpointing": True}, "auto", "size mismatch"),
    ({"activation_offloading": True}, "auto", "activation_offloading"),
    ({**SEED_FSDP2, "fsdp_config": {**SEED_FSDP2["fsdp_config"], "fsdp_activation_checkpointing": True}},
     "auto", "fsdp_activation_checkpointing"),
    # an fsdp_config turns FSDP on by itself (as in Axolotl), so its activation checkpointing counts
    ({"fsdp_config": {"fsdp_activation_checkpointing": True}}, "auto", "fsdp_activation_checkpointing"),
])
def test_use_cache_is_off_for_training_and_forced_off_by_checkpoint_wrappers(keys, source, reason):
    plan = plan_for("gemma4-moe", world_size=2, **keys)
    assert decision(plan, "use_cache") == (False, source)
    assert reason in plan.settings["use_cache"].reason


# ---------------------------------------------------------------- 10. packing policy

@pytest.mark.parametrize("name, value, source", [
    ("gemma4-moe", True, "family"), ("gemma4-e2b", True, "family"), ("gemma3", True, "family"),
    ("qwen3_5-moe", True, "auto"), ("llama", True, "auto"),
])
def test_packed_rows_drop_the_attention_mask_with_the_family_reason_for_gemma(name, value, source):
    plan = plan_for(name)
    assert decision(plan, "sample_packing_drop_attention_mask") == (value, source)
    if value:
        assert "position_ids" in plan.settings["sample_packing_drop_attention_mask"].reason


@pytest.mark.parametrize("cuda, keys, value", [
    (False, {"sample_packing": True}, True),      # CPU: only each document's scores
    (True, {"sample_packing": True}, False),      # CUDA: one fused masked sdpa call
    (False, {"sample_packing": False}, None),     # nothing packed: nothing to decide
    (False, {"sample_packing": True, "attn_implementation": "eager"}, None),
])
def test_document_attention_is_chosen_by_device(monkeypatch, cuda, keys, value):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda)
    plan = plan_for("gemma4-moe", **keys)
    assert plan.get("document_attention") is value
    if value is not None:
        assert plan.settings["document_attention"].source == "auto"
        assert ("CUDA" if cuda else "CPU") in plan.settings["document_attention"].reason


def jamba_config() -> dict:
    """A tiny Jamba config.json: a Mamba mixer layer (state along the sequence) and 3D expert tensors,
    which no family claims and no packing patch covers."""
    from transformers import JambaConfig

    return JambaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, num_experts=4, num_experts_per_tok=2, expert_layer_period=1,
                       expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8,
                       mamba_dt_rank=8, vocab_size=1024).to_dict()


@pytest.mark.parametrize("keys, refused", [
    ({"sample_packing": True}, "sample_packing"),
    ({"eval_sample_packing": True}, "eval_sample_packing"),
    ({}, None),
])
def test_packing_a_model_whose_state_no_patch_resets_is_refused_in_the_plan(keys, refused):
    cfg = config_from_dict({"base_model": "some/jamba", "datasets": [{"path": "data.jsonl"}], **keys})
    plan = resolve(cfg, jamba_config())
    assert plan.family.name == "generic" and not plan.packing_patches
    if refused is None:
        assert plan.errors == []
        return
    assert error_keys(plan) == [refused]
    message = plan.errors[0].message
    assert "cannot be made exact" in message and "model.layers.0.mamba (JambaMambaMixer)" in message
    assert f"{refused}: false" in plan.errors[0].fix


def test_packing_qwen3_5_is_exact_with_its_family_patch_and_refused_without_it():
    assert plan_for("qwen3_5-moe", sample_packing=True).errors == []
    family = copy.copy(get_family("qwen3_5_moe"))
    family.patches = []
    cfg = config_from_dict({"base_model": "tiny:qwen3_5-moe", "datasets": [{"path": "data.jsonl"}],
                            "sample_packing": True})
    plan = resolve(cfg, model_config("qwen3_5-moe"))
    plan.family = family
    plan.errors.clear()
    from archtune.plan.packing import REFUSE_INEXACT_PACKING

    REFUSE_INEXACT_PACKING.apply(plan)
    assert error_keys(plan) == ["sample_packing"]
    assert "Qwen3_5MoeGatedDeltaNet" in plan.errors[0].message


# ---------------------------------------------------------------- experts_implementation, plugins, scales

@pytest.mark.parametrize("keys, value, source", [
    # the tiny model's 8 experts of 64x32 at the default micro-batch: >= 64 pairs per expert, where
    # scattermoe measured faster (plan/experts.py); 1 x 32 tokens: 8 pairs per expert, grouped_mm
    ({"use_kernels": True, "use_scattermoe": True}, "scattermoe", "auto"),
    ({"use_scattermoe": True}, "scattermoe", "auto"),
    ({"use_scattermoe": True, "micro_batch_size": 1, "sequence_len": 32}, "grouped_mm", "auto"),
    ({"use_kernels": True, "use_scattermoe": True, "experts_implementation": "scattermoe"}, "scattermoe", "user"),
    ({"experts_implementation": "grouped_mm"}, "grouped_mm", "user"),
    ({"experts_implementation": "eager"}, "eager", "user"),
    ({}, None, "default"),
])
def test_experts_implementation(keys, value, source):
    plan = plan_for("gemma4-moe", **keys)
    assert not plan.errors and not plan.warnings
    assert decision(plan, "experts_implementation") == (value, source)
    if keys.get("use_scattermoe"):
        assert plan.get("use_kernels") is True


@pytest.mark.parametrize("dims, lora, value", [
    ({}, True, "scattermoe"),  # expert LoRA kept factored
    ({"hidden_size": 2048, "moe_intermediate_size": 512}, True, "scattermoe"),  # large experts, expert LoRA
    ({"hidden_size": 2048, "moe_intermediate_size": 512}, False, "scattermoe"),  # large, 512 pairs each
    ({"hidden_size": 256, "moe_intermediate_size": 64}, False, "scattermoe"),  # small, 512 pairs each
    ({"num_experts": 512, "top_k_experts": 2}, False, "grouped_mm"),  # 512 experts: 8 pairs each, fp32
])
def test_use_scattermoe_chooses_by_the_experts_shape(dims, lora, value):
    model = model_config("gemma4-moe")
    model["text_config"].update(dims)
    keys = {"adapter": "lora", "lora_target_parameters": ["experts.gate_up_proj", "experts.down_proj"],
            "lora_dropout": 0.0} if lora else {}
    cfg = config_from_dict({"base_model": "tiny:gemma4-moe", "datasets": [{"path": "data.jsonl"}],
                            "use_scattermoe": True, "micro_batch_size": 4, "sequence_len": 512, **keys})
    plan = resolve(cfg, model)
    assert not plan.errors
    assert decision(plan, "experts_implementation") == (value, "auto")
    reason = plan.settings["experts_implementation"].reason
    assert "pairs per expert" in reason and "experts_implementation: scattermoe" in reason


@pytest.mark.parametrize("keys, expect", [
    ({"experts_implementation": "scatter_moe"}, "grouped_mm"),
    ({"use_scattermoe": True, "experts_implementation": "eager"}, "experts_implementation: scattermoe"),
])
def test_bad_experts_implementation_is_an_error(keys, expect):
    plan = plan_for("gemma4-moe", **keys)
    assert error_keys(plan) == ["experts_implementation"]
    assert expect in plan.errors[0].fix


def test_experts_implementation_on_a_dense_model_warns():
    plan = plan_for("gemma4-dense", experts_implementation="grouped_mm")
    assert not plan.errors and any("no experts" in w for w in plan.warnings)


def test_axolotl_kernels_plugin_is_an_alias_of_the_builtin():
    plan = plan_for("gemma4-moe", plugins=["axolotl.integrations.kernels.KernelsPlugin"], use_kernels=True,
                    use_scattermoe=True, experts_implementation="scattermoe")
    assert not plan.errors
    assert decision(plan, "plugins") == (["archtune.plugins.KernelsPlugin"], "auto")
    assert "axolotl.integrations.kernels.KernelsPlugin" in plan.settings["plugins"].reason


def test_other_plugins_are_errors():
    plan = plan_for("llama", plugins=["my_company.plugins.Fancy"])
    assert error_keys(plan) == ["plugins"] and "built-in" in plan.errors[0].message


def test_normalize_weight_scales_is_recorded_as_given():
    rules = [{"name_pattern": r"linear_attn\.conv1d\.weight", "threshold": 1.3}]
    plan = plan_for("qwen3_5-moe", normalize_weight_scales=rules)
    value, source = decision(plan, "normalize_weight_scales")
    assert source == "user" and value == [{**rules[0], "dry_run": False}]


# ---------------------------------------------------------------- the plan itself

def test_plan_set_replaces_parent_and_children_and_section_rebuilds_them():
    plan = plan_for("llama")
    assert plan.get("fsdp_config") is None and "fsdp_config" in plan.settings
    plan.set("fsdp_config.fsdp_version", 2, "auto", "x")
    plan.set("fsdp_config.a.b", 1, "auto", "x")
    assert "fsdp_config" not in plan.settings
    assert plan.section("fsdp_config") == {"fsdp_version": 2, "a": {"b": 1}}
    plan.set("fsdp_config", None, "default", "x")
    assert plan.section("fsdp_config") is None and not any(k.startswith("fsdp_config.") for k in plan.settings)
    with pytest.raises(ValueError):
        plan.set("x", 1, "family-ish", "bad source")


def test_nested_config_blocks_keep_unwritten_fields_as_defaults():
    plan = plan_for("gemma4-moe", fsdp=["full_shard"], fsdp_config={"fsdp_version": 2})
    assert plan.source("fsdp_config.fsdp_version") == "user"
    assert plan.source("fsdp_config.fsdp_offload_params") == "default"


@pytest.mark.parametrize("name", ALL_TINY)
def test_plan_json_has_every_key_and_is_serialisable(name):
    plan = plan_for(name, world_size=2, adapter="lora", gradient_checkpointing=True, fsdp=["full_shard", "auto_wrap"])
    data = json.loads(json.dumps(plan.to_json()))
    assert set(data) == {"family", "model_type", "world_size", "settings", "info", "warnings", "errors"}
    for key in ("freeze_mm_modules", "ddp_find_unused_parameters", "gradient_checkpointing_kwargs.use_reentrant",
                "use_cache", "experts_implementation", "sample_packing_drop_attention_mask", "lora_target_modules",
                "lora_target_parameters", "fsdp_config.fsdp_transformer_layer_cls_to_wrap", "world_size"):
        assert set(data["settings"][key]) == {"value", "source", "reason"}, key


def test_every_rule_has_a_one_line_doc_and_a_unique_name():
    groups = [list(GENERIC_RULES)] + [family_rules(f) for f in all_families()]
    for rules in groups:
        names = [r.name for r in rules]
        assert len(names) == len(set(names))
        for rule in rules:
            doc = rule.doc
            assert "\n" not in doc and doc.endswith(".") and (doc[0].isupper() or doc[0] == "`"), rule.name


def test_quantize_moe_experts_on_experts_no_family_declares_says_so():
    """Jamba has 3D expert tensors, but no family declares them: the warning does not claim the
    model has none."""
    from archtune.models.tiny import build_tiny_config

    cfg = config_from_dict({"base_model": "some/model", "datasets": [{"path": "d.jsonl"}], "adapter": "qlora",
                            "load_in_4bit": True, "quantize_moe_experts": True})
    (warning,) = [w for w in resolve(cfg, jamba_config()).warnings if w.startswith("quantize_moe_experts")]
    assert "knows no expert tensors of this jamba model" in warning
    (warning,) = [w for w in resolve(cfg, build_tiny_config("llama").to_dict()).warnings
                  if w.startswith("quantize_moe_experts")]
    assert "this llama model has no expert tensors" in warning


@pytest.mark.parametrize("keys, rows, source", [
    ({}, None, "default"),
    ({"rl": "dpo"}, "paired", "user"),
    ({"rl": "orpo"}, "paired", "user"),
    ({"rl": "kto"}, "unpaired", "user"),
    ({"reward_model": True}, "reward", "user"),
])
def test_preference_rows_are_decided_by_the_plan_and_read_by_data(keys, rows, source):
    plan = plan_for("llama", **keys)
    assert decision(plan, "preference_rows") == (rows, source)
    assert plan.data.preference_rows == rows


@pytest.mark.parametrize("keys, key, value, source", [
    ({}, "eval_micro_batch_size", 1, "default"),
    ({"micro_batch_size": 4}, "eval_micro_batch_size", 4, "user"),
    ({"micro_batch_size": 4, "eval_batch_size": 2}, "eval_micro_batch_size", 2, "user"),
    ({}, "warmup", 0.0, "default"),
    ({"warmup_ratio": 0.1}, "warmup", 0.1, "user"),
    ({"warmup_steps": 5}, "warmup", 5, "user"),
    ({}, "pad_to_length", None, "default"),
    ({"pad_to_sequence_len": True, "sequence_len": 64}, "pad_to_length", 64, "user"),
    ({"pad_to_sequence_len": False}, "pad_to_length", None, "user"),
    ({}, "dataloader_pin_memory_resolved", torch.cuda.is_available(), "default"),
    ({"dataloader_pin_memory": True}, "dataloader_pin_memory_resolved", True, "user"),
    ({}, "run_name", None, "default"),
    ({"mlflow_run_name": "m"}, "run_name", "m", "user"),
    ({"wandb_name": "w", "mlflow_run_name": "m"}, "run_name", "w", "user"),
])
def test_what_the_trainer_reads_is_a_plan_entry(keys, key, value, source):
    plan = plan_for("llama", **keys)
    assert decision(plan, key) == (value, source)
    assert plan.settings[key].reason


def test_the_training_view_reads_every_field_from_the_plan():
    plan = plan_for("llama", eval_batch_size=2, warmup_steps=3, pad_to_sequence_len=True, sequence_len=64,
                    pad_to_multiple_of=8, optim_args={"a": 1, "b": 2}, max_steps=0)
    t = plan.training
    assert (t.eval_micro_batch_size, t.warmup, t.pad_to_length, t.pad_to_multiple_of) == (2, 3, 64, 8)
    assert t.optim_args == "a=1,b=2" and t.max_steps == -1
    assert t.save_interval(10) == ("no", 500) and t.eval_interval(10) == ("no", None)
    assert plan_for("llama", saves_per_epoch=4, evals_per_epoch=2).training.save_interval(10) == ("steps", 2)
    del plan.settings["warmup"]
    with pytest.raises(KeyError, match="warmup"):
        plan.training


# FSDP2 loading: each rank reads only its own rows where the checkpoint holds the model as stored.
FSDP_LOADING = "fsdp_config.fsdp_cpu_ram_efficient_loading"


def _checkpoint_dir(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    return str(tmp_path)


@pytest.mark.parametrize("keys, value, source, why", [
    ({}, True, "default", "reads only its own slices"),
    ({"fsdp_config": {"fsdp_cpu_ram_efficient_loading": False}}, False, "user", "every rank loads the whole model"),
    ({"adapter": "qlora", "load_in_4bit": True}, False, "default", "quantized while loading"),
    ({"fsdp_config": {"fsdp_offload_params": True}}, False, "default", "fsdp_offload_params"),
])
def test_fsdp_ranks_read_their_own_shards_of_a_local_unquantized_checkpoint(tmp_path, keys, value, source, why):
    plan = plan_for("gemma3", world_size=2, base_model=_checkpoint_dir(tmp_path), fsdp=["full_shard", "auto_wrap"],
                    **keys)
    assert decision(plan, FSDP_LOADING)[:2] == (value, source) and why in plan.settings[FSDP_LOADING].reason
    assert plan.distributed.fsdp_load_own_shards is value


def test_fsdp_loading_asked_for_where_it_cannot_apply_warns(tmp_path):
    plan = plan_for("gemma3", world_size=2, base_model="tiny:gemma3", fsdp=["full_shard", "auto_wrap"],
                    fsdp_config={"fsdp_cpu_ram_efficient_loading": True})
    assert decision(plan, FSDP_LOADING)[:2] == (False, "user") and not plan.distributed.fsdp_load_own_shards
    assert any("every rank loads the whole model" in w and "not a local safetensors" in w for w in plan.warnings)
