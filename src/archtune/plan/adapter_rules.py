"""Adapter decisions: LoRA targets (modules, expert parameters), the multimodal towers kept out of
them and frozen. Generic rules (ADAPTER_RULES) read the family's data; the builders at the end
are the rules a family asks for by name (`Family.rules`)."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from archtune.plan.shared import Rule
from archtune.plan.shared import ALL_LINEAR, yaml_list

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import ModelStructure, Plan


def names_to_language_model_regex(names: list[str], language_model_prefix: str) -> str:
    """A PEFT target-name list rewritten as a regex (full match) confined to the language model.

    PEFT matches a list entry when it equals the module name or is its dotted end; the regex
    keeps that meaning under `language_model_prefix` only. Any segments may sit between (layer
    numbers, torch's `_checkpoint_wrapped_module.`):

    >>> names_to_language_model_regex(["q_proj", "v_proj"], "model.language_model")
    'model\\\\.language_model\\\\.(?:.*\\\\.)?(?:q_proj|v_proj)'

    matches `model.language_model.layers.0.self_attn.q_proj` and
    `model.language_model.layers.0._checkpoint_wrapped_module.self_attn.q_proj`, never
    `model.vision_tower.encoder.layers.0.self_attn.q_proj`.
    """
    alternatives = "|".join(re.escape(str(n)) for n in names)
    return rf"{re.escape(language_model_prefix)}\.(?:.*\.)?(?:{alternatives})"


# ---------------------------------------------------------------- generic rules

def _lora_target_modules(plan: "Plan") -> None:
    cfg = plan.config
    if cfg.adapter is None:
        return
    if cfg.lora_target_linear:
        plan.set("lora_target_modules", ALL_LINEAR, "auto", "lora_target_linear: true targets every linear layer")
    elif not plan.get("lora_target_modules") and not plan.get("lora_target_parameters"):
        if plan.family.lora_target_regex:
            plan.set("lora_target_modules", plan.family.lora_target_regex, "family",
                     f"no targets given: {plan.family.name}'s language-model-only regex")
        else:
            plan.set("lora_target_modules", ALL_LINEAR, "auto",
                     "no targets given: every linear layer (lm_head excluded)")


def _expert_names_in_model(plan: "Plan", structure: "ModelStructure | None") -> list[str]:
    """lora_target_parameters names this model accepts (full names, then short aliases)."""
    fam = plan.family
    if fam.expert_param_names:
        present = [n for n in fam.expert_param_names if structure is None or structure.parameters_matching(n)]
        return present + [a for a, full in fam.expert_param_aliases.items() if full in present]
    if structure is None:
        return []
    # No family knowledge: the model's 3D tensors (stacked experts), by their last two segments.
    return sorted({".".join(n.split(".")[-2:]) for n, shape in structure.parameters.items() if len(shape) == 3})


def _lora_target_parameters(plan: "Plan") -> None:
    cfg = plan.config
    given = list(plan.get("lora_target_parameters") or [])
    if cfg.adapter is None or not given:
        return
    fam = plan.family
    resolved: list[str] = []
    mapped: list[str] = []
    for name in given:
        full = fam.expert_param_aliases.get(name, name)
        if full != name:
            mapped.append(f"{name} -> {full}")
        if full not in resolved:
            resolved.append(full)
    structure = plan.structure()
    if structure is not None:
        unknown = [n for n in resolved if not structure.parameters_matching(n)]
    else:
        unknown = [n for n in resolved if fam.expert_param_names and n not in fam.expert_param_names]
    if unknown:
        valid = _expert_names_in_model(plan, structure)
        what = ", ".join(unknown)
        if valid:
            plan.error("lora_target_parameters", f"{what}: not a parameter of this model",
                       f"use the expert tensors' names: {', '.join(valid)}")
        else:
            plan.error("lora_target_parameters", f"{what}: this model has no expert parameters "
                       "(it is not a mixture-of-experts model)",
                       "remove lora_target_parameters (LoRA on linear layers comes from lora_target_modules)")
        return
    if resolved != given:
        reason = (f"short names mapped to {fam.name}'s expert tensors: {', '.join(mapped)}" if mapped
                  else "duplicate names removed")
        plan.set("lora_target_parameters", resolved, "auto", reason)


def _lora_dropout_with_parameters(plan: "Plan") -> None:
    cfg = plan.config
    if cfg.adapter is not None and plan.get("lora_target_parameters") and cfg.lora_dropout > 0:
        plan.error("lora_dropout", f"lora_dropout is {cfg.lora_dropout}, but LoRA on parameter tensors "
                   "(lora_target_parameters) has no dropout path in PEFT: it needs lora_dropout 0",
                   "set `lora_dropout: 0`")


def _untrained_experts(plan: "Plan") -> None:
    cfg, fam = plan.config, plan.family
    if cfg.adapter is None or plan.get("lora_target_parameters") or not fam.expert_param_names:
        return
    if not fam.moe(plan.model_config):
        return
    add = yaml_list("lora_target_parameters", list(fam.expert_param_names))
    if cfg.lora_dropout:
        add += "lora_dropout: 0\n"
    plan.warn(f"{plan.model_type} is a mixture-of-experts model and lora_target_parameters is not set: the "
              "experts (most of its weights) stay untrained and the adapter only holds the attention/MLP LoRA "
              "(the reference's \"13.5 MB adapter\" trap). To train the experts too, add:\n" + add.rstrip())


def _freeze_default(plan: "Plan") -> None:
    if plan.user_set("freeze_mm_modules") and plan.get("freeze_mm_modules") is not None:
        return
    if not plan.family.has_towers(plan.model_config):
        plan.set("freeze_mm_modules", False, "default", "the model has no multimodal towers")
    else:
        plan.set("freeze_mm_modules", True, "default",
                 "the model has multimodal towers, which text-only batches never reach: frozen")


ADAPTER_RULES: tuple[Rule, ...] = (
    Rule("lora_target_modules",
         "With an adapter and no targets, LoRA goes on the family's language-model-only regex, or on every linear "
         "layer for models without one; `lora_target_linear: true` means every linear layer.",
         _lora_target_modules),
    Rule("lora_target_parameters",
         "`lora_target_parameters` short names map to the family's expert tensors (gate_proj/up_proj -> "
         "experts.gate_up_proj, down_proj -> experts.down_proj) and every name must be a parameter of the model, "
         "checked on a weightless meta-device copy.",
         _lora_target_parameters),
    Rule("lora_dropout_with_parameters",
         "`lora_target_parameters` with a nonzero `lora_dropout` is refused, because PEFT's LoRA on parameter "
         "tensors has no dropout path.",
         _lora_dropout_with_parameters),
    Rule("untrained_experts",
         "A mixture-of-experts model trained with LoRA but no `lora_target_parameters` gets a warning with the YAML "
         "to add, because its experts would stay untrained (the \"13.5 MB adapter\" trap).",
         _untrained_experts),
    Rule("freeze_mm_modules_default",
         "`freeze_mm_modules` is false for models without multimodal towers (there is nothing to freeze) and true "
         "for models with them, unless the config says otherwise.",
         _freeze_default),
)


# ---------------------------------------------------------------- builders for Family.rules

def freeze_mm_modules() -> Rule:
    """Freeze the multimodal towers by default (when the config declares any)."""

    def apply(plan: "Plan") -> None:
        fam = plan.family
        if not fam.has_towers(plan.model_config):
            return
        if not plan.user_set("freeze_mm_modules"):
            plan.set("freeze_mm_modules", True, "family",
                     f"text-only training: the towers, embedders and projectors ({', '.join(fam.mm_module_prefixes)}) "
                     "get no gradient from text batches; frozen, no adapter or optimizer state lands there")
        saved = plan.get("lora_modules_to_save") or []
        trained = [p for p in fam.mm_projector_prefixes
                   if any(p == name or p.endswith("." + name) for name in saved)]
        if trained and plan.get("freeze_mm_modules"):
            plan.set("mm_trainable_modules", trained, "user",
                     "lora_modules_to_save names them: each trains fully (a saved copy) while the towers stay "
                     "frozen; image rows need a trained projector to reach the language model")

    return Rule("freeze_mm_modules",
                "`freeze_mm_modules` defaults to true: the vision/audio towers, their embedders and projectors are "
                "frozen for text-only training, so no adapter or optimizer state lands there; a projector named in "
                "`lora_modules_to_save` trains fully (`mm_trainable_modules`) while the towers stay frozen.", apply)


def _towered_lora_targets(plan: "Plan"):
    """`lora_target_modules` of a LoRA run on a model whose config declares multimodal towers, else None."""
    if plan.get("adapter") is None or not plan.family.has_towers(plan.model_config):
        return None
    return plan.get("lora_target_modules")


def no_all_linear_into_towers() -> Rule:
    """`lora_target_linear: true` (or 'all-linear') on a model with towers: every linear layer of
    what trains. Towers frozen: the language model's (stated with the reason); towers trained
    (`freeze_mm_modules: false`): theirs too, as Axolotl does, with a warning for text-only data."""

    def apply(plan: "Plan") -> None:
        fam = plan.family
        targets = _towered_lora_targets(plan)
        if not (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
            return
        key = "lora_target_linear" if plan.config.lora_target_linear else "lora_target_modules"
        towers = ", ".join(fam.mm_module_prefixes)
        if plan.get("freeze_mm_modules"):
            plan.set("lora_target_modules", ALL_LINEAR, "auto",
                     f"{key}: every linear layer of the part being trained, the language model: the towers "
                     f"({towers}) are frozen (freeze_mm_modules), so none of their linear layers gets an adapter "
                     "(adapters there are the reference's \"loss ~12 instead of ~0.5\" trap in text-only training)")
            return
        # A warning, not a refusal: whether the rows carry images is known only once the data is read,
        # and `check` (which reads no data) must refuse exactly what `train` refuses.
        fix = "set freeze_mm_modules: true (every linear layer of the language model)"
        if fam.lora_target_regex:
            fix += f", or lora_target_modules: '{fam.lora_target_regex}'"
        plan.warn(f"{key} with freeze_mm_modules: false puts LoRA adapters in the vision/audio towers too ({towers}), "
                  "as Axolotl does: right for image or audio data; with text-only data those adapters are the "
                  f"reference's \"loss ~12 instead of ~0.5\" trap. For text-only data: {fix}")

    return Rule("no_all_linear_into_towers",
                "`lora_target_linear: true` (or `lora_target_modules: all-linear`) on a multimodal model means every "
                "linear layer of the part being trained: the language model while the towers are frozen (the "
                "default), the towers too with `freeze_mm_modules: false` (a warning, since adapters in the towers "
                "are the \"loss ~12 instead of ~0.5\" trap for text-only data).", apply)


def confine_target_names() -> Rule:
    """A plain target-name list becomes a regex confined to the language model."""

    def apply(plan: "Plan") -> None:
        fam = plan.family
        targets = _towered_lora_targets(plan)
        if not isinstance(targets, list) or not targets or not fam.language_model_prefix:
            return
        plan.set("lora_target_modules", names_to_language_model_regex(targets, fam.language_model_prefix), "auto",
                 f"the names {', '.join(map(str, targets))} also occur in the multimodal towers: confined to the "
                 f"language model ({fam.language_model_prefix}) so that no adapter lands in a tower")

    return Rule("confine_target_names",
                "A plain `lora_target_modules` name list (e.g. [q_proj, v_proj]) is rewritten into a regex confined to "
                "the language model, because the towers have modules of the same names.", apply)


__all__ = ["ADAPTER_RULES", "names_to_language_model_regex", "freeze_mm_modules", "no_all_linear_into_towers",
           "confine_target_names"]
