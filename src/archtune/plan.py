"""The Plan: every resolved setting with its value, source and reason.

Only `resolve` makes decisions. Family rules (families/) run here and nowhere else; later
stages read the Plan and never look at the model's type again. `archtune check` prints it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from archtune.config.schema import Config
from archtune.errors import Problem, UserError
from archtune.families import Family, detect, model_types_of

Source = Literal["user", "default", "family", "auto"]


@dataclass
class Decision:
    value: Any
    source: Source
    reason: str = ""

    def to_dict(self) -> dict:
        return {"value": self.value, "source": self.source, "reason": self.reason}


@dataclass
class Rule:
    """A family rule: when it applies, what it sets or refuses, why, and its docs line.

    `apply(plan)` calls plan.set / plan.error / plan.warn. Rules run in declaration order.
    """

    name: str
    doc: str
    apply: Callable[["Plan"], None]


@dataclass
class Plan:
    config: Config
    family: Family
    model_type: str
    model_config: dict
    world_size: int = 1
    settings: dict[str, Decision] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)

    # -- reading
    def get(self, key: str, default: Any = None) -> Any:
        d = self.settings.get(key)
        return default if d is None else d.value

    def source(self, key: str) -> Source | None:
        d = self.settings.get(key)
        return None if d is None else d.source

    def user_set(self, key: str) -> bool:
        return self.source(key) == "user"

    # -- deciding (only rules and resolve call these)
    def set(self, key: str, value: Any, source: Source, reason: str) -> None:
        self.settings[key] = Decision(value, source, reason)

    def default(self, key: str, value: Any, source: Source, reason: str) -> None:
        """Set unless the user chose a value."""
        if not self.user_set(key):
            self.set(key, value, source, reason)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def error(self, key: str, message: str, fix: str = "") -> None:
        self.errors.append(Problem(key, message, fix))

    def raise_errors(self) -> None:
        if self.errors:
            raise UserError(list(self.errors))

    def to_json(self) -> dict:
        return {
            "family": self.family.name,
            "model_type": self.model_type,
            "world_size": self.world_size,
            "settings": {k: d.to_dict() for k, d in sorted(self.settings.items())},
            "warnings": list(self.warnings),
            "errors": [p.to_dict() for p in self.errors],
        }


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def _config_settings(cfg: Config) -> dict[str, Decision]:
    settings: dict[str, Decision] = {}
    explicit = cfg.model_fields_set
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if hasattr(value, "model_dump") or (isinstance(value, list) and value and hasattr(value[0], "model_dump")):
            value = value.model_dump() if hasattr(value, "model_dump") else [v.model_dump() for v in value]
        source: Source = "user" if name in explicit else "default"
        flat: dict[str, Any] = {}
        _flatten(value, name, flat)
        for key, v in flat.items():
            settings[key] = Decision(v, source, "set in config" if source == "user" else "archtune default")
    return settings


def _resolve_lora_targets(plan: Plan) -> None:
    """Generic LoRA target resolution; families refine it with their own rules."""
    cfg = plan.config
    if cfg.adapter is None:
        return
    if cfg.lora_target_linear:
        plan.set("lora_target_modules", "all-linear", "auto", "lora_target_linear: true targets every linear layer")
    elif not cfg.lora_target_modules and not cfg.lora_target_parameters:
        if plan.family.lora_target_regex:
            plan.set("lora_target_modules", plan.family.lora_target_regex, "family",
                     f"no targets given: {plan.family.name}'s language-model-only regex")
        else:
            plan.set("lora_target_modules", "all-linear", "auto",
                     "no targets given: every linear layer of the language model (lm_head excluded)")


def resolve(cfg: Config, model_config: dict, world_size: int = 1) -> Plan:
    """Config + the model's config.json (as a dict) -> Plan. Never loads weights."""
    family = detect(model_config)
    types = model_types_of(model_config)
    plan = Plan(config=cfg, family=family, model_type=types[0] if types else "unknown",
                model_config=model_config, world_size=world_size)
    plan.settings = _config_settings(cfg)
    _resolve_lora_targets(plan)
    for rule in family.rules:
        rule.apply(plan)
    return plan
