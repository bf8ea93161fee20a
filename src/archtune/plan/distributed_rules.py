"""Decisions for processes and memory-saving wrappers: world size, DDP's unused-parameter search,
FSDP (config, wrap class), checkpointing (non-reentrant, no KV cache), the decoder layer classes
that FSDP2, checkpointing and offloading wrap. Generic rules, refusals of what this release
cannot run, and the builders a family asks for by name."""
from __future__ import annotations

from typing import TYPE_CHECKING

from archtune.plan.shared import Rule
from archtune.plan.shared import (FSDP_LOADING_KEY, LAYER_CLASSES_KEY, REENTRANT_KEY, WRAP_KEY, and_join,
                                  checkpoint_wrappers, fsdp_enabled, quantized_base, refused)

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import Plan


# ---------------------------------------------------------------- generic rules

def _world_size(plan: "Plan") -> None:
    n = plan.world_size
    if n == 1:
        plan.set("world_size", 1, "default", "single process")
    else:
        plan.set("world_size", n, "user", f"{n} processes in all (--nproc per node x --nnodes)")


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


def _fsdp_loading(plan: "Plan") -> None:
    """Each rank reads only its shards where the checkpoint's tensors are the model's as stored:
    a local safetensors directory, loaded neither in k bits nor rescaled before sharding."""
    if not fsdp_enabled(plan):
        return
    why_not = _whole_model_load_reason(plan)
    asked = plan.get(FSDP_LOADING_KEY)
    if asked is False:
        plan.set(FSDP_LOADING_KEY, False, "user", "set in config: every rank loads the whole model, then shards it")
    elif why_not is None:
        plan.set(FSDP_LOADING_KEY, True, "user" if asked else "default",
                 "each rank builds the model without weights, shards it, then reads only its own slices of the "
                 "checkpoint's tensors: no rank holds the full model")
    else:
        if asked:
            plan.warn(f"{FSDP_LOADING_KEY}: every rank loads the whole model before sharding ({why_not})")
        plan.set(FSDP_LOADING_KEY, False, "user" if asked else "default",
                 f"every rank loads the whole model, then shards it: {why_not}")


def _whole_model_load_reason(plan: "Plan") -> str | None:
    """Why the ranks cannot read their shards straight from the checkpoint (None: they can)."""
    from pathlib import Path

    base = str(plan.get("base_model") or "")
    if quantized_base(plan):
        return f"the base is quantized while loading ({and_join(quantized_base(plan))})"
    if plan.get("fsdp_config.fsdp_offload_params"):
        return "fsdp_offload_params keeps the shards in CPU memory, where they are loaded whole"
    if plan.get("normalize_weight_scales"):
        return "normalize_weight_scales rescales the base weights before sharding"
    if plan.get("reward_model") or plan.get("rl"):
        return "preference and reward training load the model themselves"
    directory = Path(base)
    if not directory.is_dir() or not any((directory / f).is_file() for f in
                                         ("model.safetensors.index.json", "model.safetensors")):
        return f"{base} is not a local safetensors checkpoint directory"
    return None


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
                 f"{and_join(wrappers)}: recomputing a layer in backward with the KV cache on fails with a size "
                 "mismatch")
    else:
        plan.set("use_cache", False, "default", "training does not use the KV cache")


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


DISTRIBUTED_RULES: tuple[Rule, ...] = (
    Rule("world_size", "The plan is resolved for the number of processes, `--nproc` on each of `--nnodes` nodes "
         "(1: single process).",
         _world_size),
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
    Rule("fsdp_loading",
         "Under FSDP, `fsdp_config.fsdp_cpu_ram_efficient_loading` defaults to true for a local safetensors base "
         "loaded unquantized: each rank builds the model without weights, shards it and reads only its own slices "
         "of the checkpoint; `false`, or a quantized or rescaled base, loads the whole model on every rank first.",
         _fsdp_loading),
    Rule("fsdp_wrap_class",
         "Under FSDP with transformer-based wrapping, `fsdp_config.fsdp_transformer_layer_cls_to_wrap` defaults to "
         "the family's text decoder layer, and a class the model does not contain is refused before any process "
         "starts (checked on a weightless meta-device copy).",
         _fsdp_wrap_class),
    Rule("use_cache",
         "Training runs with `use_cache: false`; with gradient checkpointing, FSDP activation checkpointing or "
         "activation offloading it is required, since recompute with the KV cache on fails with a size mismatch.",
         _use_cache),
    Rule("decoder_layer_classes",
         "The decoder layer classes that FSDP2, activation checkpointing and offloading wrap are the FSDP wrap classes "
         "when given, else the family's text decoder layer, else the model's `_no_split_modules`.",
         _decoder_layer_classes),
)


# ---------------------------------------------------------------- refusals (run after the family's rules)

def _refuse_fsdp1(plan: "Plan") -> None:
    key = "fsdp_config.fsdp_version"
    if fsdp_enabled(plan) and plan.get(key) == 1 and not refused(plan, key):
        plan.error(key, "FSDP1 is not supported in this release", "set `fsdp_config.fsdp_version: 2` (fully_shard)")


def _refuse_offloading_without_layers(plan: "Plan") -> None:
    if plan.get("activation_offloading") and not plan.get(LAYER_CLASSES_KEY):
        plan.error("activation_offloading", "no decoder layer class is known for this model, so there is nothing "
                   "to offload by layer", f"set {WRAP_KEY} to its decoder layer class (e.g. LlamaDecoderLayer)")


DISTRIBUTED_REFUSALS: tuple[Rule, ...] = (
    Rule("refuse_fsdp1", "`fsdp_config.fsdp_version: 1` is refused: FSDP1 is not supported in this release "
         "(FSDP2 is).", _refuse_fsdp1),
    Rule("refuse_offloading_without_layers", "`activation_offloading: true` on a model with no known decoder layer "
         "class is refused (set the FSDP wrap class to name it).", _refuse_offloading_without_layers),
)


# ---------------------------------------------------------------- builders for Family.rules

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


__all__ = ["DISTRIBUTED_RULES", "DISTRIBUTED_REFUSALS", "non_reentrant_checkpointing", "ddp_find_unused_parameters",
           "fsdp1_refuses_quantized_base"]
