"""Gemma 4: google/gemma-4-26B-A4B (MoE), gemma-4-31B (dense), gemma-4-E2B / E4B.

Every Gemma 4 checkpoint is the multimodal wrapper `Gemma4ForConditionalGeneration`
(config `model_type: "gemma4"`, text config `"gemma4_text"`), even text-only use:

    model.model.language_model   Gemma4TextModel, layers `Gemma4TextDecoderLayer`
    model.model.vision_tower     Gemma4VisionModel (linears wrapped in Gemma4ClippableLinear)
    model.model.embed_vision     Gemma4MultimodalEmbedder (vision -> text hidden size)
    model.model.audio_tower      Gemma4AudioModel (E2B/E4B only)
    model.model.embed_audio      Gemma4MultimodalEmbedder (audio -> text hidden size)

26B-A4B: `enable_moe_block` puts a routed MoE *beside* the dense MLP in every layer
(`layers.N.router`, `layers.N.experts.{gate_up_proj,down_proj}` as 3D tensors), and its
full-attention layers use `attention_k_eq_v` (no `v_proj`). E2B/E4B: per-layer input
embeddings (`hidden_size_per_layer_input`) and cross-layer KV sharing
(`num_kv_shared_layers`: the last layers have no k_proj/v_proj).
"""
from __future__ import annotations

import copy
import re
from typing import Any

from archtune.config.chat_templates import TEXT_MACRO
from archtune.families import Family, FamilyRule, TinyModel, register_family, text_config
from archtune.families.base import GgufArch, special_token_ids

# The seed's language-model-only target: never the towers (whose Gemma4ClippableLinear PEFT
# rejects, and whose adapters give the "loss ~12" trap of `lora_target_linear`).
# `_checkpoint_wrapped_module.` is the segment torch's checkpoint_wrapper inserts.
LORA_TARGET_REGEX = (
    r"model.language_model.layers.[\d]+.(_checkpoint_wrapped_module.)?(mlp|self_attn).(up|down|gate|q|k|v|o)_proj"
)

# lora_target_parameters short names: gate and up projections are one fused tensor per layer.
EXPERT_PARAM_ALIASES = {
    "gate_proj": "experts.gate_up_proj",
    "up_proj": "experts.gate_up_proj",
    "gate_up_proj": "experts.gate_up_proj",
    "down_proj": "experts.down_proj",
}


def _is_moe(model_config: dict[str, Any]) -> bool:
    """26B-A4B: `enable_moe_block` in the text config (the dense models and E2B/E4B have none)."""
    return bool(text_config(model_config).get("enable_moe_block"))


# ---- tiny models: one base block, variants as overrides ------------------------------------
# Layer mix as in the real configs (sliding and full attention; the last layer is full).
_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

TEXT_BASE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    layer_types=_LAYER_TYPES,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    # Full-attention layers get their own head_dim / kv heads (real: 512 / 2 or 4).
    global_head_dim=32,
    num_global_key_value_heads=1,
    sliding_window=32,
    max_position_embeddings=4096,
    final_logit_softcapping=30.0,
    hidden_size_per_layer_input=0,
    num_kv_shared_layers=0,
    attention_k_eq_v=False,
    enable_moe_block=False,
    tie_word_embeddings=True,
)

_VISION: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    patch_size=4,
    position_embedding_size=64,
    pooling_kernel_size=2,
)

_AUDIO: dict[str, Any] = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    # The first channel count stays 128: the projection's input size is (channels[0] // 4) *
    # channels[1], which only matches the conv output for 128 mel bins when channels[0] == 128.
    subsampling_conv_channels=[128, 8],
    output_proj_dims=32,
    use_clipped_linears=True,
)

_VARIANTS: dict[str, dict[str, Any]] = {
    # 26B-A4B: MoE beside the dense MLP, k == v on full-attention layers.
    "gemma4-moe": dict(
        text=dict(
            attention_k_eq_v=True,
            enable_moe_block=True,
            num_experts=8,
            top_k_experts=2,
            moe_intermediate_size=32,
        ),
        vision=True,
        audio=False,
    ),
    # 31B: dense, k == v on full-attention layers.
    "gemma4-dense": dict(text=dict(attention_k_eq_v=True), vision=True, audio=False),
    # E2B: per-layer inputs, the last two layers reuse the KV of the first two, both towers.
    "gemma4-e2b": dict(
        text=dict(
            hidden_size_per_layer_input=16,
            num_kv_shared_layers=2,
            use_double_wide_mlp=True,
        ),
        vision=True,
        audio=True,
    ),
}


def _build(name: str):
    variant = _VARIANTS[name]

    def build_config(tokenizer):
        from transformers import Gemma4Config

        ids = special_token_ids(tokenizer)
        # Deep copies: configs keep (and may edit) the lists and dicts they are given.
        text = copy.deepcopy({**TEXT_BASE, **variant["text"]})
        text.update(
            vocab_size=ids.vocab_size,
            vocab_size_per_layer_input=ids.vocab_size,
            pad_token_id=ids.pad,
            bos_token_id=ids.bos,
            eos_token_id=ids.eos,
        )
        return Gemma4Config(
            text_config=text,
            vision_config=copy.deepcopy(_VISION) if variant["vision"] else None,
            audio_config=copy.deepcopy(_AUDIO) if variant["audio"] else None,
            **media_token_ids(ids),
            tie_word_embeddings=True,
        )

    return build_config


def media_token_ids(ids) -> dict[str, int]:
    """The media placeholder and boundary token ids of a Gemma 4 config, from the tiny tokenizer."""
    return dict(image_token_id=ids["<image_soft_token>"], video_token_id=ids["<video_soft_token>"],
                audio_token_id=ids["<audio_soft_token>"], boi_token_id=ids["<start_of_image>"],
                eoi_token_id=ids["<end_of_image>"], boa_token_id=ids["<start_of_audio>"],
                eoa_token_index=ids["<end_of_audio>"])


def _build_processor(config):
    """Gemma4Processor (images and audio, no video) at the tiny size: an image part renders as
    the image soft token, which expands to boi, one token per pooled patch group, eoi (a 32x32
    image is resized to at most 70 * 2 * 2 patches of 4x4 pixels: 64x64 pixels, 64 tokens); an
    audio part renders as the audio soft token, which expands to boa, one token per 40 ms of
    16 kHz audio (the feature extractor's 128 mel bins every 10 ms, subsampled 4x), eoa."""
    from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil, Gemma4Processor

    from archtune.families.media import media_chat_template, media_tokenizer, without_video_processor

    vision = config.vision_config
    tokenizer = media_tokenizer({
        "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
        "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"})
    image_processor = Gemma4ImageProcessorPil(patch_size=vision.patch_size,
                                              pooling_kernel_size=vision.pooling_kernel_size, max_soft_tokens=70)
    return without_video_processor(Gemma4Processor)(
        feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=image_processor, tokenizer=tokenizer,
        video_processor=None,
        chat_template=media_chat_template({"image": "<image_soft_token>", "audio": "<audio_soft_token>"}))


# ---------------------------------------------------------------- GGUF (llama.cpp's gemma4)

def _attention_shapes(text: dict) -> list[tuple[int, int]]:
    """(head_dim, kv heads) per layer, as the model is built: `per_layer_config` overrides them on
    the full-attention layers (their global head_dim, and kv heads where k == v)."""
    overrides = text.get("per_layer_config") or {}
    shapes = []
    for i in range(int(text["num_hidden_layers"])):
        layer = overrides.get(str(i)) or overrides.get(i) or {}
        shapes.append((int(layer.get("head_dim") or text["head_dim"]),
                       int(layer.get("num_key_value_heads") or text["num_key_value_heads"])))
    return shapes


def _full_head_dim(text: dict) -> int:
    types = text["layer_types"]
    return next(d for (d, _), t in zip(_attention_shapes(text), types) if t == "full_attention")


def _gguf_tensors(name: str, tensor, text: dict):
    """Gemma 4's tensors as llama.cpp's gemma4 reads them. Gemma4RMSNorm scales by the stored
    weight (no 1 added, unlike Gemma 3), so norms are written as they are; the router's input
    scale is `ffn_gate_inp.scale`, its per-expert scale `ffn_down_exps.scale` (llama.cpp multiplies
    each expert's output by it, as the router multiplies that expert's weight); the fused experts
    [E, 2I, H] (gate rows, then up rows) are llama.cpp's ffn_gate_up_exps as they are."""
    layer = re.match(r"model\.layers\.(\d+)\.", name)
    if layer and name.endswith(".router.scale"):
        return [(f"blk.{layer.group(1)}.ffn_gate_inp.scale", tensor)]
    if layer and name.endswith(".router.per_expert_scale"):
        return [(f"blk.{layer.group(1)}.ffn_down_exps.scale", tensor)]
    if name.endswith((".layer_scalar", ".experts.gate_up_proj", ".experts.down_proj")):
        return [(f"{name}.weight", tensor)]
    return [(name, tensor)]


def _gguf_extra_tensors(text: dict):
    """The full-attention layers' RoPE frequency factors. Proportional RoPE rotates the first
    `partial_rotary_factor` of each head's frequency pairs (with head_dim's exponents) and leaves
    the rest unrotated; llama.cpp rotates every pair and divides each frequency by its factor:
    `factor` for the rotated pairs, 1e30 (no rotation) for the others."""
    import torch

    full = (text.get("rope_parameters") or {}).get("full_attention") or {}
    head = _full_head_dim(text)
    pairs = head // 2
    proportional = full.get("rope_type") == "proportional"
    rotated = int(float(full.get("partial_rotary_factor", 1.0)) * head // 2) if proportional else pairs
    factor = float(full.get("factor", 1.0))
    return [("rope_freqs.weight", torch.tensor([factor] * rotated + [1e30] * (pairs - rotated), dtype=torch.float32))]


def _gguf_metadata(writer, text: dict) -> None:
    """Two head sizes (sliding layers: head_dim; full layers: their own), kv heads and MLP widths
    per layer, the KV-sharing tail, per-layer input width, the experts, the final softcap."""
    shapes = _attention_shapes(text)
    full, swa = _full_head_dim(text), int(text["head_dim"])
    writer.add_key_length(full)
    writer.add_value_length(full)
    writer.add_key_length_swa(swa)
    writer.add_value_length_swa(swa)
    writer.add_head_count_kv([kv for _, kv in shapes])
    # Full layers rotate every pair (the frequency factors leave the unrotated ones still).
    writer.add_rope_dimension_count(full)
    sliding = (text.get("rope_parameters") or {}).get("sliding_attention") or {}
    writer.add_rope_dimension_count_swa(int(swa * float(sliding.get("partial_rotary_factor", 1.0))))
    layers = int(text["num_hidden_layers"])
    shared = int(text.get("num_kv_shared_layers") or 0)
    writer.add_shared_kv_layers(shared)
    writer.add_embedding_length_per_layer_input(int(text.get("hidden_size_per_layer_input") or 0))
    if text.get("use_double_wide_mlp") and shared:
        width = int(text["intermediate_size"])
        writer.add_feed_forward_length([width * 2 if i >= layers - shared else width for i in range(layers)])
    if text.get("enable_moe_block"):
        writer.add_expert_count(int(text["num_experts"]))
        writer.add_expert_used_count(int(text["top_k_experts"]))
        writer.add_expert_feed_forward_length(int(text["moe_intermediate_size"]))
    if text.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(text["final_logit_softcapping"]))


# llama.cpp's converter writes Gemma 4's tokenizer as its "gemma4" model (BPE merges over `▁`-pieces, text
# split into runs of newlines and runs of the rest), and shows the channel and tool-call markers.
GGUF = GgufArch("gemma4", tensors=_gguf_tensors, metadata=_gguf_metadata, extra_tensors=_gguf_extra_tensors,
                rope_types=("proportional",), sentencepiece_model="gemma4",
                visible_tokens=("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                                "<tool_response|>", '<|"|>'))


_DESCRIPTIONS = {
    "gemma4-moe": "Gemma 4 26B-A4B shape: 4 layers, MoE (8 experts, top-2) beside the dense MLP, "
    "sliding/full attention with k==v on full layers, vision tower",
    "gemma4-dense": "Gemma 4 31B shape: 4 dense layers, sliding/full attention with k==v on full layers, vision tower",
    "gemma4-e2b": "Gemma 4 E2B shape: per-layer input embeddings, last 2 of 4 layers share KV, "
    "vision and audio towers",
}

# Gemma 4: `<|turn>ROLE ... <turn|>` turns, a system turn of its own, the assistant's role is `model`.
CHAT_TEMPLATE = TEXT_MACRO + (
    "{{ bos_token }}{%- for m in messages -%}"
    "{{ '<|turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + text(m['content']) | trim "
    "+ '<turn|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}{%- endif -%}")

FAMILY = register_family(
    Family(
        chat_templates={"gemma4": CHAT_TEMPLATE},
        name="gemma4",
        model_types=("gemma4", "gemma4_text"),
        description="Gemma 4 (26B-A4B MoE, 31B dense, E2B/E4B): multimodal wrapper over a text backbone",
        models={"google/gemma-4-26B-A4B": "MoE", "google/gemma-4-31B": "dense",
                "google/gemma-4-E2B": "dense, per-layer inputs", "google/gemma-4-E4B": "dense, per-layer inputs"},
        architecture_notes=(
            "Every Gemma 4 checkpoint has `model_type: gemma4` and loads as the multimodal wrapper with a vision "
            "tower, text-only variants included",
            "26B-A4B: `enable_moe_block: true`, 256 experts with top-k routing; there is no separate "
            "`SparseMoeBlock`: the MoE sits beside the dense MLP inside each decoder layer",
            "E2B/E4B: `hidden_size_per_layer_input: 256` (per-layer input embeddings), `attention_k_eq_v: False`, "
            "and cross-layer KV sharing (`num_kv_shared_layers`)",
        ),
        notes=(
            "FSDP2 wraps `Gemma4TextDecoderLayer`; `Gemma4DecoderLayer` does not exist in transformers",
            "FSDP2 + activation_offloading gives the lowest VRAM: ~26 GiB per GPU for 26B-A4B (the reference "
            "trainer's measurement)",
        ),
        known_issues=(
            ("E2B/E4B loss starts near 12 instead of ~0.5",
             "cross-layer KV sharing computed wrongly with use_cache=False or under checkpointing (transformers "
             "5.5.0-5.5.1, fixed in 5.5.2); reentrant or offloaded checkpointing can hand a layer detached K/V",
             "`archtune check --probe` compares the training settings with inference on one batch before training"),
        ),
        auto_class="AutoModelForImageTextToText",
        language_model_prefix="model.language_model",
        decoder_layer_cls="Gemma4TextDecoderLayer",
        mm_module_prefixes=("model.vision_tower", "model.embed_vision", "model.audio_tower", "model.embed_audio"),
        mm_projector_prefixes=("model.embed_vision", "model.embed_audio"),
        # Audio on the models with an audio tower (E2B/E4B); audio rows for the others are refused.
        modalities=("image", "audio"),
        lora_target_regex=LORA_TARGET_REGEX,
        expert_param_names=("experts.gate_up_proj", "experts.down_proj"),
        expert_param_aliases=EXPERT_PARAM_ALIASES,
        is_moe=_is_moe,
        moe_shape_keys={"num_experts": "num_experts", "top_k": "top_k_experts", "hidden": "hidden_size",
                        "intermediate": "moe_intermediate_size"},
        lora_target_redirects={"Gemma4ClippableLinear": "linear"},
        packing_drop_attention_mask=True,
        sequence_classification_base="transformers.models.gemma4.modeling_gemma4.Gemma4PreTrainedModel",
        gguf={t: GGUF for t in ("gemma4", "gemma4_text")},
        serving_notes=(
            "vLLM's Gemma 4 class implements no get_expert_mapping and declares no is_3d_moe_weight until "
            "vllm-project/vllm#43254 (open when this was written): loading an expert-LoRA adapter fails with \"To "
            "support LoRA for MoE model, 'get_expert_mapping' must be implemented\", and a Gemma 4 LoRA was "
            "reported ignored (vllm-project/vllm#41754); serve the merged model (--format merged) with vLLM",
        ),
        tiny_models=tuple(TinyModel(name, _DESCRIPTIONS[name], _build(name), _build_processor) for name in _VARIANTS),
        rules=[
            FamilyRule("freeze_mm_modules"),
            FamilyRule("non_reentrant_checkpointing",
                "the reference setup for Gemma 4 requires non-reentrant recompute: with reentrant recompute its "
                "shared per-layer norms are \"marked ready twice\" under DDP"),
            FamilyRule("ddp_find_unused_parameters",
                "text-only batches never reach the towers' and embedders' parameters, and DDP fails on step 2 "
                "(\"Expected to have finished reduction in the prior iteration\") when any of them is trainable"),
            FamilyRule("no_all_linear_into_towers"),
            FamilyRule("confine_target_names"),
            FamilyRule("fsdp1_refuses_quantized_base",
                "runs out of memory while dequantizing and sharding Gemma 4's weights (the reference's FSDP1 + "
                "QLoRA failure)"),
        ],
    )
)
