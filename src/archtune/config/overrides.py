"""`key=value` overrides from the command line, applied to the config mapping before validation
(dotted keys, list indices, YAML scalars and flow collections)."""
from __future__ import annotations

from typing import Any

import yaml

from archtune.errors import Problem

from archtune.config.problems import KeyPath, walk_schema, show_value

def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value). The value is read as a YAML scalar or flow collection
    (`10`, `true`, `null`, `[q_proj, v_proj]`, `{use_reentrant: false}`); anything else,
    e.g. a regex such as `.*\\.(q|v)_proj` or `tiny:llama`, stays the exact string.
    Raises ValueError when there is no `=` or no key."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(text)
    return key, _parse_value(raw)


def _parse_value(raw: str) -> Any:
    s = raw.strip()
    try:
        value = yaml.safe_load(s)
    except yaml.YAMLError:
        return raw  # e.g. a regex starting with `*` or `[^`: a string
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, dict)) and s[:1] in "[{":
        return value
    if isinstance(value, str) and s[:1] in "'\"":
        return value  # an explicitly quoted string, unquoted
    return raw  # any other string stays exactly as typed (no comment or quote stripping)


def apply_overrides(data: dict, overrides: list[str], lines: dict[KeyPath, int]) -> tuple[list[Problem], dict[KeyPath, str]]:
    problems: list[Problem] = []
    sources: dict[KeyPath, str] = {}
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ValueError:
            problems.append(Problem(text if text.strip() else repr(text), "an override must be `key=value`",
                                    "write it as key=value, e.g. max_steps=10 or datasets.0.path=data.jsonl"))
            continue
        segs = key.split(".")
        if any(not s.strip() for s in segs):
            problems.append(Problem(key, f"override `{text}` has an empty key segment",
                                    "separate nested keys with single dots, e.g. gradient_checkpointing_kwargs.use_reentrant=false"))
            continue
        try:
            path = _set_path(data, segs, value)
        except _OverrideError as e:
            problems.append(Problem(key, f"cannot apply override `{text}`: {e.message}", e.fix))
            continue
        for p in [p for p in lines if p[: len(path)] == path]:
            del lines[p]  # the file's lines no longer describe what is under this path
        for p in [p for p in sources if p[: len(path)] == path]:
            del sources[p]
        sources[path] = text
    return problems, sources


class _OverrideError(Exception):
    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.message, self.fix = message, fix


def _set_path(data: dict, segs: list[str], value: Any) -> KeyPath:
    cur: Any = data
    path: list[str | int] = []
    for i, seg in enumerate(segs):
        last = i == len(segs) - 1
        here = ".".join(str(p) for p in path)
        fresh = ([] if not last and segs[i + 1].isdigit() else {})
        if isinstance(cur, list):
            if not seg.isdigit():
                raise _OverrideError(f"`{here}` is a list, so `{seg}` must be an item index",
                                     f"use an index, e.g. {here}.0.{'.'.join(segs[i:])}=...")
            idx = int(seg)
            if idx > len(cur):
                raise _OverrideError(
                    f"index {idx} is out of range: `{here}` has {len(cur)} item{'s' if len(cur) != 1 else ''}",
                    f"use an index from 0 to {len(cur)} ({len(cur)} adds an item)")
            if idx == len(cur):
                cur.append(value if last else fresh)
            elif last:
                cur[idx] = value
            elif cur[idx] is None:
                cur[idx] = fresh
            path.append(idx)
            cur = cur[idx]
        elif isinstance(cur, dict):
            k: str | int = seg
            if seg not in cur and seg.isdigit() and int(seg) in cur:
                k = int(seg)
            if last:
                cur[k] = value
            elif cur.get(k) is None:
                cur[k] = _default_container((*path, k), fresh)
            path.append(k)
            cur = cur[k]
        else:
            raise _OverrideError(f"`{here}` is {show_value(cur)}, not a mapping or a list",
                                 f"set `{here}` itself, or make it a mapping first")
    return tuple(path)


def _default_container(path: KeyPath, fresh: dict | list) -> dict | list:
    """A nested override under a key that is unset starts from the field's default mapping, so
    `datasets.0.message_property_mappings.role=from` keeps the default `content` entry."""
    if not isinstance(fresh, dict):
        return fresh
    _, _, _, field, model = walk_schema(path)
    if field is None or model is None or field.is_required() or model.model_fields.get(str(path[-1])) is not field:
        return fresh
    default = field.get_default(call_default_factory=True)
    return deepcopy(default) if isinstance(default, dict) else fresh


def deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [deepcopy(v) for v in data]
    return data
