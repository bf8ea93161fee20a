"""Family registry and detection from config.json (never weights)."""
from __future__ import annotations

from typing import Any

from archtune.families.base import Family, FamilyRule, Rule, TinyModel, text_config

_REGISTRY: dict[str, Family] = {}
GENERIC = "generic"


def register_family(family: Family) -> Family:
    if family.name in _REGISTRY:
        raise KeyError(f"family {family.name!r} is registered twice")
    names = [r.name for r in family.rules]
    if len(names) != len(set(names)):
        raise KeyError(f"family {family.name!r} declares a rule twice: {sorted({n for n in names if names.count(n) > 1})}")
    unknown = sorted(set(family.expert_param_aliases.values()) - set(family.expert_param_names))
    if unknown:
        raise KeyError(f"family {family.name!r}: expert_param_aliases point at {unknown}, "
                       f"which are not in expert_param_names {list(family.expert_param_names)}")
    for other in _REGISTRY.values():
        clash = set(other.model_types) & set(family.model_types)
        if clash:
            raise KeyError(f"model_type {sorted(clash)} claimed by both {other.name} and {family.name}")
    _REGISTRY[family.name] = family
    return family


def all_families() -> list[Family]:
    _load_builtin()
    return list(_REGISTRY.values())


def get_family(name: str) -> Family:
    _load_builtin()
    return _REGISTRY[name]


def model_types_of(config: dict[str, Any]) -> list[str]:
    """model_type of a config.json dict, then of its nested text_config (outer first)."""
    types = [config.get("model_type")]
    text = config.get("text_config")
    if isinstance(text, dict):
        types.append(text.get("model_type"))
    return [t for t in types if t]


def detect(config: dict[str, Any]) -> Family:
    """The family claiming the config's model_type (or its text_config's); else generic."""
    _load_builtin()
    for model_type in model_types_of(config):
        for family in _REGISTRY.values():
            if model_type in family.model_types:
                return family
    return _REGISTRY[GENERIC]


def find_tiny(name: str) -> tuple[Family, TinyModel]:
    _load_builtin()
    for family in _REGISTRY.values():
        tiny = family.tiny(name)
        if tiny is not None:
            return family, tiny
    raise KeyError(name)


def tiny_names() -> list[str]:
    _load_builtin()
    return [t.name for f in _REGISTRY.values() for t in f.tiny_models]


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    # Importing a family module registers it.
    from archtune.families import gemma3, gemma4, generic, qwen3_5_moe  # noqa: F401


__all__ = ["Family", "FamilyRule", "Rule", "TinyModel", "text_config", "register_family", "all_families", "get_family", "detect", "find_tiny", "tiny_names"]
