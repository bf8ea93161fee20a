"""Adapters: freezing and LoRA, driven by the Plan."""
from archtune.adapters.freeze import canonical_name, check_towers_frozen, freeze_enabled, freeze_multimodal
from archtune.adapters.lora import apply_lora, count_params, resolve_lora_parameters, resolve_lora_targets

__all__ = [
    "canonical_name",
    "check_towers_frozen",
    "freeze_enabled",
    "freeze_multimodal",
    "apply_lora",
    "count_params",
    "resolve_lora_parameters",
    "resolve_lora_targets",
]
