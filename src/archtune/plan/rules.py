"""The decisions `plan.resolve` makes, written once and driven by family data.

Two kinds, both `Rule(name, doc, apply)`:

- GENERIC_RULES run for every model, first. They name no family: what differs between
  families comes from the family's data (decoder_layer_cls, expert_param_names and aliases,
  the is_moe hook, packing_drop_attention_mask, ...).
- Builders (`freeze_mm_modules()`, `non_reentrant_checkpointing(why)`, ...) return a rule a
  family asks for by name in `Family.rules` (`FamilyRule("non_reentrant_checkpointing", why)`);
  `family_rules(family)` builds them. They run after the generic rules, in the family's order,
  and may refine what a generic rule decided.

Each rule's `doc` is one sentence (what, when, why): docs/model_architectures.md is generated
from them. Sources: "family" for a family's required setting, "auto" for a value archtune
derived from other keys, "default" for a plain default.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable

from archtune.families.base import Family, Rule
# Plugin paths of other trainers' fused losses (archtune.plugins registers them as aliases).
from archtune.plugins import CUT_CROSS_ENTROPY_PLUGIN
from archtune.plan.packing import PACKING_RULES, REFUSE_INEXACT_PACKING
from archtune.plan.training_rules import TRAINING_RULES, optimizer_names, scheduler_names

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import ModelStructure, Plan

# ---------------------------------------------------------------- shared facts

REENTRANT_KEY = "gradient_checkpointing_kwargs.use_reentrant"
LAYER_CLASSES_KEY = "decoder_layer_classes"
WRAP_KEY = "fsdp_config.fsdp_transformer_layer_cls_to_wrap"
ALL_LINEAR = "all-linear"

# Plugins archtune ships (no plugin code is imported from arbitrary paths), and the import
# paths of other trainers they stand in for.
# Experts implementations archtune knows besides transformers' registry (which is read live).
EXPERTS_IMPLEMENTATIONS: tuple[str, ...] = ("eager", "grouped_mm", "batched_mm", "scattermoe")


def experts_implementations() -> list[str]:
    """Valid `experts_implementation` names: eager, transformers' registered ones, scattermoe."""
    names = list(EXPERTS_IMPLEMENTATIONS)
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        names += [n for n in ALL_EXPERTS_FUNCTIONS.keys() if n not in names]
    except ImportError:  # pragma: no cover - older transformers
        pass
    return names


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


def fsdp_enabled(plan: "Plan") -> bool:
    return bool(plan.get("fsdp"))


def checkpoint_wrappers(plan: "Plan") -> list[str]:
    """The keys that put activation-checkpointing wrappers around the layers (those set)."""
    keys = ["gradient_checkpointing", "activation_offloading"]
    if fsdp_enabled(plan):
        keys.insert(1, "fsdp_config.fsdp_activation_checkpointing")
    return [k for k in keys if plan.get(k)]


def quantized_base(plan: "Plan") -> list[str]:
    """The keys that quantize the base model (those set)."""
    out = [k for k in ("load_in_4bit", "load_in_8bit") if plan.get(k)]
    if plan.get("adapter") == "qlora":
        out.append("adapter: qlora")
    return out


def _yaml_list(key: str, values: list[str]) -> str:
    return f"{key}:\n" + "".join(f"  - {v}\n" for v in values)


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---------------------------------------------------------------- generic rules

def _world_size(plan: "Plan") -> None:
    n = plan.world_size
    if n == 1:
        plan.set("world_size", 1, "default", "single process")
    else:
        plan.set("world_size", n, "user", f"{n} processes (--nproc {n})")


def _lora_target_modules(plan: "Plan") -> None:
    cfg = plan.config
    if cfg.adapter is None:
        return
    if cfg.lora_target_linear:
        plan.set("lora_target_modules", ALL_LINEAR, "auto", "lora_target_linear: true targets every linear layer")
    elif not cfg.lora_target_modules and not cfg.lora_target_parameters:
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
    given = list(cfg.lora_target_parameters or [])
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
    if cfg.adapter is not None and cfg.lora_target_parameters and cfg.lora_dropout > 0:
        plan.error("lora_dropout", f"lora_dropout is {cfg.lora_dropout}, but LoRA on parameter tensors "
                   "(lora_target_parameters) has no dropout path in PEFT: it needs lora_dropout 0",
                   "set `lora_dropout: 0`")


def _untrained_experts(plan: "Plan") -> None:
    cfg, fam = plan.config, plan.family
    if cfg.adapter is None or cfg.lora_target_parameters or not fam.expert_param_names:
        return
    if not fam.moe(plan.model_config):
        return
    add = _yaml_list("lora_target_parameters", list(fam.expert_param_names))
    if cfg.lora_dropout:
        add += "lora_dropout: 0\n"
    plan.warn(f"{plan.model_type} is a mixture-of-experts model and lora_target_parameters is not set: the "
              "experts (most of its weights) stay untrained and the adapter only holds the attention/MLP LoRA "
              "(the reference's \"13.5 MB adapter\" trap). To train the experts too, add:\n" + add.rstrip())


def _ddp_find_unused_parameters(plan: "Plan") -> None:
    key = "ddp_find_unused_parameters"
    if plan.world_size == 1:
        plan.default(key, False, "default", "single process: no DDP")
    elif fsdp_enabled(plan):
        plan.default(key, False, "default", "FSDP shards the model: DDP's setting does not apply")
    else:
        gc = bool(plan.get("gradient_checkpointing"))
        plan.default(key, not gc, "default",
                     "transformers' rule: search for unused parameters unless gradient checkpointing is on"
                     if not gc else "gradient checkpointing is on: transformers' rule turns the search off")


def _use_reentrant(plan: "Plan") -> None:
    plan.default(REENTRANT_KEY, False, "default",
                 "non-reentrant checkpointing: PyTorch's recommended mode and transformers' default")


def _fsdp_config(plan: "Plan") -> None:
    from archtune.config.schema import FsdpConfig

    if not fsdp_enabled(plan):
        return
    if plan.config.fsdp_config is None:
        for k, v in FsdpConfig().model_dump().items():
            plan.set(f"fsdp_config.{k}", v, "default", "archtune default (fsdp_config not given)")


def _fsdp_wrap_class(plan: "Plan") -> None:
    if not fsdp_enabled(plan) or plan.get("fsdp_config.fsdp_auto_wrap_policy") != "TRANSFORMER_BASED_WRAP":
        return
    fam = plan.family
    structure = plan.structure()
    if not plan.get(WRAP_KEY):
        if fam.decoder_layer_cls:
            plan.set(WRAP_KEY, fam.decoder_layer_cls, "family",
                     f"{fam.name}'s text decoder layer: one FSDP unit per language-model layer (transformers' "
                     "_no_split_modules also names tower layers, which a model may not have)")
        else:
            present = [c for c in (structure.no_split_modules if structure else ()) if c in structure.class_names]
            if not present:
                plan.error(WRAP_KEY, "no decoder layer class is known for this model, so FSDP cannot wrap by layer",
                           "set fsdp_config.fsdp_transformer_layer_cls_to_wrap to the model's decoder layer "
                           "class (e.g. LlamaDecoderLayer)")
                return
            plan.set(WRAP_KEY, ",".join(present), "auto", "the model's _no_split_modules (its layer classes)")
    if structure is None:
        plan.warn(f"could not check {WRAP_KEY} against the model: {plan.structure_problem()}")
        return
    wanted = [c.strip() for c in str(plan.get(WRAP_KEY)).split(",") if c.strip()]
    missing = [c for c in wanted if c not in structure.class_names]
    if not missing:
        return
    if fam.decoder_layer_cls and fam.decoder_layer_cls in structure.class_names:
        suggestion = fam.decoder_layer_cls
    else:
        suggestion = ",".join(c for c in structure.no_split_modules if c in structure.class_names) or "its layer class"
    notes = [f"{c} is in the model's _no_split_modules but this model has no such module (e.g. no audio tower)"
             if c in structure.no_split_modules else f"no module of this model is a {c}" for c in missing]
    plan.error(WRAP_KEY, "; ".join(notes) + ": FSDP would stop with \"Could not find the transformer layer class\"",
               f"set `fsdp_config.fsdp_transformer_layer_cls_to_wrap: {suggestion}`"
               + (" (or remove it: archtune uses the family's layer class)" if fam.decoder_layer_cls else ""))


def _use_cache(plan: "Plan") -> None:
    wrappers = checkpoint_wrappers(plan)
    if wrappers:
        plan.set("use_cache", False, "auto",
                 f"{_and(wrappers)}: recomputing a layer in backward with the KV cache on fails with a size "
                 "mismatch")
    else:
        plan.set("use_cache", False, "default", "training does not use the KV cache")


def _experts_implementation(plan: "Plan") -> None:
    cfg, fam = plan.config, plan.family
    key = "experts_implementation"
    given = cfg.experts_implementation
    if cfg.use_scattermoe:
        if not cfg.use_kernels:
            plan.set("use_kernels", True, "auto", "use_scattermoe runs through the kernels plugin")
        if given is None:
            name, reason = _scattermoe_or_stock(plan)
            plan.set(key, name, "auto", reason)
        elif given != "scattermoe":
            plan.error(key, f"use_scattermoe: true asks for ScatterMoE but experts_implementation is {given!r}",
                       "set `experts_implementation: scattermoe`, or `use_scattermoe: false`")
            return
    elif given is not None:
        valid = experts_implementations()
        if given not in valid:
            plan.error(key, f"{given!r} is not an experts implementation", f"use one of: {', '.join(valid)}")
            return
    if plan.get(key) is not None and fam.is_moe is not None and not fam.moe(plan.model_config):
        plan.warn(f"experts_implementation: {plan.get(key)} has no effect: this {plan.model_type} model has no experts")


def _quantize_moe_experts(plan: "Plan") -> None:
    cfg, fam = plan.config, plan.family
    key = "quantize_moe_experts"
    four_bit = bool(plan.get("load_in_4bit")) or plan.get("adapter") == "qlora"
    moe = bool(fam.expert_param_names) and fam.moe(plan.model_config)
    if cfg.quantize_moe_experts is None:
        if four_bit and moe:
            plan.set(key, True, "auto",
                     f"4-bit base on a mixture-of-experts model: bitsandbytes quantizes nn.Linear layers only, and the "
                     f"3D expert tensors ({', '.join(fam.expert_param_names)}) hold most of the weights; left in 16 "
                     "bits, a \"4-bit\" Gemma 4 26B-A4B still takes ~46 GB")
        else:
            plan.set(key, False, "default", "no 4-bit base" if not four_bit else "the model has no expert tensors")
        return
    if not cfg.quantize_moe_experts:
        return
    if cfg.adapter is None:
        plan.error(key, "quantize_moe_experts requires an adapter: 4-bit expert tensors are frozen",
                   "set `adapter: qlora` (with `load_in_4bit: true`), or remove quantize_moe_experts")
        return
    if not four_bit:
        plan.error(key, "quantize_moe_experts requires a 4-bit base (the experts are stored like its linear layers)",
                   "set `load_in_4bit: true` and `adapter: qlora`, or remove quantize_moe_experts")
        return
    if not moe:
        plan.warn(f"quantize_moe_experts: true has no effect: this {plan.model_type} model has no expert tensors")
        plan.set(key, False, "auto", "the model has no expert tensors")


def _experts_for_4bit_experts(plan: "Plan") -> None:
    key = "experts_implementation"
    if not plan.get("quantize_moe_experts"):
        return
    why = ("4-bit experts are dequantized one expert at a time only by scattermoe; the other implementations read "
           "the whole expert tensor, dequantized at every forward")
    if plan.get(key) is None:
        plan.set(key, "scattermoe", "auto", why)
    elif plan.get(key) != "scattermoe":
        plan.warn(f"experts_implementation: {plan.get(key)} with quantize_moe_experts works but saves little memory "
                  f"while training: {why}")

def _scattermoe_or_stock(plan: "Plan") -> tuple[str, str]:
    """use_scattermoe without an explicit experts_implementation: scattermoe where it measured
    faster for this model's experts, transformers' stock implementation elsewhere (plan/experts.py)."""
    from archtune.plan.experts import choose_experts_implementation

    cfg = plan.config
    shape = plan.family.moe_shape(plan.model_config)
    if cfg.quantize_moe_experts:
        return "scattermoe", "use_scattermoe with quantize_moe_experts: only scattermoe dequantizes one expert at a time"
    if shape is None:
        return "scattermoe", "use_kernels + use_scattermoe select the ScatterMoE experts kernel"
    expert_lora = plan.get("adapter") in ("lora", "qlora") and bool(plan.get("lora_target_parameters"))
    choice = choose_experts_implementation(**shape, tokens=cfg.micro_batch_size * cfg.sequence_len,
                                           expert_lora=expert_lora)
    return choice.name, f"use_scattermoe: {choice.reason} (set experts_implementation: scattermoe to force it)"


def _plugins(plan: "Plan") -> None:
    """Plugins resolve against archtune.plugins' registry (the one allow-list): built-ins and their
    aliases load; other import paths only with allow_external_plugins, since importing runs code."""
    from archtune.plugins import builtin_plugins, plugin_aliases

    given = list(plan.config.plugins or [])
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


# The chunked cross-entropy (train/losses.py) is on by default from this vocabulary size up.
LARGE_VOCABULARY = 65_536
CHUNKED_CE_DEFAULT_CHUNKS = 8


def _chunked_cross_entropy(plan: "Plan") -> None:
    from archtune.families.base import text_config

    cfg, key = plan.config, "chunked_cross_entropy"
    asked = [f"{k}: true" for k in ("cut_cross_entropy", "liger_fused_linear_cross_entropy") if getattr(cfg, k)]
    if CUT_CROSS_ENTROPY_PLUGIN in (cfg.plugins or []) and cfg.cut_cross_entropy is None:
        asked.append(f"the plugin {CUT_CROSS_ENTROPY_PLUGIN}")
    text = text_config(plan.model_config)
    vocab = int(text.get("vocab_size") or 0)
    cap = text.get("final_logit_softcapping")
    inside = f"; final_logit_softcapping {cap} is applied inside" if cap else ""
    if plan.user_set(key):
        if cfg.chunked_cross_entropy is False and [a for a in asked if a.endswith("true")]:
            plan.error(key, f"chunked_cross_entropy: false, but {_and(asked)} asks for a fused loss",
                       "remove one of them (archtune's chunked cross-entropy is what those keys turn on)")
    elif asked:
        plan.set(key, True, "auto", f"{_and(asked)} (Axolotl) maps to archtune's chunked cross-entropy: lm_head and "
                 f"the loss in chunks of tokens, the same loss and gradients without the full logits{inside}")
    elif vocab >= LARGE_VOCABULARY:
        gib = plan.config.sequence_len * vocab * 4 / 2**30
        plan.set(key, True, "auto", f"vocabulary of {vocab:,} tokens: the stock loss holds [tokens x vocab] logits "
                 f"({gib:.1f} GiB in fp32 per {plan.config.sequence_len:,}-token row) and as much again for their "
                 f"gradient; chunked, they never exist{inside}")
    else:
        plan.set(key, False, "default", f"vocabulary of {vocab:,} tokens (below {LARGE_VOCABULARY:,}): the full "
                 "logits are small")
    if plan.get(key):
        plan.default("chunked_cross_entropy_num_chunks", CHUNKED_CE_DEFAULT_CHUNKS, "default",
                     f"{CHUNKED_CE_DEFAULT_CHUNKS} chunks of label tokens per forward")
    elif plan.user_set("chunked_cross_entropy_num_chunks"):
        plan.warn("chunked_cross_entropy_num_chunks has no effect: chunked_cross_entropy is off")


def _freeze_default(plan: "Plan") -> None:
    if plan.user_set("freeze_mm_modules") and plan.get("freeze_mm_modules") is not None:
        return
    if not plan.family.has_towers(plan.model_config):
        plan.set("freeze_mm_modules", False, "default", "the model has no multimodal towers")
    else:
        plan.set("freeze_mm_modules", True, "default",
                 "the model has multimodal towers, which text-only batches never reach: frozen")


def _decoder_layer_classes(plan: "Plan") -> None:
    key = LAYER_CLASSES_KEY
    wrap = [c.strip() for c in str(plan.get(WRAP_KEY) or "").split(",") if c.strip()]
    fam = plan.family
    if wrap:
        plan.set(key, wrap, plan.source(WRAP_KEY) or "auto", f"the FSDP wrap classes ({WRAP_KEY})")
    elif fam.decoder_layer_cls:
        plan.set(key, [fam.decoder_layer_cls], "family", f"{fam.name}'s text decoder layer")
    else:
        structure = plan.structure() if checkpoint_wrappers(plan) else None
        present = [c for c in (structure.no_split_modules if structure else ()) if c in structure.class_names]
        if present:
            plan.set(key, present, "auto", "the model's _no_split_modules (its layer classes)")
        else:
            plan.set(key, [], "default", "no decoder layer class is known for this model")


def _preference_rules() -> tuple[Rule, ...]:
    from archtune.plan.preference import PREFERENCE_RULES

    return PREFERENCE_RULES
def _axolotl_no_effect(plan: "Plan") -> None:
    for key, why in plan.config.axolotl_notes:
        plan.note(f"{key}: accepted without effect here: {why}")


GENERIC_RULES: tuple[Rule, ...] = (
    *TRAINING_RULES,
    Rule("world_size", "The plan is resolved for the number of processes given by `--nproc` (1: single process).",
         _world_size),
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
    Rule("ddp_find_unused_parameters",
         "`ddp_find_unused_parameters` is false for a single process or under FSDP, and otherwise follows "
         "transformers' rule (true unless gradient checkpointing is on) unless the family decides.",
         _ddp_find_unused_parameters),
    Rule("use_reentrant",
         "Gradient checkpointing is non-reentrant (`gradient_checkpointing_kwargs.use_reentrant: false`) unless the "
         "config says otherwise, as PyTorch recommends.",
         _use_reentrant),
    Rule("fsdp_config",
         "With `fsdp` set and no `fsdp_config`, FSDP2 defaults apply.",
         _fsdp_config),
    Rule("fsdp_wrap_class",
         "Under FSDP with transformer-based wrapping, `fsdp_config.fsdp_transformer_layer_cls_to_wrap` defaults to "
         "the family's text decoder layer, and a class the model does not contain is refused before any process "
         "starts (checked on a weightless meta-device copy).",
         _fsdp_wrap_class),
    Rule("use_cache",
         "Training runs with `use_cache: false`; with gradient checkpointing, FSDP activation checkpointing or "
         "activation offloading it is required, since recompute with the KV cache on fails with a size mismatch.",
         _use_cache),
    *PACKING_RULES,
    Rule("experts_implementation",
         "`experts_implementation` must be eager, one of transformers' registered implementations, or scattermoe; "
         "`use_scattermoe: true` turns on `use_kernels` and runs scattermoe where it measured faster for the "
         "model's experts (many token-expert pairs per expert, or large experts with expert LoRA), else "
         "grouped_mm; `experts_implementation: scattermoe` forces it.",
         _experts_implementation),
    Rule("quantize_moe_experts",
         "With a 4-bit base (`load_in_4bit`, `adapter: qlora`) on a mixture-of-experts model, `quantize_moe_experts` "
         "defaults to true: the 3D expert tensors, most of the weights, are stored in 4 bits too (NF4, double "
         "quantization), which bitsandbytes alone does not do; it requires an adapter and a 4-bit base.",
         _quantize_moe_experts),
    Rule("experts_implementation_for_4bit_experts",
         "With `quantize_moe_experts`, `experts_implementation` defaults to scattermoe, which dequantizes one expert "
         "at a time; another implementation gets a warning.",
         _experts_for_4bit_experts),
    Rule("plugins",
         "Only built-in plugins load; Axolotl's `axolotl.integrations.kernels.KernelsPlugin` is accepted as an alias "
         "of archtune's kernels plugin.",
         _plugins),
    Rule("chunked_cross_entropy",
         "`chunked_cross_entropy` (lm_head and the loss computed in chunks of tokens, so the [tokens x vocab] logits "
         f"never exist) is on for vocabularies of {LARGE_VOCABULARY:,} tokens or more, and when Axolotl's "
         "`cut_cross_entropy: true`, `liger_fused_linear_cross_entropy: true` or the Cut Cross Entropy plugin ask for "
         "a fused loss.",
         _chunked_cross_entropy),
    Rule("freeze_mm_modules_default",
         "`freeze_mm_modules` is false for models without multimodal towers (there is nothing to freeze) and true "
         "for models with them, unless the config says otherwise.",
         _freeze_default),
    Rule("decoder_layer_classes",
         "The decoder layer classes that FSDP2, activation checkpointing and offloading wrap are the FSDP wrap classes "
         "when given, else the family's text decoder layer, else the model's `_no_split_modules`.",
         _decoder_layer_classes),
    *_preference_rules(),
    Rule("axolotl_no_effect",
         "Axolotl keys that change nothing in what is trained here (CUDA-only kernels, other loggers, tuning knobs) "
         "are accepted, each with one info line saying why.",
         _axolotl_no_effect),
)


# ---------------------------------------------------------------- refusals (run last)
#
# What this release cannot train, refused in the plan so that `archtune check` and `archtune train`
# refuse the same configurations. They run after the family's rules, and a key a family already
# refused (with its more specific reason) is not refused twice.

def _refused(plan: "Plan", key: str) -> bool:
    return any(p.key == key for p in plan.errors)


def _refuse_8bit(plan: "Plan") -> None:
    if plan.get("load_in_8bit") and not _refused(plan, "load_in_8bit"):
        plan.error("load_in_8bit", "8-bit training is not supported in this release",
                   "remove `load_in_8bit` (QLoRA: `adapter: qlora` with `load_in_4bit: true`)")


def _refuse_fsdp1(plan: "Plan") -> None:
    key = "fsdp_config.fsdp_version"
    if fsdp_enabled(plan) and plan.get(key) == 1 and not _refused(plan, key):
        plan.error(key, "FSDP1 is not supported in this release", "set `fsdp_config.fsdp_version: 2` (fully_shard)")


def _refuse_offloading_without_layers(plan: "Plan") -> None:
    if plan.get("activation_offloading") and not plan.get(LAYER_CLASSES_KEY):
        plan.error("activation_offloading", "no decoder layer class is known for this model, so there is nothing "
                   "to offload by layer", f"set {WRAP_KEY} to its decoder layer class (e.g. LlamaDecoderLayer)")


REFUSALS: tuple[Rule, ...] = (
    Rule("refuse_load_in_8bit", "`load_in_8bit: true` is refused: 8-bit training is not supported in this release "
         "(4-bit QLoRA is).", _refuse_8bit),
    Rule("refuse_fsdp1", "`fsdp_config.fsdp_version: 1` is refused: FSDP1 is not supported in this release "
         "(FSDP2 is).", _refuse_fsdp1),
    Rule("refuse_offloading_without_layers", "`activation_offloading: true` on a model with no known decoder layer "
         "class is refused (set the FSDP wrap class to name it).", _refuse_offloading_without_layers),
    REFUSE_INEXACT_PACKING,
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
        saved = plan.config.lora_modules_to_save or []
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


def non_reentrant_checkpointing(why: str) -> Rule:
    """Gradient checkpointing must be non-reentrant; an explicit `use_reentrant: true` is an error."""

    def apply(plan: "Plan") -> None:
        if plan.user_set(REENTRANT_KEY):
            if plan.get(REENTRANT_KEY):
                plan.error(REENTRANT_KEY, f"use_reentrant: true on {plan.family.name}: {why}",
                           "set `gradient_checkpointing_kwargs: {use_reentrant: false}`, or remove the key "
                           "(archtune sets it)")
            return
        plan.set(REENTRANT_KEY, False, "family", why)

    return Rule("non_reentrant_checkpointing",
                f"Gradient checkpointing is non-reentrant (`use_reentrant: false`), and an explicit "
                f"`use_reentrant: true` is refused: {why}.", apply)


OFFLOADING_VS_FIND_UNUSED = ("activation_offloading wraps the layers in checkpoint wrappers, and DDP's unused-parameter "
                             "search then fails with \"marked a variable ready twice\"")


def ddp_find_unused_parameters(why: str) -> Rule:
    """Under DDP, `ddp_find_unused_parameters: true` -- false with activation offloading."""

    def apply(plan: "Plan") -> None:
        if plan.world_size == 1 or fsdp_enabled(plan):
            return
        key = "ddp_find_unused_parameters"
        want, reason = (False, OFFLOADING_VS_FIND_UNUSED) if plan.get("activation_offloading") else (True, why)
        if plan.user_set(key):
            if plan.get(key) is not None and bool(plan.get(key)) != want:
                plan.warn(f"ddp_find_unused_parameters: {plan.get(key)} is kept as set, but {plan.family.name} "
                          f"needs {str(want).lower()} here: {reason}")
            return
        plan.set(key, want, "family", reason)

    return Rule("ddp_find_unused_parameters",
                f"Under DDP (several processes, no FSDP) `ddp_find_unused_parameters` defaults to true, because {why}; "
                "with `activation_offloading: true` it stays false, because its checkpoint wrappers make DDP "
                "\"mark a variable ready twice\".", apply)


def no_all_linear_into_towers() -> Rule:
    """`lora_target_linear: true` (or 'all-linear') on a model with towers is an error."""

    def apply(plan: "Plan") -> None:
        fam = plan.family
        targets = plan.get("lora_target_modules")
        if plan.get("adapter") is None or not fam.has_towers(plan.model_config):
            return
        if not (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
            return
        key = "lora_target_linear" if plan.config.lora_target_linear else "lora_target_modules"
        fix = f"remove {key} (archtune then targets the language model only)"
        if fam.lora_target_regex:
            fix += f", or set:\nlora_target_modules: '{fam.lora_target_regex}'"
        plan.error(key, f"every linear layer includes the vision/audio towers ({', '.join(fam.mm_module_prefixes)}): "
                   "adapters there give the reference's \"loss ~12 instead of ~0.5\" trap in text-only training",
                   fix)

    return Rule("no_all_linear_into_towers",
                "`lora_target_linear: true` (or `lora_target_modules: all-linear`) on a multimodal model is refused, "
                "because adapters in the vision/audio towers give the \"loss ~12 instead of ~0.5\" trap; the "
                "language-model-only regex is the fix.", apply)


def confine_target_names() -> Rule:
    """A plain target-name list becomes a regex confined to the language model."""

    def apply(plan: "Plan") -> None:
        fam = plan.family
        targets = plan.get("lora_target_modules")
        if plan.get("adapter") is None or not isinstance(targets, list) or not targets:
            return
        if not fam.language_model_prefix or not fam.has_towers(plan.model_config):
            return
        plan.set("lora_target_modules", names_to_language_model_regex(targets, fam.language_model_prefix), "auto",
                 f"the names {', '.join(map(str, targets))} also occur in the multimodal towers: confined to the "
                 f"language model ({fam.language_model_prefix}) so that no adapter lands in a tower")

    return Rule("confine_target_names",
                "A plain `lora_target_modules` name list (e.g. [q_proj, v_proj]) is rewritten into a regex confined to "
                "the language model, because the towers have modules of the same names.", apply)


def fsdp1_refuses_quantized_base(why: str) -> Rule:
    """`fsdp_config.fsdp_version: 1` with a quantized base model is an error."""

    def apply(plan: "Plan") -> None:
        quantized = quantized_base(plan)
        if not fsdp_enabled(plan) or plan.get("fsdp_config.fsdp_version") != 1 or not quantized:
            return
        plan.error("fsdp_config.fsdp_version",
                   f"FSDP1 with a quantized base ({', '.join(quantized)}) on {plan.family.name}: {why}",
                   "set `fsdp_config.fsdp_version: 2` (FSDP2, fully_shard), or train an unquantized base")

    return Rule("fsdp1_refuses_quantized_base",
                f"FSDP1 (`fsdp_config.fsdp_version: 1`) with a quantized base (QLoRA, load_in_4bit/8bit) is refused, "
                f"because it {why}; FSDP2 works.", apply)


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
    "optimizer_names",
    "scheduler_names",
    "CHUNKED_CE_DEFAULT_CHUNKS",
    "LARGE_VOCABULARY",
    "FAMILY_RULE_BUILDERS",
    "family_rules",
    "EXPERTS_IMPLEMENTATIONS",
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
