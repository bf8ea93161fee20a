"""LoRA targets that name real modules stay module targets under PEFT's transformers-v5 conversion.

Why: under transformers 5, PEFT rewrites the LoraConfig of MoE models whose experts were fused
in v5 (`peft.utils.transformers_weight_conversion.convert_peft_config_for_transformers`, for
every model_type transformers maps to the qwen2_moe conversion: qwen3_moe, qwen3_next, olmoe,
deepseek_v3, ...). It exists to load adapters trained on v4, where each expert was a module
`experts.N.down_proj`. It moves EVERY target ending in `.gate_proj`, `.up_proj` or `.down_proj`
to the fused expert tensors (`target_parameters` gate_up_proj / down_proj) and drops it from
`target_modules`, whether or not the name is a real module of the v5 model. On Qwen3-Next,
`mlp.shared_expert.down_proj` (an nn.Linear beside the experts) therefore gets no adapter, and
the routed experts get one nobody asked for (peft 0.21.2).

The fix (`keep_module_targets`, used around every adapter archtune creates or loads): targets
that name a module the model has (PEFT's own suffix rule: the name, or a name ending in
`.TARGET`) are taken out before the conversion and put back after it; the conversion still
maps the rest (v4 names of fused experts), so v4 adapters load as before.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from archtune.patches import Patch, register_patch

_CONVERSION = "peft.utils.transformers_weight_conversion"


def real_module_targets(model: torch.nn.Module, targets) -> set[str]:
    """The entries of a target list that name a module of `model` (PEFT's suffix matching)."""
    names = [n for n, _ in model.named_modules()]
    return {t for t in targets if any(n == t or n.endswith(f".{t}") for n in names)}


@contextmanager
def keep_module_targets() -> Iterator[None]:
    """While active, PEFT's v4 -> v5 config conversion leaves targets naming real modules alone."""
    import importlib

    conversion = importlib.import_module(_CONVERSION)
    original = conversion.convert_peft_config_for_transformers

    def convert(peft_config, model, conversions=None):
        targets = getattr(peft_config, "target_modules", None)
        if not isinstance(targets, (list, set, tuple)) or not targets:
            return original(peft_config, model=model, conversions=conversions)
        kept = real_module_targets(model, targets)
        peft_config.target_modules = set(targets) - kept
        try:
            original(peft_config, model=model, conversions=conversions)
        finally:
            peft_config.target_modules = set(peft_config.target_modules or ()) | kept

    conversion.convert_peft_config_for_transformers = convert
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


PEFT_MODULE_TARGETS = register_patch(Patch(
    name="peft_module_targets",
    doc="LoRA targets naming real modules (e.g. Qwen3-Next's `shared_expert.down_proj`) stay on those modules: "
        "PEFT's transformers-v5 MoE conversion would move them onto the routed experts.",
    apply=keep_module_targets,
    upstream="transformers 5.25.0, peft 0.21.2",
    relies_on={f"{_CONVERSION}.convert_peft_config_for_transformers": "bf3f6bb80e14",
               f"{_CONVERSION}._convert_peft_config_moe": "459e679cb941",
               "peft.tuners.tuners_utils.BaseTuner.inject_adapter": "d7c229268c4a"},
))

__all__ = ["keep_module_targets", "real_module_targets"]
