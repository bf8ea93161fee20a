"""The decisions `plan.resolve` makes, in the order it makes them, written once and driven by family data.

Two kinds, both `Rule(name, doc, apply)`:

- GENERIC_RULES run for every model, first. They name no family: what differs between
  families comes from the family's data (decoder_layer_cls, expert_param_names and aliases,
  the is_moe hook, packing_drop_attention_mask, ...).
- Builders (`freeze_mm_modules()`, `non_reentrant_checkpointing(why)`, ...) return a rule a
  family asks for by name in `Family.rules` (`FamilyRule("non_reentrant_checkpointing", why)`);
  `family_rules(family)` builds them. They run after the generic rules, in the family's order,
  and may refine what a generic rule decided.
- REFUSALS run last: what this release cannot train.

The rules sit by concern, each group in its own module: training_rules (precision, attention,
optimizer, schedules, ...), adapter_rules (LoRA targets, freezing), distributed_rules (DDP, FSDP,
checkpointing, decoder layers), packing, data_settings (what data/ reads), train_settings (what train/
reads: batches, warmup, padding, loggers' run name), moe_rules (experts implementations, quantization),
loss_rules (chunked cross-entropy), preference (rl, reward models), grpo (rl: grpo, online RL); this module holds the order,
the two config-level rules (plugins, Axolotl keys without effect) and the family builders' table.

Each rule's `doc` is one sentence (what, when, why): docs/model_architectures.md is generated
from them. Sources: "family" for a family's required setting, "auto" for a value archtune
derived from other keys, "default" for a plain default.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from archtune.families.base import Family
from archtune.plan.shared import Rule
from archtune.plan.adapter_rules import (ADAPTER_RULES, confine_target_names, freeze_mm_modules,
                                         names_to_language_model_regex, no_all_linear_into_towers)
from archtune.plan.data_settings import DATA_RULES
from archtune.plan.distributed_rules import (DISTRIBUTED_REFUSALS, DISTRIBUTED_RULES, ddp_find_unused_parameters,
                                             fsdp1_refuses_quantized_base, non_reentrant_checkpointing)
from archtune.plan.loss_rules import CHUNKED_CE_DEFAULT_CHUNKS, LARGE_VOCABULARY, LOSS_RULES
from archtune.plan.experts import experts_implementations
from archtune.plan.moe_rules import MOE_RULES, REFUSE_LOAD_IN_8BIT
from archtune.plan.packing import PACKING_RULES, REFUSE_INEXACT_PACKING
from archtune.plan.grpo import GRPO_RULES
from archtune.plan.preference import PREFERENCE_RULES
from archtune.plan.structure import MissingLibraries, StructureUnavailable, install_lines, model_structure
from archtune.plan.shared import (ALL_LINEAR, LAYER_CLASSES_KEY, REENTRANT_KEY, WRAP_KEY, checkpoint_wrappers,
                                  fsdp_enabled, quantized_base)
from archtune.plan.train_settings import TRAIN_SETTINGS_RULES
from archtune.plan.training_rules import TRAINING_RULES, optimizer_names, scheduler_names

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import Plan


# ---------------------------------------------------------------- config-level rules

def _plugins(plan: "Plan") -> None:
    """Plugins resolve against archtune.plugins' registry (the one allow-list): built-ins and their
    aliases load; other import paths only with allow_external_plugins, since importing runs code."""
    from archtune.plugins import builtin_plugins, plugin_aliases

    given = list(plan.get("plugins") or [])
    if not given:
        return
    builtins, aliases = builtin_plugins(), plugin_aliases()
    resolved: list[str] = []
    notes: list[str] = []
    for path in given:
        name = aliases.get(path, path)
        if name in builtins:
            if name != path:
                notes.append(f"{path} is accepted as an alias of archtune's built-in {name}")
        elif plan.config.allow_external_plugins:
            plan.warn(f"plugins: {path} is an external plugin: importing it runs its code (allow_external_plugins: true)")
        else:
            plan.error("plugins", f"{path!r} is not a built-in plugin; external plugins are refused by default "
                       "because importing a module runs its code",
                       f"remove it (built-ins: {', '.join(sorted([*builtins, *aliases]))}), or set "
                       "allow_external_plugins: true if you trust it")
            continue
        if name not in resolved:
            resolved.append(name)
    if resolved != given:
        plan.set("plugins", resolved, "auto", "; ".join(notes) or "duplicates removed")


def _model_libraries(plan: "Plan") -> None:
    """The libraries the model's classes declare (transformers' requires_backends) must be installed:
    loading the weights builds the same classes, so train would stop there."""
    try:
        model_structure(plan.model_config, plan.family.auto_class)
    except MissingLibraries as exc:
        said = [part.strip() for part in str(exc).split(". ") if "requires" in part]
        plan.error("base_model", f"this {plan.model_type} model cannot be built here: "
                   + (". ".join(said) or str(exc)).rstrip("."),
                   install_lines(exc.backends, str(exc)))
    except StructureUnavailable:  # the rules that need the structure say why they could not use it
        return


MODEL_LIBRARIES = Rule(
    "model_libraries",
    "A model whose classes need a library that is not installed (transformers' requires_backends, e.g. timm for "
    "Gemma 3n's vision tower) is refused with its install line: loading the weights would stop there.",
    _model_libraries)


def _axolotl_no_effect(plan: "Plan") -> None:
    for key, why in plan.config.axolotl_notes:
        plan.note(f"{key}: accepted without effect here: {why}")


GENERIC_RULES: tuple[Rule, ...] = (
    *TRAINING_RULES,
    *ADAPTER_RULES,
    *DISTRIBUTED_RULES,
    *PACKING_RULES,
    *DATA_RULES,
    *MOE_RULES,
    *LOSS_RULES,  # before plugins: a fused-loss plugin path as written asks for the chunked loss
    Rule("plugins",
         "Only built-in plugins load; Axolotl's `axolotl.integrations.kernels.KernelsPlugin` is accepted as an alias "
         "of archtune's kernels plugin.",
         _plugins),
    *PREFERENCE_RULES,
    *GRPO_RULES,
    *TRAIN_SETTINGS_RULES,
    Rule("axolotl_no_effect",
         "Axolotl keys that change nothing in what is trained here (CUDA-only kernels, other loggers, tuning knobs) "
         "are accepted, each with one info line saying why.",
         _axolotl_no_effect),
)


# What this release cannot train, refused in the plan so that `archtune check` and `archtune train`
# refuse the same configurations. They run after the family's rules, and a key a family already
# refused (with its more specific reason) is not refused twice.
REFUSALS: tuple[Rule, ...] = (
    MODEL_LIBRARIES,
    REFUSE_LOAD_IN_8BIT,
    *DISTRIBUTED_REFUSALS,
    REFUSE_INEXACT_PACKING,
)


# The builders a family may name in `Family.rules`: name -> builder (taking the family's reason
# when the rule states one).
FAMILY_RULE_BUILDERS: dict[str, Callable[..., Rule]] = {
    "freeze_mm_modules": freeze_mm_modules,
    "non_reentrant_checkpointing": non_reentrant_checkpointing,
    "ddp_find_unused_parameters": ddp_find_unused_parameters,
    "no_all_linear_into_towers": no_all_linear_into_towers,
    "confine_target_names": confine_target_names,
    "fsdp1_refuses_quantized_base": fsdp1_refuses_quantized_base,
}


def family_rules(family: Family) -> list[Rule]:
    """The rules `family` declares (`Family.rules`), built, in its order."""
    out = []
    for ref in family.rules:
        builder = FAMILY_RULE_BUILDERS.get(ref.name)
        if builder is None:
            raise KeyError(f"family {family.name!r} asks for rule {ref.name!r}, which src/archtune/plan/rules.py "
                           f"does not define; known: {', '.join(sorted(FAMILY_RULE_BUILDERS))}")
        out.append(builder(ref.why) if ref.why else builder())
    return out


__all__ = [
    "GENERIC_RULES",
    "REFUSALS",
    "LAYER_CLASSES_KEY",
    "REENTRANT_KEY",
    "WRAP_KEY",
    "ALL_LINEAR",
    "optimizer_names",
    "scheduler_names",
    "CHUNKED_CE_DEFAULT_CHUNKS",
    "LARGE_VOCABULARY",
    "FAMILY_RULE_BUILDERS",
    "family_rules",
    "experts_implementations",
    "names_to_language_model_regex",
    "checkpoint_wrappers",
    "quantized_base",
    "fsdp_enabled",
    "freeze_mm_modules",
    "non_reentrant_checkpointing",
    "ddp_find_unused_parameters",
    "no_all_linear_into_towers",
    "confine_target_names",
    "fsdp1_refuses_quantized_base",
]
