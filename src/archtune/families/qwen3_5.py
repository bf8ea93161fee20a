"""Qwen 3.5 dense: Qwen/Qwen3.5-9B, Qwen/Qwen3.5-27B.

The MoE family's model (qwen3_5_moe.py) with a dense MLP in every layer: `Qwen3_5ForConditionalGeneration`
(config `model_type: "qwen3_5"`, text config `"qwen3_5_text"`):

    model.model.language_model   Qwen3_5TextModel, layers `Qwen3_5DecoderLayer`
    model.model.visual           Qwen3_5VisionModel (patch embed, blocks, merger)

Layers mix `linear_attention` (Gated DeltaNet, the same class as the MoE model's) and
`full_attention`; each layer's MLP is `mlp.{gate,up,down}_proj`. Axolotl's published configs for
these checkpoints name `model.language_model.*` (unfrozen_parameters, LoRA regexes): the model
loads as the image-text class, as the checkpoints are.
"""
from __future__ import annotations

import copy
import dataclasses

from archtune.families import FamilyRule, TinyModel, register_family
from archtune.families import qwen3_5_moe as moe
from archtune.families.base import special_token_ids

# As the MoE family's, with the dense MLP in place of the shared expert.
LORA_TARGET_REGEX = (
    r"model\.(language_model\.)?layers\.\d+\.(_checkpoint_wrapped_module\.)?"
    r"(self_attn\.(q|k|v|o)_proj"
    r"|linear_attn\.(in_proj_qkv|in_proj_z|out_proj)"
    r"|mlp\.(gate|up|down)_proj)"
)
_MOE_ONLY = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")


def _build_config(tokenizer):
    from transformers import Qwen3_5Config

    ids = special_token_ids(tokenizer)
    text = {k: v for k, v in copy.deepcopy(moe.TEXT).items() if k not in _MOE_ONLY}
    text.update(intermediate_size=128, vocab_size=ids.vocab_size, pad_token_id=ids.pad, bos_token_id=ids.bos,
                eos_token_id=ids.eos)
    return Qwen3_5Config(
        text_config=text,
        vision_config=dict(copy.deepcopy(moe.VISION), out_hidden_size=moe.TEXT["hidden_size"]),
        image_token_id=ids["<image_soft_token>"],
        video_token_id=ids["<video_soft_token>"],
        vision_start_token_id=ids["<vision_start>"],
        vision_end_token_id=ids["<vision_end>"],
        tie_word_embeddings=False,
    )


FAMILY = register_family(dataclasses.replace(
    moe.FAMILY,
    name="qwen3_5",
    model_types=("qwen3_5", "qwen3_5_text"),
    gguf={t: moe.gguf_arch("qwen35") for t in ("qwen3_5", "qwen3_5_text")},
    models={"Qwen/Qwen3.5-9B": "dense, 9B parameters", "Qwen/Qwen3.5-27B": "dense, 27B parameters"},
    architecture_notes=(
        "Hybrid: Gated DeltaNet linear attention in three of every four layers, full attention in the fourth",
        "Dense MLP in every layer (no experts); vision tower as in Qwen 3.5 MoE",
    ),
    weight_scale_rules=(),
    description="Qwen 3.5 dense (9B, 27B): hybrid Gated DeltaNet / full attention, dense MLP, vision tower",
    decoder_layer_cls="Qwen3_5DecoderLayer",
    lora_target_regex=LORA_TARGET_REGEX,
    expert_param_names=(),
    expert_param_aliases={},
    is_moe=None,
    moe_shape_keys={},
    sequence_classification_base="",  # transformers has Qwen3_5ForSequenceClassification
    tiny_models=(
        TinyModel("qwen3_5", "Qwen 3.5 dense shape: 3 linear-attention (DeltaNet) + 1 full-attention layer, "
                  "dense MLP, vision tower (1 block)", _build_config, moe.build_processor),
    ),
    rules=[
        FamilyRule("freeze_mm_modules"),
        FamilyRule("non_reentrant_checkpointing",
                   "the same model as Qwen 3.5 MoE without experts; archtune's training paths for it are tested "
                   "with non-reentrant recompute only"),
        FamilyRule("no_all_linear_into_towers"),
        FamilyRule("confine_target_names"),
    ],
    # Packed rows: the Gated DeltaNet layers are the MoE model's class, so the same patch applies.
    patches=list(moe.FAMILY.patches),
))
