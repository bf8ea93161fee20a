"""What the docs show for a family: its tiny model's meta-device skeleton, and the Plan that
`plan.resolve` gives for each scenario (a configuration on top of LoRA + gradient checkpointing)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

from archtune.plan.structure import ModelStructure, model_structure


# ================================================================ the model's skeleton (meta device)

def tiny_skeleton(family, tiny_name: str) -> ModelStructure:
    """The tiny model's skeleton, built on the meta device by the plan's own builder (cached there)."""
    return model_structure(tiny_model_config(tiny_name), family.auto_class)


_MODEL_CONFIGS: dict[str, dict[str, Any]] = {}


def tiny_model_config(tiny_name: str) -> dict[str, Any]:
    """config.json of a tiny model as a dict (a fresh copy: plans may keep it)."""
    if tiny_name not in _MODEL_CONFIGS:
        from archtune.models.tiny import build_tiny_config

        _MODEL_CONFIGS[tiny_name] = build_tiny_config(tiny_name).to_dict()
    return copy.deepcopy(_MODEL_CONFIGS[tiny_name])


# ================================================================ scenarios: the Plan for a configuration

BASE_KEYS: dict[str, Any] = {"datasets": [{"path": "data.jsonl"}], "adapter": "lora", "gradient_checkpointing": True}
FSDP2 = {"fsdp": ["full_shard", "auto_wrap"],
         "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}
FSDP1_QLORA = {"fsdp": ["full_shard", "auto_wrap"],
               "fsdp_config": {"fsdp_version": 1, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP"},
               "adapter": "qlora", "load_in_4bit": True}
KERNEL_KEYS_FROM = "axolotl.integrations.kernels.KernelsPlugin"


@dataclass(frozen=True)
class Scenario:
    """A configuration on top of the family's base (LoRA, gradient checkpointing, expert LoRA on a
    MoE model), the number of processes, and the setting whose decision the docs show."""

    title: str
    keys: dict[str, Any]
    world_size: int = 1
    shows: str | None = None
    moe_only: bool = False
    drop: tuple[str, ...] = ()  # base keys removed first
    # Written as the config excerpt in the docs; default: `keys`.
    excerpt: str | None = None


SCENARIOS: dict[str, tuple[Scenario, ...]] = {
    "multi_gpu": (
        Scenario("DDP", {}, 2, "ddp_find_unused_parameters", excerpt="--nproc 2"),
        Scenario("DDP + activation offloading", {"activation_offloading": True}, 2, "ddp_find_unused_parameters",
                 excerpt="--nproc 2, activation_offloading: true"),
        Scenario("FSDP1 + QLoRA", FSDP1_QLORA, 2, "fsdp_config.fsdp_transformer_layer_cls_to_wrap",
                 excerpt="fsdp_version: 1, adapter: qlora, load_in_4bit: true"),
        Scenario("FSDP2", FSDP2, 2, "fsdp_config.fsdp_transformer_layer_cls_to_wrap", excerpt="fsdp_version: 2"),
        Scenario("FSDP2 + activation offloading", {**FSDP2, "activation_offloading": True}, 2, "use_cache",
                 excerpt="fsdp_version: 2, activation_offloading: true"),
    ),
    "issues": (
        Scenario("All linear layers", {"lora_target_linear": True}, shows="lora_target_modules",
                 excerpt="lora_target_linear: true"),
        Scenario("A plain target-name list", {"lora_target_modules": ["q_proj", "v_proj"]},
                 shows="lora_target_modules", excerpt="lora_target_modules: [q_proj, v_proj]"),
        Scenario("Reentrant checkpointing", {"gradient_checkpointing_kwargs": {"use_reentrant": True}},
                 shows="gradient_checkpointing_kwargs.use_reentrant",
                 excerpt="gradient_checkpointing_kwargs: {use_reentrant: true}"),
        Scenario("Find-unused-parameters with activation offloading",
                 {"activation_offloading": True, "ddp_find_unused_parameters": True}, 2, "ddp_find_unused_parameters",
                 excerpt="--nproc 2, activation_offloading: true, ddp_find_unused_parameters: true"),
        Scenario("Experts left out", {}, shows="lora_target_parameters", moe_only=True,
                 drop=("lora_target_parameters",), excerpt="adapter: lora without lora_target_parameters"),
        Scenario("Expert short names", {"lora_target_parameters": ["gate_proj", "up_proj", "down_proj"]},
                 shows="lora_target_parameters", moe_only=True,
                 excerpt="lora_target_parameters: [gate_proj, up_proj, down_proj]"),
        Scenario("Dropout on expert LoRA", {"lora_dropout": 0.05}, shows="lora_target_parameters", moe_only=True,
                 excerpt="lora_target_parameters with lora_dropout: 0.05"),
    ),
}


@dataclass
class Outcome:
    scenario: Scenario
    errors: list[Any] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    decision: Any = None  # plan Decision of scenario.shows (None when unset)


class FamilyDocs:
    """A family and its primary tiny model, with the plans the docs need (built once)."""

    def __init__(self, family):
        self.family = family
        self.tiny = self._primary_tiny()
        self.model_config = tiny_model_config(self.tiny.name) if self.tiny else None
        self.moe = bool(self.model_config and family.moe(self.model_config))

    def _primary_tiny(self):
        """The first tiny model that is a mixture of experts when the family has experts, else the first."""
        tinies = list(self.family.tiny_models)
        if not tinies:
            return None
        if self.family.expert_param_names:
            for tiny in tinies:
                if self.family.moe(tiny_model_config(tiny.name)):
                    return tiny
        return tinies[0]

    def base_keys(self) -> dict[str, Any]:
        keys = copy.deepcopy(BASE_KEYS)
        if self.moe:
            keys["lora_target_parameters"] = list(self.family.expert_param_names)
        return keys

    def plan(self, keys: dict[str, Any], world_size: int = 1, drop: Iterable[str] = ()):
        from archtune.config.load import config_from_dict
        from archtune.plan import resolve

        data = self.base_keys()
        for key in drop:
            data.pop(key, None)
        data.update(copy.deepcopy(keys))
        data["base_model"] = f"tiny:{self.tiny.name}"
        cfg = config_from_dict(data, source="archtune docs")
        return resolve(cfg, copy.deepcopy(self.model_config), world_size=world_size)

    def outcome(self, scenario: Scenario) -> Outcome:
        plan = self.plan(scenario.keys, scenario.world_size, scenario.drop)
        return Outcome(scenario, list(plan.errors), list(plan.warnings),
                       plan.settings.get(scenario.shows) if scenario.shows else None)
