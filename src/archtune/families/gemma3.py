"""Gemma 3: google/gemma-3-{4b,12b,27b} (multimodal) and the text backbone they wrap.

`Gemma3ForConditionalGeneration` (config `model_type: "gemma3"`, text config `"gemma3_text"`):

    model.model.language_model          Gemma3TextModel, layers `Gemma3DecoderLayer`
    model.model.vision_tower            SiglipVisionModel
    model.model.multi_modal_projector   Gemma3MultiModalProjector (pool + RMSNorm + projection)
"""
from __future__ import annotations

import copy
from typing import Any

from archtune.config.chat_templates import TEXT_MACRO
from archtune.families import Family, FamilyRule, TinyModel, register_family
from archtune.families.base import GgufArch, special_token_ids
from archtune.families.media import media_chat_template, media_tokenizer

# Language-model linears only: Gemma 4's seed regex (same module names) with dots escaped.
# The optional `language_model.` also covers text-only checkpoints (gemma-3-1b, model_type
# gemma3_text: Gemma3ForCausalLM, layers at `model.layers`). The Siglip tower's own
# self_attn/mlp sit under model.vision_tower and never match.
LORA_TARGET_REGEX = (
    r"model\.(language_model\.)?layers\.\d+\.(_checkpoint_wrapped_module\.)?"
    r"(mlp|self_attn)\.(up|down|gate|q|k|v|o)_proj"
)



def _gguf_tensors(name: str, tensor, text: dict):
    """Gemma3RMSNorm scales by (1 + weight); llama.cpp's RMS norm scales by the stored weight,
    so every norm (layer norms, q/k norms, the final norm) is written with the 1 added."""
    if name.endswith("norm.weight"):
        return [(name, tensor.float() + 1.0)]
    return [(name, tensor)]


def _gguf_metadata(writer, text: dict) -> None:
    if text.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(text["final_logit_softcapping"])


_TEXT: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    # Real: 5 sliding : 1 full.
    layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=32,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)

_VISION: dict[str, Any] = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=32,
    patch_size=4,
    vision_use_head=False,  # as in the real checkpoints
)


def _build_config(tokenizer):
    from transformers import Gemma3Config

    ids = special_token_ids(tokenizer)
    # Deep copies: configs keep (and may edit) the lists and dicts they are given.
    text = dict(copy.deepcopy(_TEXT), vocab_size=ids.vocab_size,
                pad_token_id=ids.pad, bos_token_id=ids.bos, eos_token_id=ids.eos)
    return Gemma3Config(
        text_config=text,
        vision_config=copy.deepcopy(_VISION),
        # 32x32 image, 4x4 patches -> 8x8 grid, pooled to 4x4 soft tokens.
        mm_tokens_per_image=16,
        image_token_index=ids["<image_soft_token>"],
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        tie_word_embeddings=True,
    )


def _build_processor(config):
    """Gemma3Processor at the tiny image size: `<start_of_image>` in the text (what Gemma 3's chat
    template renders for an image) expands to boi, mm_tokens_per_image soft tokens, eoi."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    size = config.vision_config.image_size
    tokenizer = media_tokenizer({"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                 "eoi_token": "<end_of_image>"})
    return Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=tokenizer,
        image_seq_length=config.mm_tokens_per_image,
        chat_template=media_chat_template({"image": "<start_of_image>"}),
    )


# Gemma 1-3: the system prompt opens the first user turn; the assistant's role is `model`.
CHAT_TEMPLATE = TEXT_MACRO + (
    "{{ bos_token }}{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first = text(messages[0]['content']) + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set first = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' "
    "+ (first if loop.first else '') + text(m['content']) | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")

FAMILY = register_family(
    Family(
        chat_templates={"gemma": CHAT_TEMPLATE, "gemma3": CHAT_TEMPLATE, "gemma3n": CHAT_TEMPLATE},
        name="gemma3",
        model_types=("gemma3", "gemma3_text"),
        description="Gemma 3 (4B/12B/27B): multimodal wrapper over a text backbone, Siglip vision tower",
        models={"google/gemma-3-1b-it": "text only, `gemma3_text`", "google/gemma-3-4b-it": "multimodal",
                "google/gemma-3-12b-it": "multimodal", "google/gemma-3-27b-it": "multimodal"},
        auto_class="AutoModelForImageTextToText",
        language_model_prefix="model.language_model",
        decoder_layer_cls="Gemma3DecoderLayer",
        mm_module_prefixes=("model.vision_tower", "model.multi_modal_projector"),
        mm_projector_prefixes=("model.multi_modal_projector",),
        modalities=("image",),
        lora_target_regex=LORA_TARGET_REGEX,
        packing_drop_attention_mask=True,
        # llama.cpp's own gemma3 (rotate-half RoPE, sqrt(hidden) embedding scale, 1/sqrt(head_dim)
        # attention scale as HF's query_pre_attn_scalar = head_dim); the sliding layers are written
        # per layer from layer_types.
        gguf={t: GgufArch("gemma3", tensors=_gguf_tensors, metadata=_gguf_metadata) for t in ("gemma3", "gemma3_text")},
        tiny_models=(
            TinyModel(
                "gemma3",
                "Gemma 3 shape: 4 layers (3 sliding : 1 full), Siglip vision tower (1 layer) and projector",
                _build_config,
                _build_processor,
            ),
        ),
        rules=[
            FamilyRule("freeze_mm_modules"),
            FamilyRule("non_reentrant_checkpointing",
                "reentrant recompute conflicts with the DDP unused-parameter search Gemma 3 needs (\"marked a "
                "variable ready twice\"), and gives no gradient to a layer whose inputs do not require grad"),
            FamilyRule("ddp_find_unused_parameters",
                "text-only batches never reach the vision tower's and projector's parameters, and DDP fails on "
                "step 2 (\"Expected to have finished reduction in the prior iteration\") when any of them is trainable"),
            FamilyRule("no_all_linear_into_towers"),
            FamilyRule("confine_target_names"),
        ],
    )
)
