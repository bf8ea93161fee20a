"""The kernels plugin (`plugins: [archtune.plugins.KernelsPlugin]`, or `use_kernels: true`):
archtune's ScatterMoE experts with the expert LoRA fused (see archtune.plugins for the protocol)."""
from __future__ import annotations

import logging
from typing import Any

from archtune.plugins import BasePlugin

logger = logging.getLogger("archtune.plugins")


def _setting(cfg_or_plan, key: str, default: Any = None) -> Any:
    """A setting from a Plan (its decision) or a Config-like object."""
    getter = getattr(cfg_or_plan, "get", None)
    if getter is not None and hasattr(cfg_or_plan, "settings"):
        return getter(key, default)
    return getattr(cfg_or_plan, key, default)


class KernelsPlugin(BasePlugin):
    """`use_kernels` + `use_scattermoe` -> `experts_implementation: scattermoe`.

    pre_model_load: registers `scattermoe` in transformers' experts registry; the Plan's
    `experts_implementation` decision comes from plan.resolve (filled in here only if missing).
    post_model_load: `model.set_experts_implementation("scattermoe")`.
    post_adapters: with PEFT expert LoRA, skips PEFT's per-forward parametrization check
    (archtune.patches.expert_lora); the LoRA product is fused into scattermoe either way.
    """

    name = "kernels"

    @staticmethod
    def wants_scattermoe(cfg) -> bool:
        return bool(getattr(cfg, "use_kernels", False)) and bool(getattr(cfg, "use_scattermoe", False))

    def pre_model_load(self, cfg, plan) -> None:
        import archtune.moe  # noqa: F401  (registers "scattermoe" in transformers' registry)

        if plan is None or not self.wants_scattermoe(getattr(plan, "config", cfg)):
            return
        key = "experts_implementation"
        # plan.resolve's `experts_implementation` rule normally decided already (or refused a
        # conflicting user value): only fill the decision in when it is missing.
        if plan.model.experts_implementation is None and not any(p.key == key for p in plan.errors):
            plan.set(key, "scattermoe", "auto",
                     "use_kernels + use_scattermoe: archtune's ScatterMoE experts (expert LoRA fused)")

    def _active(self, plan) -> bool:
        if plan is None:
            return False
        decided = _setting(plan, "experts_implementation")
        if decided is not None:  # the Plan's decision (use_scattermoe may have chosen a stock one)
            from archtune.moe import FORWARDS

            return decided in FORWARDS
        return self.wants_scattermoe(getattr(plan, "config", plan))

    def post_model_load(self, model, plan) -> None:
        if not self._active(plan):
            return
        from archtune.moe import EXPERTS_IMPLEMENTATION
        from archtune.moe.routing_stats import experts_modules

        if not experts_modules(model):
            logger.warning("use_scattermoe: the model has no experts modules; nothing to change")
            return
        name = _setting(plan, "experts_implementation") or EXPERTS_IMPLEMENTATION  # scattermoe or scattermoe_triton
        model.set_experts_implementation(name)
        logger.info("kernels plugin: experts_implementation = %s", name)

    def post_adapters(self, model, plan) -> None:
        if not self._active(plan):
            return
        from archtune.patches.expert_lora import has_expert_lora, skip_parametrization_check

        if has_expert_lora(model):
            n = skip_parametrization_check(model)
            logger.info("kernels plugin: expert LoRA fused into scattermoe (%d expert adapters)", n)


__all__ = ["KernelsPlugin"]
