"""Axolotl's keys as Axolotl users write them, turned into archtune's schema before validation.

Runs on the raw mapping (after overrides, before pydantic) and, following the key table
(config/axolotl_keys.py):
- drops empty values (`wandb_entity:` means unset, as in Axolotl);
- reads `fsdp_config` in both spellings (Axolotl's current unprefixed keys and the older
  `fsdp_`-prefixed ones) and the top-level `fsdp_version`;
- removes class-2 keys, keeping a note (key, reason) for each one set to a value that asks for
  something; `archtune check` prints the notes;
- reports class-3 keys set to such a value as problems naming what archtune does instead.
Keys that are neither are left for the schema (honored fields, or unknown: did-you-mean).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import re

from archtune.config.axolotl_keys import SECTIONS, VALUE_REFUSALS, VALUES_ACCEPTED_WITH, asks_for_something
from archtune.errors import Problem

Where = Callable[[tuple], str]  # key path -> " (cfg.yaml:12)"


@dataclass
class Translated:
    problems: list[Problem] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (dotted key, why it has no effect)


def translate_axolotl_keys(data: dict, where: Where) -> Translated:
    """Rewrite `data` in place (see the module docstring); returns the problems and notes."""
    from archtune.config.schema import Config, DatasetConfig, ExportConfig, FsdpConfig

    out = Translated()
    _drop_empty(data)
    _fsdp_version(data)
    _aliases(data, out, where)
    _sort_section(data, (), "config", set(Config.model_fields), out, where)
    for list_key in ("datasets", "test_datasets"):
        entries = data.get(list_key)
        if isinstance(entries, list):
            for i, entry in enumerate(entries):
                if isinstance(entry, dict):
                    _drop_empty(entry)
                    _sort_section(entry, (list_key, i), "datasets", set(DatasetConfig.model_fields), out, where)
    fsdp = data.get("fsdp_config")
    if isinstance(fsdp, dict):
        _drop_empty(fsdp)
        _fsdp_spelling(fsdp, out, where)
        _sort_section(fsdp, ("fsdp_config",), "fsdp_config", set(FsdpConfig.model_fields), out, where)
    export = data.get("export")
    if isinstance(export, dict):
        _drop_empty(export)
        _sort_section(export, ("export",), "export", set(ExportConfig.model_fields), out, where)
    tokens = data.get("special_tokens")
    if isinstance(tokens, dict):
        _drop_empty(tokens)
        _sort_section(tokens, ("special_tokens",), "special_tokens", set(), out, where)
    return out


def _drop_empty(mapping: dict) -> None:
    for key in [k for k, v in mapping.items() if v is None]:
        del mapping[key]


def _sort_section(mapping: dict, path: tuple, section: str, fields: set[str], out: Translated, where: Where) -> None:
    _, no_effect, refused = SECTIONS[section]
    for key in list(mapping):
        if not isinstance(key, str) or key in fields:
            continue
        plain = _unprefixed(key) if section == "fsdp_config" else key
        value = mapping[key]
        dotted = ".".join(str(p) for p in (*path, key))
        refusal = VALUE_REFUSALS.get(plain) if section == "config" else None
        if refusal and asks_for_something(value) and not _value_accepted(mapping, plain, str(value)):
            del mapping[key]
            out.problems.append(Problem(dotted, f"`{key}: {_short(value)}` is refused: {refusal[1]}"
                                        + where((*path, key)), f"remove `{key}`"))
        elif plain in no_effect:
            del mapping[key]
            if asks_for_something(value):
                out.notes.append((dotted, no_effect[plain]))
        elif plain in refused:
            del mapping[key]
            if asks_for_something(value, plain):
                out.problems.append(Problem(dotted, f"`{key}: {_short(value)}` is refused: {refused[plain]}"
                                            + where((*path, key)),
                                            f"remove `{key}`" + ("" if path else f" (or set `{key}: null`)")))


def _value_accepted(config: dict, key: str, value: str) -> bool:
    """A value VALUE_REFUSALS accepts, or one VALUES_ACCEPTED_WITH accepts because its other key is set."""
    if re.fullmatch(VALUE_REFUSALS[key][0], value):
        return True
    other, pattern = VALUES_ACCEPTED_WITH.get(key, (None, ""))
    return other is not None and asks_for_something(config.get(other)) and re.fullmatch(pattern, value) is not None


def _unprefixed(key: str) -> str:
    return key[len("fsdp_"):] if key.startswith("fsdp_") and key != "fsdp_version" else key


_ATTENTION_FLAGS = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "flex_attention": "flex_attention",
                    "eager_attention": "eager"}
_RENAMED = {"revision_of_model": "model_revision", "evaluation_strategy": "eval_strategy",
            "model_config": "overrides_of_model_config", "model_kwargs": "overrides_of_model_kwargs"}


def _aliases(data: dict, out: Translated, where: Where) -> None:
    """Axolotl spellings of keys archtune honors under another name."""
    for flag, impl in _ATTENTION_FLAGS.items():
        if flag not in data:
            continue
        on = data.pop(flag)
        if on is True and "attn_implementation" not in data:
            data["attn_implementation"] = impl
        elif on is True and data["attn_implementation"] != impl:
            out.problems.append(Problem(flag, f"{flag}: true asks for {impl}, but attn_implementation is "
                                        f"{data['attn_implementation']!r}" + where((flag,)),
                                        f"keep one: remove `{flag}` (attn_implementation is the current key)"))
    for old, new in _RENAMED.items():
        if old in data:
            value = data.pop(old)
            if new in data and data[new] != value:
                out.problems.append(Problem(old, f"`{old}` and `{new}` are the same setting with different values"
                                            + where((old,)), f"keep `{new}` only"))
            data.setdefault(new, value)
    if "chat_template_jinja" in data:
        text = data.pop("chat_template_jinja")
        if data.get("chat_template") in (None, "jinja"):
            data["chat_template"] = text
        else:
            out.problems.append(Problem("chat_template_jinja", "chat_template_jinja is set but chat_template is "
                                        f"{data['chat_template']!r}" + where(("chat_template_jinja",)),
                                        "set `chat_template: jinja` (or remove chat_template_jinja)"))
    elif data.get("chat_template") == "jinja":
        out.problems.append(Problem("chat_template", "chat_template: jinja needs the template text in "
                                    "chat_template_jinja" + where(("chat_template",)),
                                    "add `chat_template_jinja: '{% for m in messages %}...{% endfor %}'`"))
    if "auto_resume_from_checkpoints" in data:
        if data.pop("auto_resume_from_checkpoints") is True:
            data.setdefault("resume_from_checkpoint", "auto")


def _fsdp_version(data: dict) -> None:
    """Top-level `fsdp_version: N` is fsdp_config's version (Axolotl keeps both in step)."""
    if "fsdp_version" not in data:
        return
    version = data.pop("fsdp_version")
    fsdp = data.get("fsdp_config")
    if fsdp is None:
        data["fsdp_config"] = {"fsdp_version": version}
    elif isinstance(fsdp, dict):
        fsdp.setdefault("fsdp_version", version)


def _fsdp_spelling(fsdp: dict, out: Translated, where: Where) -> None:
    """Axolotl's unprefixed keys (`offload_params`, `version`) -> archtune's `fsdp_`-prefixed fields."""
    from archtune.config.schema import FsdpConfig

    fields = set(FsdpConfig.model_fields)
    for key in list(fsdp):
        if not isinstance(key, str) or key in fields:
            continue
        target = "fsdp_version" if key == "version" else f"fsdp_{key}"
        if target not in fields:
            continue
        if target in fsdp:
            out.problems.append(Problem(f"fsdp_config.{key}", f"`{key}` and `{target}` are the same setting, given "
                                        "twice" + where(("fsdp_config", key)), f"keep one of them (`{key}`)"))
            del fsdp[key]
            continue
        fsdp[target] = fsdp.pop(key)


def _short(value: Any) -> str:
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."
