"""Packing decisions: the attention mask of packed rows, packed evaluation, and whether packing
can be exact for this model at all.

A packed row keeps its documents apart in softmax attention through position_ids (transformers
builds the block-diagonal mask when there is no 2D mask). Layers that carry state along the
sequence (linear attention, state-space mixers) never see that mask: each needs a packing patch
(archtune.patches.packing) that passes the document boundaries in. Which layers carry state and
which patch covers which is known here, once; the patches read it from here, and the plan
refuses packing for a model whose skeleton has a state-carrying layer its family's patches do not
cover, so `archtune check` and `archtune train` refuse it alike, before any weight is loaded.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from archtune.plan.shared import Rule
from archtune.plan.shared import refused

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import ModelStructure, Plan

# Class name suffixes of layers that carry state along the sequence, so they leak across packed
# documents unless a packing patch passes the boundaries in.
STATEFUL_LAYER_SUFFIXES: tuple[str, ...] = (
    "GatedDeltaNet", "DeltaNet", "LinearAttention", "Mamba", "Mamba2Mixer", "MambaMixer", "RWKV", "ShortConv",
    "RecurrentBlock", "RGLRU", "Lightning",
)

# Packing patch name -> class name suffix of the state-carrying layers it makes exact.
PACKING_PATCH_LAYERS: dict[str, str] = {
    "gated_deltanet_packing": "GatedDeltaNet",
}


def carries_state(class_name: str) -> bool:
    return class_name.endswith(STATEFUL_LAYER_SUFFIXES)


def uncovered_stateful_modules(structure: "ModelStructure", patches: tuple[str, ...] | list[str]) -> list[str]:
    """Modules of the skeleton that carry state along the sequence and none of `patches` covers
    (the outermost such module of a nest), as "name (Class)"."""
    covered = tuple(PACKING_PATCH_LAYERS[p] for p in patches if p in PACKING_PATCH_LAYERS)
    found: list[str] = []
    for name, cls in structure.module_classes.items():
        if not carries_state(cls) or (covered and cls.endswith(covered)):
            continue
        if any(name.startswith(outer.split(" ")[0] + ".") for outer in found):
            continue
        found.append(f"{name} ({cls})")
    return found


def _packing_policy(plan: "Plan") -> None:
    # One decision for every model: a 2D mask can only mark padding, not where one packed document
    # ends, and transformers derives the per-document mask from position_ids only when
    # attention_mask is None. A family that states this policy is named as its source.
    fam = plan.family
    reason = ("packed rows carry no 2D attention mask (it cannot mark document boundaries); transformers builds "
              "the block-diagonal mask of packed documents from position_ids restarting at 0 only when "
              "attention_mask is None")
    plan.set("sample_packing_drop_attention_mask", True, "family" if fam.packing_drop_attention_mask else "auto",
             f"{fam.name}: {reason}" if fam.packing_drop_attention_mask else reason)


def _document_attention(plan: "Plan") -> None:
    # Measured forward+backward over packed rows of 4,096 tokens (bench/attention.py on CPU,
    # bench/gpu.py attention on an H200): on CPU the masked kernel computes every score, so skipping
    # the forbidden ones wins 3-8x; on CUDA one masked sdpa call is a single fused kernel and
    # per-document layouts pay a launch per block: the masked call measured 7-20x faster there.
    if not plan.packs or plan.get("attn_implementation") != "sdpa":
        return
    from archtune.plan.training_rules import cuda_available

    if cuda_available():
        plan.set("document_attention", False, "auto", "CUDA: one sdpa call with the block-diagonal mask of the packed "
                 "documents (a single fused kernel; measured faster than per-document layouts on GPU)")
    else:
        plan.set("document_attention", True, "auto", "CPU: sdpa only over each document's own scores (a band or "
                 "per-document blocks), since the masked CPU kernel computes every score of the row; same values")


def _eval_sample_packing(plan: "Plan") -> None:
    plan.default("eval_sample_packing", bool(plan.get("sample_packing")), "auto",
                 "follows sample_packing (eval_sample_packing not given)")


PACKING_RULES: tuple[Rule, ...] = (
    Rule("packing_policy",
         "Packed batches carry no attention mask (`sample_packing_drop_attention_mask: true`), because transformers "
         "builds the per-document mask from position_ids only when there is none.",
         _packing_policy),
    Rule("eval_sample_packing",
         "`eval_sample_packing` follows `sample_packing` unless the config sets it.",
         _eval_sample_packing),
    Rule("document_attention",
         "With packing and sdpa, attention on CPU computes only each document's own scores (exact, the same values); "
         "on CUDA it stays one sdpa call with the block-diagonal mask, which measured faster there.",
         _document_attention),
)


def _refuse_inexact_packing(plan: "Plan") -> None:
    packed = [k for k in ("sample_packing", "eval_sample_packing") if plan.get(k)]
    if not packed or any(refused(plan, k) for k in packed):
        return
    key = packed[0]
    structure = plan.structure()
    if structure is None:
        plan.warn(f"could not check that packing is exact for this model ({plan.structure_problem()}): the loaded "
                  "model is checked instead")
        return
    left = uncovered_stateful_modules(structure, plan.packing_patches)
    if left:
        plan.error(key, f"packing cannot be made exact for this model: {len(left)} layers carry state along the "
                   f"sequence and no packing patch passes the document boundaries into them "
                   f"({', '.join(left[:3])}{', ...' if len(left) > 3 else ''}), so packed documents would leak "
                   "into each other",
                   " and ".join(f"set `{k}: false`" for k in packed))


REFUSE_INEXACT_PACKING = Rule(
    "refuse_inexact_packing",
    "`sample_packing` (or `eval_sample_packing`) on a model with a layer that carries state along the sequence "
    "(linear attention, state-space mixers) and no packing patch of its family is refused, because packed documents "
    "would leak into each other through that state (checked on a weightless meta-device copy).",
    _refuse_inexact_packing)


__all__ = ["STATEFUL_LAYER_SUFFIXES", "PACKING_PATCH_LAYERS", "PACKING_RULES", "REFUSE_INEXACT_PACKING",
           "carries_state", "uncovered_stateful_modules"]
