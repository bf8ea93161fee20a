"""Family registry and detection from config.json (never weights).

Families are discovered: every module of this package (but the shared base.py and media.py) is
imported on first use, and each registers one `Family` with `register_family`. Adding a family
is adding its file (and its test); nothing else names it.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from archtune.families.base import Family, FamilyRule, TinyModel, text_config
from archtune.registry import Registry

GENERIC = "generic"
_NOT_FAMILIES = ("base", "media")  # shared templates the family files use


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _NOT_FAMILIES and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


FAMILIES: Registry[Family] = Registry("family", "src/archtune/families/ (one file per family)", discover=_discover)


def register_family(family: Family) -> Family:
    names = [r.name for r in family.rules]
    if len(names) != len(set(names)):
        raise KeyError(f"family {family.name!r} declares a rule twice: {sorted({n for n in names if names.count(n) > 1})}")
    unknown = sorted(set(family.expert_param_aliases.values()) - set(family.expert_param_names))
    if unknown:
        raise KeyError(f"family {family.name!r}: expert_param_aliases point at {unknown}, "
                       f"which are not in expert_param_names {list(family.expert_param_names)}")
    for other in FAMILIES.values():
        clash = set(other.model_types) & set(family.model_types)
        if clash:
            raise KeyError(f"model_type {sorted(clash)} claimed by both {other.name} and {family.name}")
    return FAMILIES.register(family.name, family)


def all_families() -> list[Family]:
    return FAMILIES.values()


def get_family(name: str) -> Family:
    return FAMILIES[name]


def chat_templates() -> dict[str, str]:
    """Every family's `chat_template:` names -> Jinja text (a family built on another's, as Qwen
    3.5 dense on the MoE one, repeats its templates; one name with two texts is a bug)."""
    out: dict[str, str] = {}
    for family in all_families():
        for name, text in family.chat_templates.items():
            if out.setdefault(name, text) != text:
                raise KeyError(f"chat template {name!r} is defined twice, differently (family {family.name!r})")
    return out


def model_types_of(config: dict[str, Any]) -> list[str]:
    """model_type of a config.json dict, then of its nested text_config (outer first)."""
    types = [config.get("model_type")]
    text = config.get("text_config")
    if isinstance(text, dict):
        types.append(text.get("model_type"))
    return [t for t in types if t]


def detect(config: dict[str, Any]) -> Family:
    """The family claiming the config's model_type (or its text_config's); else generic."""
    for model_type in model_types_of(config):
        for family in FAMILIES.values():
            if model_type in family.model_types:
                return family
    return FAMILIES[GENERIC]


def find_tiny(name: str) -> tuple[Family, TinyModel]:
    for family in FAMILIES.values():
        tiny = family.tiny(name)
        if tiny is not None:
            return family, tiny
    raise KeyError(name)


def tiny_names() -> list[str]:
    return [t.name for f in FAMILIES.values() for t in f.tiny_models]


__all__ = ["FAMILIES", "Family", "FamilyRule", "TinyModel", "text_config", "register_family", "all_families", "get_family", "chat_templates", "detect", "find_tiny", "tiny_names"]
