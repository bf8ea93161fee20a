"""Read a config: YAML + `key=value` overrides -> a validated `Config`, or one `UserError`.

Every problem names its key (dotted, e.g. `datasets.0.type`) or `FILE:LINE` and says how to
fix it; all problems are gathered and raised together. The steps: yaml_lines.py
reads the file (with the line of every key), overrides.py applies `key=value`, the schema
validates, and problems.py turns pydantic's errors into sentences, so the schema stays plain.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError

from archtune.config.axolotl import translate_axolotl_keys
from archtune.config.schema import Config
from archtune.errors import Problem, UserError
from archtune.config.overrides import apply_overrides, deepcopy, parse_override
from archtune.config.problems import KeyPath, dedupe, kind, problems_from, show_value, KeyLocation
from archtune.config.yaml_lines import read_yaml

__all__ = ["load_config", "config_from_dict", "parse_override", "config_to_dict", "flatten"]




def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read the YAML file at `path`, apply `key=value` overrides, validate.

    Raises UserError with every problem found (file, YAML syntax, overrides, keys, values).
    """
    data, lines = read_yaml(Path(path))
    cfg = _build(data, list(overrides or ()), source=str(path), lines=lines)
    cfg._source_dir = str(Path(path).resolve().parent)
    return cfg


def config_from_dict(data: dict[str, Any], overrides: Iterable[str] = (), *, source: str = "<config>") -> Config:
    """Like load_config for a mapping already in memory (it is not modified)."""
    if not isinstance(data, dict):
        raise UserError.single(source, f"the config must be a mapping of key: value; got {kind(data)}",
                               "write one `key: value` per line at the top level")
    return _build(deepcopy(data), list(overrides or ()), source=source, lines={})


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Every field of the config (defaults included), JSON-able."""
    return cfg.model_dump(mode="json")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys: {"gradient_checkpointing_kwargs.use_reentrant": False,
    "datasets.0.path": "a.jsonl", ...}. Lists holding mappings are indexed (`datasets.0.path`);
    lists of plain values (`lora_target_modules`) and empty mappings stay whole values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, list) and any(isinstance(x, dict) for x in v):
            for i, item in enumerate(v):
                if isinstance(item, dict) and item:
                    out.update(flatten(item, f"{key}.{i}."))
                else:
                    out[f"{key}.{i}"] = item
        else:
            out[key] = v
    return out


def _build(data: dict, overrides: list[str], source: str, lines: dict[KeyPath, int]) -> Config:
    written = set(data)
    problems, sources = apply_overrides(data, overrides, lines)
    bad_keys = [k for k in data if not isinstance(k, str)]
    for k in bad_keys:
        problems.append(Problem(str(k), f"keys must be text; got {show_value(k)}", f"quote it ('{k}') or remove it"))
        del data[k]
    where = KeyLocation(source, lines, sources)
    if data.get("strict") is True:
        added = sorted({str(p[0]) for p in sources} - written)
        problems += [Problem(k, f"strict: true, and the override of `{k}` names a key the config file does not set"
                             + where((k,)), f"add `{k}` to the config file, or set `strict: false`") for k in added]
    translated = translate_axolotl_keys(data, where)
    problems += translated.problems
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        problems.extend(problems_from(e, data, where))
    else:
        if not problems:
            cfg._axolotl_notes = translated.notes
            return cfg
    raise UserError(dedupe(problems))
