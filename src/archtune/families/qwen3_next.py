"""Qwen3-Next: Qwen/Qwen3-Next-80B-A3B-Instruct (and -Thinking).

`Qwen3NextForCausalLM` (config `model_type: "qwen3_next"`), text only:

    model.model.layers   Qwen3NextDecoderLayer

Layers mix `linear_attention` (`linear_attn`: Gated DeltaNet with the fused projections
in_proj_qkvz and in_proj_ba, conv1d, out_proj) and `full_attention` (`self_attn`, gated q_proj),
three to one. Every layer's MLP is a sparse MoE block (router `mlp.gate`, 3D
`mlp.experts.{gate_up_proj,down_proj}`, `mlp.shared_expert.{gate,up,down}_proj`, scalar gate
`mlp.shared_expert_gate`), or a dense `mlp.{gate,up,down}_proj` in the layers the config lists in
`mlp_only_layers`. The forerunner of Qwen 3.5 MoE's text model, without its vision tower.
"""
from __future__ import annotations

from typing import Any

from archtune.families import Family, FamilyRule, TinyModel, register_family, text_config
from archtune.families.base import special_token_ids

# Language-model linears: full-attention q/k/v/o and DeltaNet's big projections (in_proj_qkvz,
# out_proj). Left out as for Qwen 3.5: the router, the shared expert's scalar gate and in_proj_ba
# (one output per head: the write strength and decay gate). Left out here also: the shared expert
# and the dense MLPs, because stock PEFT (0.21) loading an adapter of a qwen3_next model moves every
# target ending in gate_proj / up_proj / down_proj onto the routed experts (its transformers-v4 MoE
# conversion), so such an adapter would reload without those LoRA weights outside archtune.
# `lora_target_modules` naming them still trains them (archtune keeps them where they are).
LORA_TARGET_REGEX = (
    r"model\.layers\.\d+\.(_checkpoint_wrapped_module\.)?"
    r"(self_attn\.(q|k|v|o)_proj"
    r"|linear_attn\.(in_proj_qkvz|out_proj))"
)


def _is_moe(model_config: dict[str, Any]) -> bool:
    return (text_config(model_config).get("num_experts") or 0) > 0


def _build_config(tokenizer):
    from transformers import Qwen3NextConfig

    ids = special_token_ids(tokenizer)
    return Qwen3NextConfig(
        vocab_size=ids.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        # Real: 3 linear_attention : 1 full_attention (full_attention_interval 4).
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        # Two value heads per key head, as the real 32 / 16: the fused projections interleave them.
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        mlp_only_layers=[1],  # one dense MLP layer, which the config allows
        max_position_embeddings=4096, tie_word_embeddings=False,
        pad_token_id=ids.pad, bos_token_id=ids.bos, eos_token_id=ids.eos)


FAMILY = register_family(
    Family(
        name="qwen3_next",
        model_types=("qwen3_next",),
        description="Qwen3-Next (80B-A3B): hybrid Gated DeltaNet / full attention, routed experts plus a "
        "shared expert, text only",
        models={"Qwen/Qwen3-Next-80B-A3B-Instruct": "MoE: 80B parameters, 3B active"},
        architecture_notes=(
            "Hybrid: Gated DeltaNet linear attention (fused in_proj_qkvz / in_proj_ba) in three of every four "
            "layers, gated full attention in the fourth",
            "512 experts, 10 active per token, plus a shared expert in every layer",
        ),
        auto_class="AutoModelForCausalLM",
        language_model_prefix="model",
        decoder_layer_cls="Qwen3NextDecoderLayer",
        lora_target_regex=LORA_TARGET_REGEX,
        expert_param_names=("experts.gate_up_proj", "experts.down_proj"),
        expert_param_aliases={"gate_proj": "experts.gate_up_proj", "up_proj": "experts.gate_up_proj",
                              "gate_up_proj": "experts.gate_up_proj", "down_proj": "experts.down_proj"},
        # Hub checkpoints store experts.<e>.gate_proj / up_proj / down_proj; transformers stacks them
        # and concatenates gate and up (in that order) into gate_up_proj.
        expert_checkpoint_parts={"experts.gate_up_proj": ("gate_proj", "up_proj"), "experts.down_proj": ("down_proj",)},
        is_moe=_is_moe,
        moe_shape_keys={"num_experts": "num_experts", "top_k": "num_experts_per_tok", "hidden": "hidden_size",
                        "intermediate": "moe_intermediate_size"},
        tiny_models=(
            TinyModel("qwen3_next", "Qwen3-Next shape: 3 linear-attention (DeltaNet, fused projections) + 1 "
                      "full-attention layer, 8 experts top-2 plus a shared expert, one dense MLP layer", _build_config),
        ),
        rules=[
            FamilyRule("non_reentrant_checkpointing",
                       "the same Gated DeltaNet and routed experts as Qwen 3.5 MoE, whose training paths are "
                       "tested with non-reentrant recompute only"),
        ],
        # Packed rows: Gated DeltaNet's conv and recurrent state restart at every document.
        patches=["gated_deltanet_packing"],
    )
)
