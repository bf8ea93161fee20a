"""Text-only batches for multimodal wrappers: the inputs their forward takes, supplied as zeros.

Text-only training of a multimodal wrapper (Gemma 3/4, Qwen 3.5 MoE, ...): the Trainer hands
`compute_loss` / `prediction_step` the *wrapped* model (DistributedDataParallel, FSDP, a PEFT
model). Anything that reads the model's config or forward signature must look through those
wrappers first: `DistributedDataParallel` has no `.config`, and its `forward(*inputs, **kwargs)`
hides the real signature. `text_only_extras` does that and supplies the "no multimodal token
here" inputs a wrapper's forward takes (all zeros), so a model that requires them in training
mode (transformers' Molmo2 in 5.24; Gemma 3 in transformers 5.0-5.x) gets them, and one that
does not computes exactly the same logits with them.

No family is named here: what a model takes is read from the model itself.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from archtune.patches import Patch, register_patch

# Forward inputs that mark which tokens are image / video / audio placeholders; 0 = text.
# Supplied as zeros_like(input_ids) for a text-only batch of a multimodal model whose forward
# takes them. (Gemma 3: token_type_ids; Gemma 4, Qwen 3.5, Molmo2: mm_token_type_ids.)
TEXT_ONLY_ZERO_INPUTS: tuple[str, ...] = ("mm_token_type_ids", "token_type_ids")
# Batch keys that carry multimodal data: a batch with any of them is not text-only.
MULTIMODAL_BATCH_KEYS: tuple[str, ...] = (
    "pixel_values", "pixel_values_videos", "input_features", "image_grid_thw", "video_grid_thw",
    "mm_encoder_outputs",
)
# Config attributes of a multimodal wrapper's encoders.
_MM_CONFIG_ATTRS: tuple[str, ...] = ("vision_config", "audio_config")


def unwrap_model(model: Any) -> Any:
    """The model inside DDP / FSDP / DataParallel / DeepSpeed / torch.compile and PEFT wrappers.

    accelerate's `extract_model_from_parallel` (what `Accelerator.unwrap_model` calls) removes the
    distributed containers; a PEFT model's `get_base_model()` then gives the transformers model.
    FSDP2 (`fully_shard`) keeps the module's own class, so it needs no unwrapping.
    """
    from accelerate.utils import extract_model_from_parallel

    for _ in range(8):  # wrappers nest at most a few deep; a bound, not a guess
        inner = extract_model_from_parallel(model)
        get_base = getattr(inner, "get_base_model", None)  # PeftModel (transformers models have none)
        if callable(get_base):
            inner = get_base()
        if inner is model:
            return model
        model = inner
    return model


def is_multimodal_config(config: Any) -> bool:
    """True when a model config declares a vision or audio encoder (a multimodal wrapper)."""
    return any(getattr(config, attr, None) is not None for attr in _MM_CONFIG_ATTRS)


def _forward_parameters(model: Any) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # a builtin or C forward: nothing to read
        return set()


def text_only_extras(model: Any, batch: dict) -> dict[str, torch.Tensor]:
    """Inputs a multimodal wrapper needs for a text-only batch, to merge into the batch.

    `model` may be wrapped (DDP, FSDP, PEFT): its config and forward signature are read through
    `unwrap_model`. Returns {} for a text-only model, a batch that carries multimodal data, a batch
    without input_ids, or inputs the batch already has. Otherwise every name of
    TEXT_ONLY_ZERO_INPUTS the model's forward takes maps to zeros_like(input_ids) (0 = text token).
    """
    input_ids = batch.get("input_ids")
    if not torch.is_tensor(input_ids):
        return {}
    if any(batch.get(key) is not None for key in MULTIMODAL_BATCH_KEYS):
        return {}
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    if config is None or not is_multimodal_config(config):
        return {}
    params = _forward_parameters(base)
    return {name: torch.zeros_like(input_ids) for name in TEXT_ONLY_ZERO_INPUTS
            if name in params and batch.get(name) is None}


TEXT_ONLY_INPUTS = register_patch(Patch(
    name="text_only_inputs",
    doc="A text-only batch of a multimodal wrapper gets the all-zero token-type inputs its forward takes (0 = text).",
    apply=text_only_extras,
    upstream="transformers 5.25.0",
    relies_on={
        "transformers.models.gemma4.modeling_gemma4.Gemma4ForConditionalGeneration.forward": "5df15325fe13",
        "transformers.models.gemma3.modeling_gemma3.Gemma3ForConditionalGeneration.forward": "16f4ebff8b33",
    },
))

__all__ = ["TEXT_ONLY_ZERO_INPUTS", "MULTIMODAL_BATCH_KEYS", "unwrap_model", "is_multimodal_config",
           "text_only_extras"]
