"""Qwen 3.5 MoE: Qwen/Qwen3.5-35B-A3B.

`Qwen3_5MoeForConditionalGeneration` (config `model_type: "qwen3_5_moe"`, text config
`"qwen3_5_moe_text"`):

    model.model.language_model   Qwen3_5MoeTextModel, layers `Qwen3_5MoeDecoderLayer`
    model.model.visual           Qwen3_5MoeVisionModel (patch embed, blocks, merger)

Layers mix `linear_attention` (`linear_attn`: Gated DeltaNet with in_proj_qkv/z/b/a, conv1d,
out_proj) and `full_attention` (`self_attn`, gated q_proj). Every layer's MLP is a sparse MoE
block: router `mlp.gate` (a bare parameter), 3D `mlp.experts.{gate_up_proj,down_proj}`,
`mlp.shared_expert.{gate,up,down}_proj` and its scalar gate `mlp.shared_expert_gate`.
"""
from __future__ import annotations

import copy
from typing import Any

from archtune.config.chat_templates import TEXT_MACRO
from archtune.families import Family, FamilyRule, TinyModel, register_family, text_config
from archtune.families.base import GgufArch, special_token_ids

# Language-model linears: full-attention q/k/v/o, DeltaNet's big projections (in_proj_qkv,
# in_proj_z, out_proj) and the shared expert. Left out on purpose: the router (`mlp.gate`) and
# `mlp.shared_expert_gate` (routing), DeltaNet's in_proj_b / in_proj_a (one output per head:
# they set the write strength beta and the decay gate of the recurrent state, whose drift is a
# known Qwen 3.5 problem), conv1d, and everything under model.visual.
# AutoModelForCausalLM gives Qwen3_5MoeForCausalLM instead, whose layers sit at `model.layers`;
# the optional `language_model.` keeps the regex right for both.
LORA_TARGET_REGEX = (
    r"model\.(language_model\.)?layers\.\d+\.(_checkpoint_wrapped_module\.)?"
    r"(self_attn\.(q|k|v|o)_proj"
    r"|linear_attn\.(in_proj_qkv|in_proj_z|out_proj)"
    r"|mlp\.shared_expert\.(gate|up|down)_proj)"
)

# lora_target_parameters short names: gate and up projections are one fused tensor per layer.
EXPERT_PARAM_ALIASES = {
    "gate_proj": "experts.gate_up_proj",
    "up_proj": "experts.gate_up_proj",
    "gate_up_proj": "experts.gate_up_proj",
    "down_proj": "experts.down_proj",
}


def _is_moe(model_config: dict[str, Any]) -> bool:
    """Every layer's MLP is a sparse MoE block when the config has experts (num_experts > 0)."""
    return (text_config(model_config).get("num_experts") or 0) > 0


TEXT: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=4,
    # Real: 3 linear_attention : 1 full_attention (full_attention_interval 4).
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    # partial_rotary_factor 0.25 of head_dim 32 -> 8 rotary dims -> 4 frequencies = sum(mrope_section).
    rope_parameters=dict(
        rope_type="default",
        rope_theta=10_000_000.0,
        partial_rotary_factor=0.25,
        mrope_section=[2, 1, 1],
        mrope_interleaved=True,
    ),
    linear_conv_kernel_dim=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)

VISION: dict[str, Any] = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=4,
    temporal_patch_size=2,
    spatial_merge_size=2,
    num_position_embeddings=64,  # an 8x8 grid of learned positions
)


def _build_config(tokenizer):
    from transformers import Qwen3_5MoeConfig

    ids = special_token_ids(tokenizer)
    # Deep copies: configs keep (and may edit) the lists and dicts they are given.
    text = dict(copy.deepcopy(TEXT), vocab_size=ids.vocab_size,
                pad_token_id=ids.pad, bos_token_id=ids.bos, eos_token_id=ids.eos)
    return Qwen3_5MoeConfig(
        text_config=text,
        vision_config=dict(copy.deepcopy(VISION), out_hidden_size=TEXT["hidden_size"]),
        image_token_id=ids["<image_soft_token>"],
        video_token_id=ids["<video_soft_token>"],
        vision_start_token_id=ids["<vision_start>"],
        vision_end_token_id=ids["<vision_end>"],
        tie_word_embeddings=False,
    )


def build_processor(config):
    """Qwen3VLProcessor (images only) at the tiny image size: an image part renders as
    `<vision_start><image_soft_token><vision_end>` and the soft token expands to one token per
    merged patch group (32x32 pixels: an 8x8 patch grid merged 2x2 -> 16 tokens)."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor

    from archtune.families.media import media_chat_template, media_tokenizer, without_video_processor

    vision = config.vision_config
    pixels = 32 * 32
    tokenizer = media_tokenizer({"image_token": "<image_soft_token>", "video_token": "<video_soft_token>",
                                 "vision_start_token": "<vision_start>", "vision_end_token": "<vision_end>"})
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size, size={"shortest_edge": pixels, "longest_edge": pixels})
    return without_video_processor(Qwen3VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
        chat_template=media_chat_template({"image": "<vision_start><image_soft_token><vision_end>"}))


# ---------------------------------------------------------------- GGUF (llama.cpp's qwen35 / qwen35moe)

def _tile_v_heads(tensor, dim: int, k_heads: int, v_per_k: int, head_dim: int):
    """DeltaNet's value heads from Hugging Face's grouped order (each key head's value heads side by
    side) to the tiled order llama.cpp broadcasts key heads in (head j of every group, then j+1)."""
    shape = list(tensor.shape)
    dim %= len(shape)
    grouped = tensor.reshape(*shape[:dim], k_heads, v_per_k, head_dim, *shape[dim + 1:])
    return grouped.transpose(dim, dim + 1).contiguous().reshape(shape)


def _gguf_tensors(name: str, tensor, text: dict):
    """Qwen 3.5's tensors as llama.cpp reads them:

    * every RMSNorm but DeltaNet's gated norm scales by (1 + weight): written with the 1 added;
    * DeltaNet: A_log as A = -exp(A_log), dt_bias as the dt projection's bias, the conv kernel
      without its singleton dimension, value heads in tiled order when there are more value heads
      than key heads (in_proj_qkv's value rows, in_proj_z, in_proj_a/b, A, dt, the conv's value
      channels, out_proj's columns);
    * experts: gate_up_proj [E, 2I, H] split into gate and up [E, I, H]; down_proj [E, H, I] as is.
    """
    import torch

    if name.endswith("norm.weight") and ".linear_attn.norm." not in name:
        return [(name, tensor.float() + 1.0)]
    if name.endswith("mlp.experts.gate_up_proj"):
        half = tensor.shape[-2] // 2
        base = name.removesuffix(".gate_up_proj")
        return [(f"{base}.gate_proj.weight", tensor[..., :half, :]), (f"{base}.up_proj.weight", tensor[..., half:, :])]
    if name.endswith("mlp.experts.down_proj"):
        return [(f"{name}.weight", tensor)]
    if ".linear_attn." not in name:
        return [(name, tensor)]
    k_heads, v_heads = int(text["linear_num_key_heads"]), int(text["linear_num_value_heads"])
    k_dim, v_dim = int(text["linear_key_head_dim"]), int(text["linear_value_head_dim"])
    v_per_k = v_heads // k_heads
    tile = v_per_k > 1
    if name.endswith(".A_log"):
        tensor = -tensor.float().exp()
        return [(name, _tile_v_heads(tensor, 0, k_heads, v_per_k, 1) if tile else tensor)]
    if name.endswith(".dt_bias"):
        tensor = _tile_v_heads(tensor, 0, k_heads, v_per_k, 1) if tile else tensor
        return [(name.removesuffix(".dt_bias") + ".dt_proj.bias", tensor)]
    if ".conv1d." in name:
        tensor = tensor.squeeze(1)
        if tile:
            qk = 2 * k_heads * k_dim
            tensor = torch.cat([tensor[:qk], _tile_v_heads(tensor[qk:], 0, k_heads, v_per_k, v_dim)])
        return [(name, tensor)]
    if tile and ".in_proj_qkv." in name:
        qk = 2 * k_heads * k_dim
        return [(name, torch.cat([tensor[:qk], _tile_v_heads(tensor[qk:], 0, k_heads, v_per_k, v_dim)]))]
    if tile and ".in_proj_z." in name:
        return [(name, _tile_v_heads(tensor, 0, k_heads, v_per_k, v_dim))]
    if tile and (".in_proj_a." in name or ".in_proj_b." in name):
        return [(name, _tile_v_heads(tensor, 0, k_heads, v_per_k, 1))]
    if tile and ".out_proj." in name:
        return [(name, _tile_v_heads(tensor, 1, k_heads, v_per_k, v_dim))]
    return [(name, tensor)]


def _gguf_metadata(writer, text: dict) -> None:
    """DeltaNet's sizes, which layers are recurrent, the interleaved M-RoPE sections, the experts' widths."""
    writer.add_ssm_conv_kernel(int(text["linear_conv_kernel_dim"]))
    writer.add_ssm_state_size(int(text["linear_key_head_dim"]))
    writer.add_ssm_group_count(int(text["linear_num_key_heads"]))
    writer.add_ssm_time_step_rank(int(text["linear_num_value_heads"]))
    writer.add_ssm_inner_size(int(text["linear_value_head_dim"]) * int(text["linear_num_value_heads"]))
    types = text.get("layer_types") or []
    # llama.cpp's per-layer list (gguf 0.19.0 on PyPI has no method for this key yet)
    writer.add_array(f"{writer.arch}.attention.recurrent_layers", [t == "linear_attention" for t in types])
    writer.add_full_attention_interval(int(text.get("full_attention_interval") or 4))
    rope = text.get("rope_parameters") or {}
    sections = list(rope.get("mrope_section") or [11, 11, 10])
    writer.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])
    if text.get("moe_intermediate_size"):
        writer.add_expert_feed_forward_length(int(text["moe_intermediate_size"]))
    if text.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(int(text["shared_expert_intermediate_size"]))


def gguf_arch(arch: str) -> GgufArch:
    return GgufArch(arch, tensors=_gguf_tensors, metadata=_gguf_metadata)


# Qwen 3 / 3.5: ChatML; an answer after the last user turn carries its (possibly empty) reasoning block.
CHAT_TEMPLATE = TEXT_MACRO + (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}{%- set body = text(m['content']) -%}"
    "{%- if m['role'] == 'assistant' and loop.index0 > ns.last_user and '<think>' not in body -%}"
    "{%- set body = '<think>\\n\\n</think>\\n\\n' + body -%}{%- endif -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + body + '<|im_end|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")

FAMILY = register_family(
    Family(
        chat_templates={"qwen3": CHAT_TEMPLATE, "qwen3_5": CHAT_TEMPLATE},
        name="qwen3_5_moe",
        model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
        gguf={t: gguf_arch("qwen35moe") for t in ("qwen3_5_moe", "qwen3_5_moe_text")},
        serving_notes=(
            "vLLM's Qwen3_5MoeForConditionalGeneration declares is_3d_moe_weight (it reads this fused layout), "
            "but releases before the fixes of vllm-project/vllm#41384 / #52194 / #52198 dropped such adapters "
            "silently (the language_model prefix) or read PEFT's expert deltas transposed; which vLLM release "
            "serves them correctly is not checked here: compare its outputs with the merged model's, or serve "
            "the merged model (--format merged)",
        ),
        models={"Qwen/Qwen3.5-35B-A3B": "MoE: 35B parameters, 3B active"},
        architecture_notes=(
            "Hybrid: Gated DeltaNet linear attention in 30 layers and full attention in 10 (every fourth layer)",
            "256 experts, 8 active per token, plus a shared expert in every layer",
            "Known weight-scale drift in the late DeltaNet layers (36-38): rare experts get a larger effective "
            "learning rate from AdamW",
        ),
        weight_scale_rules=({"name_pattern": r"linear_attn\.conv1d\.weight", "threshold": 1.3},),
        description="Qwen 3.5 MoE (35B-A3B): hybrid Gated DeltaNet / full attention, routed experts "
        "plus a shared expert, vision tower",
        auto_class="AutoModelForImageTextToText",
        language_model_prefix="model.language_model",
        decoder_layer_cls="Qwen3_5MoeDecoderLayer",
        mm_module_prefixes=("model.visual",),
        mm_projector_prefixes=("model.visual.merger",),
        modalities=("image",),
        lora_target_regex=LORA_TARGET_REGEX,
        expert_param_names=("experts.gate_up_proj", "experts.down_proj"),
        expert_param_aliases=EXPERT_PARAM_ALIASES,
        # Hub checkpoints store experts.<e>.gate_proj / up_proj / down_proj; transformers stacks them
        # and concatenates gate and up (in that order) into gate_up_proj.
        expert_checkpoint_parts={"experts.gate_up_proj": ("gate_proj", "up_proj"), "experts.down_proj": ("down_proj",)},
        is_moe=_is_moe,
        moe_shape_keys={"num_experts": "num_experts", "top_k": "num_experts_per_tok", "hidden": "hidden_size",
                        "intermediate": "moe_intermediate_size"},
        packing_drop_attention_mask=False,
        sequence_classification_base="transformers.models.qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoePreTrainedModel",
        tiny_models=(
            TinyModel(
                "qwen3_5-moe",
                "Qwen 3.5 MoE shape: 3 linear-attention (DeltaNet) + 1 full-attention layer, 8 experts top-2 "
                "plus a shared expert, vision tower (1 block)",
                _build_config,
                build_processor,
            ),
        ),
        rules=[
            FamilyRule("freeze_mm_modules"),
            FamilyRule("non_reentrant_checkpointing",
                "the reference setup for these MoE models requires non-reentrant recompute, and archtune's "
                "training paths (routed-expert LoRA, DDP, FSDP2) are tested with it only"),
            FamilyRule("no_all_linear_into_towers"),
            FamilyRule("confine_target_names"),
        ],
        # Packed rows: Gated DeltaNet's conv and recurrent state restart at every document.
        patches=["gated_deltanet_packing"],
    )
)
