"""Mixture-of-experts support: the `scattermoe` experts implementation (expert LoRA fused in)
and routing statistics.

Importing this package registers `scattermoe` in transformers' experts registry
(`transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`), next to `eager`, `grouped_mm` and
`batched_mm`; after that `model.set_experts_implementation("scattermoe")` works.
"""
from __future__ import annotations

from archtune.patches.expert_lora import (
    ExpertWeight,
    expert_weight,
    has_expert_lora,
    lora_factors,
    skip_parametrization_check,
)
from archtune.moe.scattermoe import scattermoe_experts_forward, sort_by_expert
from archtune.plan.experts import SCATTERMOE

EXPERTS_IMPLEMENTATION = SCATTERMOE  # its entry in the plan's registry (plan/experts.py) names this forward


def register() -> None:
    """Add `scattermoe` to transformers' experts registry (idempotent).

    Refuses to replace a different function already registered under that name.
    """
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    current = ALL_EXPERTS_FUNCTIONS._global_mapping.get(EXPERTS_IMPLEMENTATION)
    if current is scattermoe_experts_forward:
        return
    if current is not None:
        raise KeyError(
            f"transformers' experts registry already has a {EXPERTS_IMPLEMENTATION!r} implementation "
            f"({getattr(current, '__module__', '?')}.{getattr(current, '__qualname__', '?')}); "
            "archtune registers its own in src/archtune/moe/__init__.py"
        )
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, scattermoe_experts_forward)


register()

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "ExpertWeight",
    "expert_weight",
    "has_expert_lora",
    "lora_factors",
    "register",
    "scattermoe_experts_forward",
    "skip_parametrization_check",
    "sort_by_expert",
]
