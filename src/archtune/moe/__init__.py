"""Mixture-of-experts support: the `scattermoe` experts implementation (expert LoRA fused in),
its Triton kernels (`scattermoe_triton`, with the optional triton extra) and routing statistics.

Importing this package registers `scattermoe` and `scattermoe_triton` in transformers' experts
registry (`transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`), next to `eager`, `grouped_mm`
and `batched_mm`; after that `model.set_experts_implementation("scattermoe")` works.
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
from archtune.moe.triton_experts import triton_experts_forward
from archtune.plan.experts import SCATTERMOE, SCATTERMOE_TRITON

EXPERTS_IMPLEMENTATION = SCATTERMOE  # its entry in the plan's registry (plan/experts.py) names this forward
# archtune's implementations, each by its entry in the plan's registry (plan/experts.py)
FORWARDS = {SCATTERMOE: scattermoe_experts_forward, SCATTERMOE_TRITON: triton_experts_forward}


def register() -> None:
    """Add `scattermoe` and `scattermoe_triton` to transformers' experts registry (idempotent).

    Refuses to replace a different function already registered under either name. Registering
    `scattermoe_triton` imports no triton (its kernels load when it first runs).
    """
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    for name, forward in FORWARDS.items():
        current = ALL_EXPERTS_FUNCTIONS._global_mapping.get(name)
        if current is forward:
            continue
        if current is not None:
            raise KeyError(
                f"transformers' experts registry already has a {name!r} implementation "
                f"({getattr(current, '__module__', '?')}.{getattr(current, '__qualname__', '?')}); "
                "archtune registers its own in src/archtune/moe/__init__.py"
            )
        ALL_EXPERTS_FUNCTIONS.register(name, forward)


register()

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "FORWARDS",
    "ExpertWeight",
    "expert_weight",
    "has_expert_lora",
    "lora_factors",
    "register",
    "scattermoe_experts_forward",
    "skip_parametrization_check",
    "sort_by_expert",
    "triton_experts_forward",
]
