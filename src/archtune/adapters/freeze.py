"""Freezing multimodal towers (vision/audio encoders, their embedders and projectors).

Text-only fine-tuning of a multimodal wrapper must leave its towers alone: their weights get no
gradient from a text batch anyway, and adapters placed there (e.g. by `all-linear`) are the
"loss ~12" trap of the reference. The Plan says whether to freeze (`freeze_mm_modules`) and where
the towers are (`plan.frozen_prefixes`); this module only acts on it.

Names seen here come in several spellings of the same module, all handled by `canonical_name`:

    model.vision_tower.encoder.layers.0.mlp.up_proj                       the base model
    base_model.model.model.vision_tower.encoder.layers.0.mlp.up_proj      inside a PeftModel
    model.language_model.layers.0._checkpoint_wrapped_module.mlp.up_proj  torch checkpoint_wrapper
    _orig_mod.model.language_model.layers.0.mlp.up_proj                   torch.compile
"""
from __future__ import annotations

from typing import Iterable

import torch

from archtune.errors import UserError
from archtune.plan import Plan
from archtune.plan.training_rules import unfrozen_pattern

PEFT_PREFIX = "base_model.model."
# Segments that wrappers insert into module names without changing what the module is.
WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")
# Name segments of the tensors PEFT adds (LoRA and its variants, modules_to_save copies).
ADAPTER_SEGMENTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                    "modules_to_save")


def canonical_name(name: str) -> str:
    """A parameter or module name as the base model spells it.

    Drops PEFT's leading `base_model.model.` and every wrapper segment (`_checkpoint_wrapped_module`,
    `_orig_mod`, `_fsdp_wrapped_module`), wherever they occur.
    """
    name = ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)
    while name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return name


def under_prefix(name: str, prefixes: Iterable[str]) -> bool:
    """True when `name` (any spelling) is one of `prefixes` or lies inside one of them."""
    canon = canonical_name(name)
    return any(canon == p or canon.startswith(p + ".") for p in prefixes)


def freeze_enabled(plan: Plan) -> bool:
    """The Plan's `freeze_mm_modules` (decided for every model)."""
    return plan.freeze_mm_modules


def tower_prefixes(plan: Plan) -> tuple[str, ...]:
    """The module prefixes that are frozen (empty when freezing is off or the model has no towers)."""
    return plan.frozen_prefixes


def _is_adapter_tensor(name: str) -> bool:
    return any(part in ADAPTER_SEGMENTS for part in name.split("."))


def adapters_in_towers(model: torch.nn.Module, prefixes: Iterable[str]) -> list[str]:
    """Names of adapter tensors (lora_A/lora_B/..., modules_to_save copies) under the towers."""
    prefixes = tuple(prefixes)
    if not prefixes:
        return []
    return sorted({canonical_name(n) for n, _ in model.named_parameters(remove_duplicate=False)
                   if _is_adapter_tensor(n) and under_prefix(n, prefixes)})


def trainable_in_towers(model: torch.nn.Module, prefixes: Iterable[str]) -> list[str]:
    prefixes = tuple(prefixes)
    if not prefixes:
        return []
    return sorted({canonical_name(n) for n, p in model.named_parameters(remove_duplicate=False)
                   if p.requires_grad and under_prefix(n, prefixes)})


def _tower_problem(kind: str, names: list[str], prefixes: tuple[str, ...]) -> UserError:
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return UserError.single(
        "freeze_mm_modules",
        f"freeze_mm_modules is true but {len(names)} {kind} under the multimodal towers "
        f"({', '.join(prefixes)}): {shown}",
        "keep lora_target_modules / lora_target_parameters / lora_modules_to_save inside the language model, "
        "or set `freeze_mm_modules: false` to train the towers on purpose")


def check_towers_frozen(model: torch.nn.Module, plan: Plan) -> None:
    """With freezing on: no adapter and no trainable parameter under a tower, else a UserError
    listing them. Run after LoRA is applied (a no-op when freezing is off). The Plan's
    `mm_trainable_modules` (projectors named in lora_modules_to_save) are exempt."""
    exempt = plan.model.mm_trainable_modules
    prefixes = tower_prefixes(plan)
    adapters = [n for n in adapters_in_towers(model, prefixes) if not under_prefix(n, exempt)]
    if adapters:
        raise _tower_problem("adapter tensors landed", adapters, prefixes)
    trainable = [n for n in trainable_in_towers(model, prefixes) if not under_prefix(n, exempt)]
    if trainable:
        raise _tower_problem("parameters are trainable", trainable, prefixes)


def freeze_multimodal(model: torch.nn.Module, plan: Plan) -> list[str]:
    """Freeze every parameter under the family's multimodal prefixes when `freeze_mm_modules` is on.

    Returns the frozen parameter names (canonical spelling, sorted); [] when freezing is off.
    Works on the base model (full fine-tuning: only the towers frozen, the language model stays
    trainable; or before LoRA) and on a PEFT model, where an adapter found under a tower is a
    UserError naming it (freezing it quietly would hide a misplaced adapter).
    """
    prefixes = tower_prefixes(plan)
    if not prefixes:
        return []
    misplaced = adapters_in_towers(model, prefixes)
    if misplaced:
        raise _tower_problem("adapter tensors landed", misplaced, prefixes)
    frozen: set[str] = set()
    # remove_duplicate=False: a tensor shared with another module is seen under every name.
    for name, param in model.named_parameters(remove_duplicate=False):
        if under_prefix(name, prefixes):
            param.requires_grad_(False)
            frozen.add(canonical_name(name))
    return sorted(frozen)


def unfreeze_only(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """`unfrozen_parameters`: a full fine-tune of only the parameters whose name matches one of
    the patterns (Axolotl's rule: a regex matched from the start of the name, in which a `.` not
    followed by `+` is a literal dot); every other parameter is frozen. Returns the trained names
    (sorted)."""
    compiled = [unfrozen_pattern(p) for p in patterns]
    trained = []
    for name, param in model.named_parameters():
        keep = any(c.match(name) or c.match(canonical_name(name)) for c in compiled)
        param.requires_grad_(keep)
        if keep:
            trained.append(name)
    if not trained:
        raise UserError.single("unfrozen_parameters", "no parameter of this model matches " + ", ".join(patterns),
                               "patterns match parameter names from the start, e.g. model.layers.0.mlp.up_proj.weight")
    return sorted(trained)


__all__ = [
    "unfreeze_only",
    "canonical_name",
    "under_prefix",
    "freeze_enabled",
    "tower_prefixes",
    "adapters_in_towers",
    "trainable_in_towers",
    "check_towers_frozen",
    "freeze_multimodal",
]
