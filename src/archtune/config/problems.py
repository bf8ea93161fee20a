"""Pydantic's validation errors turned into sentences: each Problem names its key (or FILE:LINE)
and the fix. Unknown keys get a "did you mean" hint, Axolotl keys archtune does not support yet
are named as such, and cross-field rules (schema's CROSS_FIELD_RULES) are checked even when
other keys failed."""
from __future__ import annotations

import difflib
import json
import types
import typing
from functools import lru_cache
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from archtune.config.axolotl_keys import AXOLOTL_DATASET_KEYS, AXOLOTL_KEYS, UNSUPPORTED_VALUE_HINTS
from archtune.config.schema import Config, DatasetConfig, cross_field_problems
from archtune.errors import Problem

KeyPath = tuple[str | int, ...]  # a key path: ("datasets", 0, "path")

class KeyLocation:
    """Where a key came from, appended to messages: "(config.yaml:12)" or "(from override `k=v`)"."""

    def __init__(self, source: str, lines: dict[KeyPath, int], sources: dict[KeyPath, str]):
        self.source, self.lines, self.sources = source, lines, sources

    def __call__(self, path: KeyPath) -> str:
        for n in range(len(path), 0, -1):
            p = path[:n]
            if p in self.sources:
                return f" (from override `{self.sources[p]}`)"
            if p in self.lines:
                return f" ({self.source}:{self.lines[p]})"
        return ""

    def line(self, key: str) -> float:
        path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return float("inf")


class _Err:
    """A pydantic error with its location cleaned of union tags, plus what the schema says there."""

    def __init__(self, err: dict):
        self.err = err
        self.type: str = err["type"]
        self.input = err.get("input")
        self.ctx: dict = err.get("ctx") or {}
        (self.path, self.unions, self.ann, self.field, self.model) = walk_schema(err["loc"])

    @property
    def key(self) -> str:
        return ".".join(str(p) for p in self.path) or "config"


def walk_schema(loc: tuple) -> tuple[KeyPath, list[int], Any, FieldInfo | None, type[BaseModel] | None]:
    """Walk `loc` through the schema's types. Returns the path without union tags, the path
    lengths at which a union tag was dropped, the annotation at the end, the last field
    passed and the model that holds the last key."""
    cur: Any = Config
    path: list[str | int] = []
    unions: list[int] = []
    field: FieldInfo | None = None
    model: type[BaseModel] | None = None
    for part in loc:
        cur = _strip_optional(cur)
        if _is_union(cur) and isinstance(part, str):
            unions.append(len(path))
            cur = next((a for a in _union_args(cur) if _tag_matches(part, a)), None)
            continue
        path.append(part)
        if isinstance(cur, type) and issubclass(cur, BaseModel):
            model = cur
            field = cur.model_fields.get(part) if isinstance(part, str) else None
            cur = field.annotation if field is not None else None
        elif typing.get_origin(cur) in (list, tuple, set):
            args = typing.get_args(cur)
            cur = args[0] if args else None
        elif typing.get_origin(cur) is dict:
            args = typing.get_args(cur)
            cur = args[1] if len(args) == 2 else None
        else:
            cur = None
    return tuple(path), unions, _strip_optional(cur), field, model


def _is_union(t: Any) -> bool:
    return typing.get_origin(t) in (Union, types.UnionType)


def _union_args(t: Any) -> list[Any]:
    return [a for a in typing.get_args(t) if a is not type(None)]


def _strip_optional(t: Any) -> Any:
    while True:
        if typing.get_origin(t) is Annotated:
            t = typing.get_args(t)[0]
        elif _is_union(t) and len(_union_args(t)) == 1:
            t = _union_args(t)[0]
        else:
            return t


def _tag_matches(tag: str, t: Any) -> bool:
    """Pydantic names union members 'str', 'list[str]', "literal['auto']", 'DatasetConfig'."""
    origin = typing.get_origin(t)
    if origin is Literal:
        return tag.startswith("literal[")
    if origin is not None:
        return tag.startswith(getattr(origin, "__name__", str(origin)) + "[") or tag == getattr(origin, "__name__", "")
    return tag == getattr(t, "__name__", None)


def problems_from(e: ValidationError, data: dict, where: KeyLocation) -> list[Problem]:
    errs = [_Err(x) for x in e.errors()]
    # In a union, report the member the input was shaped like: when one member's errors lie
    # deeper (a list whose item 1 is wrong), drop the others' "must be a string" at the top.
    deep = {(e_.path[:u], u) for e_ in errs for u in e_.unions if len(e_.path) > u}
    errs = [x for x in errs if not any(len(x.path) == u and (x.path[:u], u) in deep for u in x.unions)]

    groups: dict[KeyPath, list[_Err]] = {}
    for x in errs:
        groups.setdefault(x.path, []).append(x)

    problems: list[Problem] = []
    for path, group in groups.items():
        problems.extend(_group_problems(path, group, where))

    if not any(x.type == "cross_field" for x in errs):
        # pydantic runs model validators only when every field is valid: check the rules
        # between the keys that are valid, so the user sees those problems now too.
        problems.extend(_fallback_cross_field(data, {x.path[0] for x in errs if x.path}, where))
    problems.sort(key=lambda p: where.line(p.key))  # file order (stable; the rest keep schema order)
    return problems


def _group_problems(path: KeyPath, group: list[_Err], where: KeyLocation) -> list[Problem]:
    first = group[0]
    key = first.key
    leaf = str(path[-1]) if path else "config"
    at = where(path)
    kinds = {x.type for x in group}

    if "cross_field" in kinds:
        out = []
        for x in group:
            for k, message, fix in x.ctx.get("problems", ()):
                out.append(Problem(k, message + where((k,)), fix))
        return out
    if "extra_forbidden" in kinds:
        return [_unknown_key(path, first.model, at)]
    if "missing" in kinds:
        return [Problem(key, "required key missing" + at, _required_fix(leaf, first.field))]
    if "invalid_key" in kinds:
        return [Problem(key, f"keys must be text; got {show_value(first.input)}" + at, "quote the key or remove it")]

    messages = [x for x in group if x.type in ("value_error", "assertion_error", "assertion_failed")]
    if messages or not path:
        out = []
        for x in messages or group:
            text = str(x.ctx.get("error") or x.err.get("msg", "invalid value"))
            if not path:  # a model-level validator someone added: find the key its text starts with
                k = _key_from_text(text)
                out.append(Problem(k or "config", text, _field_fix(k, Config.model_fields.get(k or ""))))
            else:
                out.append(Problem(key, f"{text}; got {show_value(x.input)}" + at, _field_fix(key, x.field)))
        return out

    wants = _merge_expectations([_expectation(x) for x in group])
    message = f"must be {wants}; got {show_value(first.input)}"
    fix = _type_fix(key, leaf, group)
    hint = UNSUPPORTED_VALUE_HINTS.get(leaf, {}).get(first.input) if isinstance(first.input, str) else None
    if hint:
        message += f" ('{first.input}' is an Axolotl value that archtune does not support yet)"
        fix = hint
    return [Problem(key, message + at, fix)]


def _unknown_key(path: KeyPath, model: type[BaseModel] | None, at: str) -> Problem:
    name = str(path[-1])
    key = ".".join(str(p) for p in path)
    if not name.strip():  # an empty or blank key would print as nothing: show it quoted
        key = ".".join([*(str(p) for p in path[:-1]), repr(name)])
        return Problem(key, f"a key is blank ({name!r})" + at, "remove it, or write the key's name")
    if not name.isprintable():  # control characters would act on the terminal
        return Problem(key, f"unknown key {name!r} (it holds control characters)" + at,
                       "remove it, or retype the key's name")
    fields = list(model.model_fields) if model is not None else []
    axolotl: frozenset[str] = frozenset()
    if model is not None and issubclass(model, Config):
        axolotl = AXOLOTL_KEYS
    elif model is not None and issubclass(model, DatasetConfig):
        axolotl = AXOLOTL_DATASET_KEYS
    if name in axolotl and name not in fields:  # every Axolotl key has a class (test_axolotl_keys): a fallback
        return Problem(key, f"`{name}` is an Axolotl key that archtune does not support yet" + at, f"remove `{name}`")
    normal = name.strip().lower().replace("-", "_").replace(" ", "_")
    close = [normal] if normal in fields else _close_spellings(normal, fields)
    if close:
        fix = "did you mean " + " or ".join(f"`{c}`" for c in close) + "?"
    elif model is DatasetConfig:
        fix = "remove it; a dataset entry takes: " + ", ".join(fields)
    else:
        fix = "remove it, or check the spelling (`archtune check --json` lists every key archtune knows)"
    return Problem(key, f"unknown key `{name}`" + at, fix)


def _close_spellings(name: str, candidates: list[str]) -> list[str]:
    """Keys that differ from `name` by a typo: close in spelling AND within a few edits, so that a
    key of another meaning that merely shares words (fsdp_use_orig_params / fsdp_offload_params)
    is never proposed."""
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.75)
    return [c for c in close if _edits(name, c) <= max(2, len(name) // 6)]


def _edits(a: str, b: str) -> int:
    """Levenshtein distance."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


_REQUIRED_EXAMPLES = {
    "base_model": "add `base_model: Qwen/Qwen3-0.6B` (a hub id, a local directory, or tiny:NAME for an embedded tiny model)",
    "datasets": "add a list of data sets, e.g.\n    datasets:\n      - path: data.jsonl\n        type: alpaca",
    "path": "add `path: data.jsonl` (a local file or directory, or a hub dataset id) to this entry",
}


def _required_fix(leaf: str, field: FieldInfo | None) -> str:
    if leaf in _REQUIRED_EXAMPLES:
        return _REQUIRED_EXAMPLES[leaf]
    desc = f" ({field.description})" if field is not None and field.description else ""
    return f"add `{leaf}: ...`{desc}"


def _field_fix(key: str | None, field: FieldInfo | None) -> str:
    if not key:
        return "fix the keys named in the message"
    if field is not None and field.description:
        return f"`{key}`: {field.description}"
    return f"change `{key}`"


def _key_from_text(text: str) -> str | None:
    word = text.replace("Value error, ", "", 1).split(maxsplit=1)[0].strip("`'\":,") if text.strip() else ""
    return word if word in Config.model_fields else None


_PHRASES = {
    "bool_type": ["true", "false"], "bool_parsing": ["true", "false"],
    "int_type": "a whole number", "int_parsing": "a whole number", "int_from_float": "a whole number",
    "int_parsing_size": "a whole number", "float_type": "a number", "float_parsing": "a number",
    "finite_number": "a finite number", "string_type": "text", "string_unicode": "text",
    "list_type": "a list", "tuple_type": "a list", "set_type": "a list",
    "dict_type": "a mapping (key: value)", "model_type": "a mapping (key: value)",
    "model_attributes_type": "a mapping (key: value)", "none_required": ["null"],
}


_BOUNDS = {"greater_than": ("gt", "greater than"), "greater_than_equal": ("ge", "at least"),
           "less_than": ("lt", "less than"), "less_than_equal": ("le", "at most")}


def _expectation(x: _Err) -> str | list[str]:
    """A phrase ("a whole number") or the list of allowed values (["alpaca", "completion"])."""
    if x.type == "literal_error":
        ann = x.ann if typing.get_origin(x.ann) is Literal else None
        if ann is not None:
            return [v if isinstance(v, str) else show_value(v) for v in typing.get_args(ann)]
        return "one of " + str(x.ctx.get("expected", "the allowed values"))
    if x.type in _BOUNDS:
        name, words = _BOUNDS[x.type]
        bound = x.ctx.get(name)
        return f"{words} {int(bound) if isinstance(bound, float) and bound.is_integer() else bound}"
    if x.type in ("too_short", "too_long"):
        n = x.ctx.get("min_length" if x.type == "too_short" else "max_length")
        return f"{'at least' if x.type == 'too_short' else 'at most'} {n} item{'s' if n != 1 else ''}"
    phrase = _PHRASES.get(x.type)
    if phrase is not None:
        return phrase
    msg = str(x.err.get("msg", "valid"))
    return msg[len("Input should be "):] if msg.startswith("Input should be ") else msg[:1].lower() + msg[1:]


def _values(expectation: str | list[str]) -> list[str]:
    return expectation if isinstance(expectation, list) else []


def _merge_expectations(parts: list[str | list[str]]) -> str:
    values: list[str] = []
    phrases: list[str] = []
    for p in parts:
        for item in (p if isinstance(p, list) else [p]):
            target = values if isinstance(p, list) else phrases
            if item not in target:
                target.append(item)
    if values:
        phrases.insert(0, " or ".join(values) if len(values) <= 2 else "one of " + ", ".join(values))
    return " or ".join(phrases) if phrases else "valid"


def _type_fix(key: str, leaf: str, group: list[_Err]) -> str:
    x = group[0]
    kinds = {e.type for e in group}
    if "literal_error" in kinds and isinstance(x.input, str):
        allowed = [v for e in group for v in _values(_expectation(e))]
        close = difflib.get_close_matches(x.input, allowed, n=1, cutoff=0.5)
        if close:
            return f"did you mean `{leaf}: {close[0]}`?"
        return f"use one of: {', '.join(allowed)}"
    if kinds & set(_BOUNDS):
        default = x.field.get_default(call_default_factory=True) if x.field is not None and not x.field.is_required() else None
        return f"set `{key}` to a value {_expectation(x)}" + (f" (default: {show_value(default)})" if default is not None else "")
    if kinds <= {"string_type"} and isinstance(x.input, (int, float, bool)):
        shown = show_value(x.input)
        return f"quote it: `{leaf}: '{shown}'`" if not leaf.isdigit() else f"quote it: '{shown}'"
    if kinds & {"bool_type", "bool_parsing"} and len(kinds) == 1:
        return f"write `{leaf}: true` or `{leaf}: false`"
    return _field_fix(key, x.field)


def _fallback_cross_field(data: dict, failed: set, where: KeyLocation) -> list[Problem]:
    bad = set(failed)
    values: dict[str, Any] = {}
    for name, field in Config.model_fields.items():
        if name in bad:
            continue
        if name in data:
            try:
                values[name] = _field_adapter(name).validate_python(data[name])
            except ValidationError:
                bad.add(name)
        elif field.is_required():
            bad.add(name)
        else:
            values[name] = field.get_default(call_default_factory=True)
    try:
        broken = cross_field_problems(types.SimpleNamespace(**values), skip=bad)
    except AttributeError:  # a rule read a key it did not declare, and that key is invalid
        return []
    return [Problem(k, m + where((k,)), f) for k, m, f in broken]


@lru_cache(maxsize=None)
def _field_adapter(name: str) -> TypeAdapter:
    field = Config.model_fields[name]
    return TypeAdapter(Annotated[field.annotation, field])


def show_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        text = repr(v)
    else:
        try:
            text = json.dumps(v, default=str)
        except (TypeError, ValueError):
            text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def kind(v: Any) -> str:
    if isinstance(v, list):
        return "a list"
    if isinstance(v, str):
        return f"the text {show_value(v)}"
    return show_value(v)


def dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[str, str]] = set()
    out = []
    for p in problems:
        if (p.key, p.message) not in seen:
            seen.add((p.key, p.message))
            out.append(p)
    return out
