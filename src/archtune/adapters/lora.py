"""LoRA through PEFT: module targets (list, regex, all-linear) and expert parameter targets.

The Plan says what to target (`lora_target_modules`, `lora_target_parameters`); here that is
resolved against the loaded model into explicit, sorted lists of full names, which PEFT then
gets verbatim. Doing the matching ourselves, once, lets us

- keep adapters out of frozen multimodal towers (`freeze_mm_modules`), for `all-linear` too
  (PEFT's all-linear would wrap the towers' linears: the "loss ~12" trap);
- apply the family's `lora_target_redirects` (archtune.patches.lora_redirect): a target whose
  class PEFT cannot wrap (Gemma 4's `Gemma4ClippableLinear`) becomes its inner `nn.Linear`;
- report a target set that matches nothing as a UserError naming the key, before PEFT runs.

PEFT matches a list entry against a module name by equality or by suffix (`name.endswith("." +
entry)`); entries that are full dotted names from the model's root therefore hit exactly the
module they name. `apply_lora` verifies that the adapters PEFT placed are exactly those.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Iterable

import torch

from archtune.adapters.freeze import canonical_name, check_towers_frozen, tower_prefixes, under_prefix
from archtune.errors import UserError
from archtune.patches.lora_redirect import redirect_targets
from archtune.patches.peft_targets import keep_module_targets
from archtune.plan import Plan

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"


def _linear_classes() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    # Quantized linears (bitsandbytes Linear4bit/Linear8bitLt) subclass nn.Linear.
    return (torch.nn.Linear, Conv1D)


def _output_embedding_names(model: torch.nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    return {name for name, module in model.named_modules(remove_duplicate=False) if module is head}


def _matches_entry(name: str, entry: str) -> bool:
    """PEFT's rule for a list entry (equal, or a dotted suffix), on the name as it is or canonical."""
    return any(n == entry or n.endswith("." + entry) for n in {name, canonical_name(name)})


def _is_all_linear(spec: Any) -> bool:
    return isinstance(spec, str) and spec.lower() == ALL_LINEAR


def _describe(spec: Any) -> str:
    return repr(spec) if isinstance(spec, str) else "[" + ", ".join(map(str, spec)) + "]"


def _candidates_hint(model: torch.nn.Module, excluded: tuple[str, ...]) -> str:
    """A few leaf names of linear layers outside the excluded towers, for the fix text."""
    leaves = sorted({canonical_name(n).rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, _linear_classes()) and not under_prefix(n, excluded)})
    return ", ".join(leaves[:12]) if leaves else "(the model has no linear layers)"


def resolve_lora_targets(model: torch.nn.Module, plan: Plan) -> list[str]:
    """The Plan's `lora_target_modules` as a sorted list of full module names of `model`.

    - a list: PEFT's rule (an entry equals the name or is a dotted suffix of it);
    - a string: a regular expression that must match the whole name;
    - "all-linear": every nn.Linear (and transformers' Conv1D) except the output head (lm_head),
      as PEFT defines it, and the modules trained fully (lora_modules_to_save).
    Modules under the multimodal towers are dropped when `freeze_mm_modules` is on. Then the
    family's `lora_target_redirects` turn a wrapper PEFT cannot adapt into its inner linear
    (`...q_proj` -> `...q_proj.linear`). An empty or unset target returns [] (expert-only LoRA);
    a target that matches nothing is a UserError on `lora_target_modules`.
    Names are spelled as `model.named_modules()` spells them (checkpoint-wrapper segments kept),
    so PEFT matches them exactly; `model` is the base model (not yet a PeftModel).
    """
    spec = plan.adapter.target_modules
    if spec is None or (not _is_all_linear(spec) and len(spec) == 0):
        return []
    modules = {name: module for name, module in model.named_modules() if name}
    if _is_all_linear(spec):
        heads = _output_embedding_names(model)
        # Modules trained fully (a reward model's score head) carry no LoRA either.
        saved = set(plan.adapter.modules_to_save)
        linear = _linear_classes()
        picked = [n for n, m in modules.items()
                  if isinstance(m, linear) and n not in heads and n.rsplit(".", 1)[-1] not in saved]
    elif isinstance(spec, str):
        try:
            regex = re.compile(spec)
        except re.error as exc:
            raise UserError.single("lora_target_modules", f"{spec!r} is not a valid regular expression: {exc}",
                                   "fix the pattern (it must match whole module names)") from None
        picked = [n for n in modules if regex.fullmatch(n) or regex.fullmatch(canonical_name(n))]
    else:
        entries = [str(e) for e in spec]
        picked = [n for n in modules if any(_matches_entry(n, e) for e in entries)]

    excluded = tower_prefixes(plan)
    in_towers = [n for n in picked if under_prefix(n, excluded)]
    kept = [n for n in picked if not under_prefix(n, excluded)]

    targets = redirect_targets(modules, kept, plan.lora_target_redirects)

    if not targets:
        if in_towers:
            message = (f"{_describe(spec)} matches only modules of the multimodal towers "
                       f"({len(in_towers)}, e.g. {in_towers[0]}), which freeze_mm_modules keeps frozen")
            fix = ("target the language model (e.g. the family's default: remove lora_target_modules), "
                   "or set `freeze_mm_modules: false` to train the towers on purpose")
        else:
            message = f"{_describe(spec)} matches no module of the model"
            fix = ("a list entry must equal a module name or its dotted end (e.g. q_proj, self_attn.q_proj); a "
                   f"string is a regex over whole names; linear layers here include: {_candidates_hint(model, excluded)}")
        raise UserError.single("lora_target_modules", message, fix)
    if in_towers:
        log.warning("lora_target_modules: %d matching modules under the frozen multimodal towers were left out "
                    "(freeze_mm_modules is true), e.g. %s", len(in_towers), in_towers[0])
    return sorted(targets)


def resolve_lora_parameters(model: torch.nn.Module, plan: Plan) -> list[str]:
    """The Plan's `lora_target_parameters` (e.g. experts.gate_up_proj) as sorted full parameter names.

    An entry matches a parameter whose name equals it or ends with "." + entry (PEFT's rule);
    tower parameters are dropped when freezing is on. [] when unset; an entry set that matches
    nothing is a UserError on `lora_target_parameters`.
    """
    entries = plan.adapter.target_parameters
    if not entries:
        return []
    excluded = tower_prefixes(plan)
    names = [n for n, _ in model.named_parameters()]
    picked = sorted({n for n in names if any(_matches_entry(n, str(e)) for e in entries)
                     and not under_prefix(n, excluded)})
    if not picked:
        experts = sorted({canonical_name(n) for n, p in model.named_parameters()
                          if p.dim() == 3 and not under_prefix(n, excluded)})
        known = plan.expert_param_names
        hint = (f"use {list(known)}" if known else
                f"3D parameters of this model: {', '.join(experts[:6])}" if experts else
                "this model has no 3D expert parameters: remove lora_target_parameters")
        raise UserError.single("lora_target_parameters",
                               f"{[str(e) for e in entries]} matches no parameter of the model", hint)
    return picked


def lora_config(plan: Plan, target_modules: Iterable[str], target_parameters: Iterable[str]):
    """PEFT's LoraConfig with explicit, resolved target lists."""
    from peft import LoraConfig

    adapter = plan.adapter
    modules_to_save = adapter.modules_to_save
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        # [] (not None): None would make PEFT fall back to its own per-model_type defaults.
        target_modules=list(target_modules),
        target_parameters=list(target_parameters) or None,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type=adapter.task_type,  # SEQ_CLS: a reward model (the Plan)
        # A saved lm_head / embed_tokens stays tied to its twin (Gemma ties them), also when merged.
        ensure_weight_tying=bool(modules_to_save),
    )


def lora_module_names(model: torch.nn.Module) -> list[str]:
    """Canonical names of the modules carrying a LoRA layer (module targets, not parameter targets)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    return sorted({canonical_name(n) for n, m in model.named_modules()
                   if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper)})


def lora_parameter_names(model: torch.nn.Module) -> list[str]:
    """Canonical names of the parameters carrying a LoRA (parameter targets, e.g. expert tensors)."""
    from peft.tuners.lora.layer import ParamWrapper

    out = set()
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            owner = canonical_name(name)
            while owner.endswith(".base_layer"):
                owner = owner[: -len(".base_layer")]
            out.add(f"{owner}.{module.parameter_name}")
    return sorted(out)


def apply_lora(model, plan: Plan):
    """Wrap `model` with LoRA adapters as the Plan says; seeded so the init is reproducible.

    Targets are resolved first (`resolve_lora_targets`, `resolve_lora_parameters`); afterwards the
    placed adapters are checked against them, and (freezing on) against the towers.
    """
    from peft import get_peft_model

    if plan.adapter.model_dir:
        return load_adapter_to_train(model, plan)
    targets = resolve_lora_targets(model, plan)
    parameters = resolve_lora_parameters(model, plan)
    if not targets and not parameters:
        raise UserError.single("lora_target_modules", "adapter is lora but nothing is targeted",
                               "set lora_target_modules (names, a regex or 'all-linear') and/or lora_target_parameters")
    dropout = plan.adapter.dropout
    if parameters and dropout:
        raise UserError.single("lora_dropout", f"lora_dropout is {dropout}, but LoRA on parameter tensors "
                               "(lora_target_parameters) only works without dropout", "set `lora_dropout: 0`")
    config = lora_config(plan, targets, parameters)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.training.seed)
        try:
            with keep_module_targets():
                peft_model = get_peft_model(model, config)
        except ValueError as exc:
            # e.g. a target of a class PEFT cannot wrap: a config problem, reported on the key.
            raise UserError.single("lora_target_modules", f"PEFT could not place the adapters: {exc}",
                                   "check lora_target_modules / lora_target_parameters against the model's module names") from None
    placed = set(lora_module_names(peft_model))
    missing = sorted({canonical_name(t) for t in targets} - placed)
    if missing:
        raise RuntimeError(f"PEFT placed no adapter on {len(missing)} resolved targets, e.g. {missing[:3]}")
    check_towers_frozen(peft_model, plan)
    return peft_model


def load_adapter_to_train(model, plan: Plan):
    """`lora_model_dir`: the trained adapter in that directory, trainable, as the starting point
    (its own targets and rank; Axolotl's meaning)."""
    from peft import PeftModel

    path = plan.adapter.model_dir
    try:
        with keep_module_targets():
            peft_model = PeftModel.from_pretrained(model, path, is_trainable=True)
    except (OSError, ValueError) as exc:
        raise UserError.single("lora_model_dir", f"cannot load the adapter in {path}: {exc}",
                               "point lora_model_dir at the output_dir of a LoRA run of this base model") from None
    check_towers_frozen(peft_model, plan)
    return peft_model


def load_adapter(model, path):
    """The adapter saved in `path` on `model` (for inference and merging), its targets as saved."""
    from peft import PeftModel

    with keep_module_targets():
        return PeftModel.from_pretrained(model, path)


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
