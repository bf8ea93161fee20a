"""Keys and facts several groups of plan rules read (the rules themselves sit by concern:
adapter_rules, distributed_rules, moe_rules, packing, loss_rules, training_rules, preference)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import Plan

REENTRANT_KEY = "gradient_checkpointing_kwargs.use_reentrant"
LAYER_CLASSES_KEY = "decoder_layer_classes"
WRAP_KEY = "fsdp_config.fsdp_transformer_layer_cls_to_wrap"
FSDP_LOADING_KEY = "fsdp_config.fsdp_cpu_ram_efficient_loading"
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class Rule:
    """One decision of `plan.resolve`: a generic rule, or one a family names (`FamilyRule`).

    `apply(plan)` reads the config, the model's config.json and the family's data, and calls
    `plan.set` / `plan.default` / `plan.warn` / `plan.error`. Rules run in declaration order.
    `doc` is one sentence -- what is set or refused, when, and why -- and is the line the rule
    contributes to the generated docs/model_architectures.md.
    """

    name: str
    doc: str
    apply: Callable[["Plan"], None]


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


def refused(plan: "Plan", key: str) -> bool:
    return any(p.key == key for p in plan.errors)


def yaml_list(key: str, values: list[str]) -> str:
    return f"{key}:\n" + "".join(f"  - {v}\n" for v in values)


def and_join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


__all__ = ["REENTRANT_KEY", "LAYER_CLASSES_KEY", "WRAP_KEY", "FSDP_LOADING_KEY", "ALL_LINEAR", "fsdp_enabled", "checkpoint_wrappers",
           "quantized_base", "refused", "yaml_list", "and_join"]
