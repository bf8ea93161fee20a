"""Every refusal of the plan, run through both `archtune check` and `archtune train`.

`check` and `train` resolve the same plan (models.load.resolve_plan), so a configuration one of
them refuses the other refuses too, with the same key, exit code 2, and before any weight is
loaded or any worker started. The table has one case per rule that can refuse; a rule that gains
a `plan.error` without a case here fails `test_every_refusing_rule_has_a_case`.
"""
from __future__ import annotations

import importlib.util
import inspect
import json

import pytest

from archtune.assets import TOKENIZER_DIR
from archtune.families import all_families
from archtune.plan.rules import GENERIC_RULES, REFUSALS, WRAP_KEY, family_rules
from archtune.plan.structure import TORCHVISION_INSTALL
from tests.e2e.conftest import run_cli, write_config
from tests.unit.test_plan_rules import jamba_config

FSDP = {"fsdp": ["full_shard", "auto_wrap"]}
FSDP2_WRAP = {**FSDP, "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}
UNKNOWN_MODEL = "unknown-model"  # a local model directory whose model_type transformers does not know
JAMBA = "jamba"  # a local model directory of a Jamba config (a Mamba layer no packing patch covers)
GEMMA3N = "gemma3n"  # a local model directory of a Gemma 3n config: its vision tower is timm's (TimmWrapperModel)

# rule name -> (base_model, config keys, --nproc, the key refused)
REFUSAL_CASES: dict[str, tuple[str, dict, int, str]] = {
    "rl_method": ("tiny:llama", {"rl": "dpo", "reward_model": True}, 1, "reward_model"),
    "rl_data_types": ("tiny:llama", {"rl": "dpo"}, 1, "datasets.0.type"),  # alpaca rows are not pairs
    "rl_packing": ("tiny:llama", {"rl": "dpo", "sample_packing": True}, 1, "sample_packing"),
    "rl_grpo": ("tiny:llama", {"rl": "grpo"}, 1, "trl.reward_funcs"),  # no reward function
    "rl_grpo_rollouts": ("tiny:llama", {"rl": "grpo", "trl": {"reward_funcs": ["rewards.f"], "num_generations": 3},
                                        "micro_batch_size": 4}, 1, "trl.num_generations"),  # 4 is no multiple of 3
    "rl_grpo_data_types": ("tiny:llama", {"rl": "grpo", "trl": {"reward_funcs": ["rewards.f"]},
                                          "test_datasets": [{"path": "held_out.jsonl", "type": "alpaca"}]},
                           1, "test_datasets.0.type"),  # alpaca rows are not prompts
    "lora_target_parameters": ("tiny:gemma4-moe", {"adapter": "lora", "lora_dropout": 0,
                                                   "lora_target_parameters": ["experts.nope_proj"]},
                               1, "lora_target_parameters"),
    "lora_dropout_with_parameters": ("tiny:gemma4-moe", {"adapter": "lora", "lora_dropout": 0.1,
                                                         "lora_target_parameters": ["experts.gate_up_proj"]},
                                     1, "lora_dropout"),
    "fsdp_wrap_class": ("tiny:gemma4-moe", {**FSDP2_WRAP, "fsdp_config": {
        **FSDP2_WRAP["fsdp_config"], "fsdp_transformer_layer_cls_to_wrap": "Gemma4AudioLayer"}}, 2, WRAP_KEY),
    "experts_implementation": ("tiny:gemma4-moe", {"experts_implementation": "no_such_kernel"}, 1,
                               "experts_implementation"),
    "plugins": ("tiny:llama", {"plugins": ["some_package.SomePlugin"]}, 1, "plugins"),
    "non_reentrant_checkpointing": ("tiny:gemma4-moe", {"gradient_checkpointing": True,
                                                        "gradient_checkpointing_kwargs": {"use_reentrant": True}},
                                    1, "gradient_checkpointing_kwargs.use_reentrant"),
    "fsdp1_refuses_quantized_base": ("tiny:gemma4-dense", {**FSDP, "fsdp_config": {"fsdp_version": 1},
                                                           "adapter": "qlora", "load_in_4bit": True},
                                     2, "fsdp_config.fsdp_version"),
    "refuse_load_in_8bit": ("tiny:llama", {"adapter": "lora", "load_in_8bit": True}, 1, "load_in_8bit"),
    "refuse_fsdp1": ("tiny:llama", {**FSDP, "fsdp_config": {"fsdp_version": 1}}, 2, "fsdp_config.fsdp_version"),
    "attn_implementation": ("tiny:llama", {"attn_implementation": "sdpaa"}, 1, "attn_implementation"),
    "optimizer": ("tiny:llama", {"optimizer": "adamw_torchh"}, 1, "optimizer"),
    "lr_scheduler": ("tiny:llama", {"lr_scheduler": "cosin"}, 1, "lr_scheduler"),
    "schedule": ("tiny:llama", {"saves_per_epoch": 2, "save_steps": 3}, 1, "saves_per_epoch"),
    "chat_template": ("tiny:llama", {"chat_template": "phi_3"}, 1, "chat_template"),
    "lora_model_dir": ("tiny:llama", {"adapter": "lora", "lora_model_dir": "/nonexistent/adapter"}, 1,
                       "lora_model_dir"),
    "unfrozen_parameters": ("tiny:llama", {"unfrozen_parameters": ["nothing_matches"]}, 1, "unfrozen_parameters"),
    "lora_target_modules_match": ("tiny:gemma3", {"adapter": "lora",
                                                  "lora_target_modules": r"model\.layers\.\d+\.q_proj"},
                                  1, "lora_target_modules"),
    "chunked_cross_entropy": ("tiny:llama", {"chunked_cross_entropy": False, "cut_cross_entropy": True}, 1,
                              "chunked_cross_entropy"),
    "refuse_offloading_without_layers": (UNKNOWN_MODEL, {"activation_offloading": True}, 1,
                                         "activation_offloading"),
    "refuse_inexact_packing": (JAMBA, {"sample_packing": True}, 1, "sample_packing"),
    "quantize_moe_experts": ("tiny:gemma4-moe", {"adapter": "lora", "quantize_moe_experts": True}, 1,
                             "quantize_moe_experts"),
    "model_libraries": (GEMMA3N, {}, 1, "base_model"),  # without timm (not in archtune's dependencies)
}


def gemma3n_config() -> dict:
    """A small Gemma 3n config.json (transformers' own config classes): text decoder, timm vision tower,
    audio encoder."""
    from transformers import Gemma3nConfig

    vocab = 512
    return Gemma3nConfig(
        text_config={"vocab_size": vocab, "vocab_size_per_layer_input": vocab, "hidden_size": 32,
                     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 16, "hidden_size_per_layer_input": 8, "laurel_rank": 4,
                     "num_kv_shared_layers": 0, "layer_types": ["sliding_attention", "full_attention"],
                     "activation_sparsity_pattern": [0.0, 0.0], "sliding_window": 16},
        vision_config={"hidden_size": 32, "vocab_size": 16, "vocab_offset": vocab},
        audio_config={"hidden_size": 32, "conf_num_attention_heads": 2, "conf_num_hidden_layers": 1,
                      "sscp_conv_channel_size": [8, 8], "vocab_size": 16, "vocab_offset": vocab + 16},
    ).to_dict()


def _refusing_rules() -> set[str]:
    rules = [*GENERIC_RULES, *REFUSALS, *(r for f in all_families() for r in family_rules(f))]
    return {r.name for r in rules if "plan.error(" in inspect.getsource(r.apply)}


def test_every_refusing_rule_has_a_case():
    assert _refusing_rules() == set(REFUSAL_CASES)


def _config(tmp_path, base_model: str, keys: dict):
    if base_model in (UNKNOWN_MODEL, JAMBA, GEMMA3N):
        model_dir = tmp_path / base_model
        model_dir.mkdir()
        model_config = {UNKNOWN_MODEL: lambda: {"model_type": "no_such_architecture"}, JAMBA: jamba_config,
                        GEMMA3N: gemma3n_config}[base_model]()
        (model_dir / "config.json").write_text(json.dumps(model_config))
        base = {"base_model": str(model_dir), "tokenizer_config": str(TOKENIZER_DIR)}
    else:
        base = {"base_model": base_model}
    return write_config(tmp_path / "refused.yaml", **base, datasets=[{"path": str(tmp_path / "data.jsonl")}],
                        output_dir=str(tmp_path / "out"), **keys)


@pytest.mark.parametrize("rule", sorted(REFUSAL_CASES))
def test_check_and_train_refuse_alike(tmp_path, capsys, rule):
    base_model, keys, nproc, key = REFUSAL_CASES[rule]
    if base_model == GEMMA3N and importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here: Gemma 3n's vision tower builds")
    config = _config(tmp_path, base_model, keys)

    code, out, err = run_cli(capsys, "check", config, "--json", "--nproc", str(nproc))
    assert code == 2, (rule, out, err)
    assert key in {e["key"] for e in json.loads(out)["errors"]}, (rule, out)

    code, out, err = run_cli(capsys, "train", config, "--nproc", str(nproc))
    assert code == 2, (rule, out, err)
    assert f"{key}:" in err and "Traceback" not in err, (rule, err)
    assert not (tmp_path / "out").exists()  # refused before the run started


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed here")
def test_a_library_the_model_needs_is_named_alike_by_check_and_train(tmp_path, capsys):
    """Gemma 3n's vision tower is timm's: check says so with the install line, and train stops with
    the same message (never transformers' traceback while loading weights)."""
    config = _config(tmp_path, GEMMA3N, {})
    code, out, err = run_cli(capsys, "check", config, "--json")
    (error,) = json.loads(out)["errors"]
    # timm imports torchvision: without one, the torch-matching build comes first.
    fix = "pip install timm" if importlib.util.find_spec("torchvision") else f"{TORCHVISION_INSTALL}; pip install timm"
    assert code == 2 and error["key"] == "base_model" and error["fix"] == fix
    assert "TimmWrapperModel requires the timm library" in error["message"]
    code, out, err = run_cli(capsys, "train", config)
    assert code == 2 and "Traceback" not in err
    assert f"base_model: {error['message']}" in " ".join(err.split()) and "pip install timm" in err
