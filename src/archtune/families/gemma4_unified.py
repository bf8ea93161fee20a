"""Gemma 4 Unified: google/gemma-4-12B, the encoder-free multimodal Gemma 4.

`Gemma4UnifiedForConditionalGeneration` (config `model_type: "gemma4_unified"`, text config
`"gemma4_unified_text"`) has no vision tower and no audio tower:

    model.model.language_model   Gemma4UnifiedTextModel, layers `Gemma4UnifiedTextDecoderLayer`
    model.model.embed_vision     Gemma4UnifiedVisionEmbedder: raw pixel patches -> LayerNorm ->
                                 Linear -> LayerNorm -> + 2D position table -> the multimodal
                                 embedder (RMSNorm -> Linear to the text hidden size)
    model.model.embed_audio      Gemma4UnifiedMultimodalEmbedder: raw 16 kHz waveform frames
                                 (RMSNorm -> Linear)

What differs from Gemma 4 (gemma4.py) for training: its own model type and classes (the decoder
layer FSDP2 wraps is `Gemma4UnifiedTextDecoderLayer`), the two embedders as the only multimodal
modules (no Gemma4ClippableLinear to redirect LoRA around), no experts, no per-layer input
embeddings; vision tokens attend bidirectionally within an image (`use_bidirectional_attention:
"vision"`, from `mm_token_type_ids`), text stays causal. The text decoder is Gemma 4's (mixed
sliding / full attention with `global_head_dim`, k == v on full layers, optional cross-layer KV
sharing), so the LoRA target regex and the turn format are Gemma 4's.
"""
from __future__ import annotations

import copy
from typing import Any

from archtune.families import Family, FamilyRule, TinyModel, register_family
from archtune.families.base import special_token_ids
from archtune.families import gemma4

# Gemma 4's tiny text block without what the unified decoder lacks (per-layer inputs, experts).
_TEXT: dict[str, Any] = {**{k: v for k, v in gemma4.TEXT_BASE.items()
                            if k not in ("hidden_size_per_layer_input", "enable_moe_block")},
                         "attention_k_eq_v": True, "use_bidirectional_attention": "vision"}
# 4x4 patches pooled 2x2: 8x8-pixel model patches of 192 raw values each.
_VISION: dict[str, Any] = dict(patch_size=4, pooling_kernel_size=2, mm_embed_dim=32, mm_posemb_size=64,
                               output_proj_dims=32)
# The checkpoints' frame: 640 samples of 16 kHz audio (40 ms) per audio token.
_AUDIO: dict[str, Any] = dict(audio_embed_dim=640)


def _build_config(tokenizer):
    from transformers import Gemma4UnifiedConfig

    ids = special_token_ids(tokenizer)
    text = copy.deepcopy(_TEXT)
    text.update(vocab_size=ids.vocab_size, pad_token_id=ids.pad, bos_token_id=ids.bos, eos_token_id=ids.eos)
    return Gemma4UnifiedConfig(
        text_config=text,
        vision_config=copy.deepcopy(_VISION),
        audio_config=copy.deepcopy(_AUDIO),
        **gemma4.media_token_ids(ids),
        tie_word_embeddings=True,
    )


def _build_processor(config):
    """Gemma4UnifiedProcessor for audio, without its image and video parts: transformers 5.25's
    Gemma4UnifiedImageProcessor and Gemma4UnifiedVideoProcessor have only torchvision backends,
    while its audio feature extractor (numpy) cuts 16 kHz audio into frames of `audio_embed_dim`
    samples, one audio token each (no tower, no downsampling). An audio part renders as the audio
    soft token, which expands to boa, one token per frame, eoa."""
    from transformers import Gemma4UnifiedAudioFeatureExtractor, Gemma4UnifiedProcessor

    from archtune.families.media import media_chat_template, media_tokenizer, without_parts

    frame = config.audio_config.audio_embed_dim
    tokenizer = media_tokenizer({
        "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
        "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"})
    return without_parts(Gemma4UnifiedProcessor, TORCHVISION_PARTS)(
        feature_extractor=Gemma4UnifiedAudioFeatureExtractor(feature_size=frame, audio_samples_per_token=frame),
        image_processor=None, tokenizer=tokenizer, video_processor=None,
        chat_template=media_chat_template({"image": "<image_soft_token>", "audio": "<audio_soft_token>"}))


# The processor parts with only a torchvision backend in transformers 5.25.
TORCHVISION_PARTS = ("image_processor", "video_processor")

# A message's content: a string, or its parts in order, media parts as the processor's placeholders
# (`audio_token` and the like; the checkpoints' `<|audio|>`, ... where the template is rendered
# without a processor), as Axolotl's gemma4_unified template renders them.
_CONTENT_MACRO = (
    "{%- macro content(c) -%}{%- if c is string -%}{{ c | trim }}{%- else -%}{%- for p in c -%}"
    "{%- if p['type'] == 'text' -%}{{ p['text'] | trim }}"
    "{%- elif p['type'] == 'image' -%}{{ image_token | default('<|image|>') }}"
    "{%- elif p['type'] == 'audio' -%}{{ audio_token | default('<|audio|>') }}"
    "{%- elif p['type'] == 'video' -%}{{ video_token | default('<|video|>') }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}")

# Axolotl's `gemma4_unified`: Gemma 4's `<|turn>ROLE ... <turn|>` turns, where an assistant message
# that follows an assistant message continues the same model turn (no second `<|turn>model`).
CHAT_TEMPLATE = _CONTENT_MACRO + (
    "{{ bos_token }}{%- for m in messages -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{%- if not (role == 'model' and loop.previtem is defined and loop.previtem['role'] == 'assistant') -%}"
    "{{ '<|turn>' + role + '\\n' }}{%- endif -%}"
    "{{ content(m['content']) | trim + '<turn|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}{%- endif -%}")

FAMILY = register_family(
    Family(
        chat_templates={"gemma4_unified": CHAT_TEMPLATE},
        name="gemma4_unified",
        model_types=("gemma4_unified", "gemma4_unified_text"),
        description="Gemma 4 Unified (12B): encoder-free multimodal Gemma 4, image patches and audio frames "
                    "embedded straight into the text decoder",
        models={"google/gemma-4-12B": "dense, encoder-free image and audio input"},
        architecture_notes=(
            "No vision or audio tower: `model.embed_vision` turns raw pixel patches into text-size embeddings "
            "(LayerNorm, Linear, a 2D position table, RMSNorm, Linear) and `model.embed_audio` raw waveform "
            "frames (RMSNorm, Linear)",
            "The text decoder is Gemma 4's (`Gemma4UnifiedTextDecoderLayer`: sliding and full attention, "
            "`global_head_dim`, k == v on full layers, optional cross-layer KV sharing); image tokens attend "
            "to each other bidirectionally (`use_bidirectional_attention: vision`)",
        ),
        notes=(
            "FSDP2 wraps `Gemma4UnifiedTextDecoderLayer`",
            "Audio rows train without torchvision: the processor is built from its audio feature extractor, "
            "tokenizer and chat template; audio tokens and their boa/eoa markers never carry labels",
            "Images need transformers' Gemma4UnifiedImageProcessor, which has only a torchvision backend "
            "in transformers 5.25: without torchvision, image rows are refused with the install line",
            "GGUF: the text decoder is written as llama.cpp's `gemma4` architecture (the dense Gemma 4 one); the "
            "embedders belong in llama.cpp's separate mmproj file, which archtune does not write",
        ),
        auto_class="AutoModelForImageTextToText",
        language_model_prefix="model.language_model",
        decoder_layer_cls="Gemma4UnifiedTextDecoderLayer",
        mm_module_prefixes=("model.embed_vision", "model.embed_audio"),
        mm_projector_prefixes=("model.embed_vision", "model.embed_audio"),
        modalities=("image", "audio"),
        torchvision_processor_parts=TORCHVISION_PARTS,
        lora_target_regex=gemma4.LORA_TARGET_REGEX,
        packing_drop_attention_mask=True,
        # The text decoder is Gemma 4's dense one (same attention, MLP, norms, layer scalar, RoPE): llama.cpp's
        # gemma4 architecture runs it; the embedders are not written (they go in an mmproj file).
        gguf={t: gemma4.GGUF for t in ("gemma4_unified", "gemma4_unified_text")},
        sequence_classification_base=(
            "transformers.models.gemma4_unified.modeling_gemma4_unified.Gemma4UnifiedPreTrainedModel"),
        tiny_models=(TinyModel("gemma4-unified", "Gemma 4 Unified shape: 4 dense layers, sliding/full attention "
                               "with k==v on full layers, vision and audio embedders (no towers)", _build_config,
                               _build_processor),),
        rules=[
            FamilyRule("freeze_mm_modules"),
            FamilyRule("non_reentrant_checkpointing",
                "Gemma 4's decoder: layers that share another layer's K/V (num_kv_shared_layers) get detached "
                "K/V under reentrant recompute, the E2B/E4B high-loss failure"),
            FamilyRule("ddp_find_unused_parameters",
                "text-only batches never reach the embedders' parameters, and DDP fails on step 2 (\"Expected "
                "to have finished reduction in the prior iteration\") when any of them is trainable"),
            FamilyRule("no_all_linear_into_towers"),
            FamilyRule("confine_target_names"),
        ],
    )
)
