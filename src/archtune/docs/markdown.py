"""Markdown and YAML formatting for the generated docs (deterministic: keys in order, sets sorted)."""
from __future__ import annotations

import re
from typing import Any

import yaml


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return "'" + text.replace("'", "''") + "'"


def yaml_block(data: dict[str, Any], indent: int = 0) -> str:
    """Block-style YAML of a nested dict (lists of scalars or dicts), strings quoted only when
    needed (a regex always is): the style of the reference's snippets. yaml.safe_load gives
    `data` back."""
    pad = " " * indent
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            lines.append(yaml_block(value, indent + 2))
        elif isinstance(value, list) and value:
            lines.append(f"{pad}{key}:")
            for item in value:
                if isinstance(item, dict):
                    first, *rest = yaml_block(item, indent + 4).splitlines()
                    lines.append(f"{pad}  - {first.strip()}")
                    lines.extend(rest)
                else:
                    lines.append(f"{pad}  - {yaml_scalar(item)}")
        else:
            lines.append(f"{pad}{key}: {yaml_scalar(value)}")
    return "\n".join(lines)


def fence(text: str, lang: str = "yaml") -> str:
    return f"```{lang}\n{text}\n```"


def flow(value: Any) -> str:
    """A value as inline YAML: scalars as in yaml_block, lists as [a, b], dicts as {k: v}."""
    if isinstance(value, list):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    return yaml_scalar(value)


def inline_code(text: str) -> str:
    ticks = "``" if "`" in text else "`"
    return f"{ticks}{text}{ticks}"


def table_cell(text: str) -> str:
    """Text fit for one Markdown table cell (one line, pipes escaped)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def sentence(text: str) -> str:
    text = _inline_yaml(str(text))
    return text if text.endswith((".", "!", "?", "`")) else text + "."


def _inline_yaml(text: str) -> str:
    """A message whose tail after the first line is YAML to add ("...add:\nkey:\n  - a") on one
    line, the YAML as inline code (`key: [a]`)."""
    head, sep, tail = text.partition("\n")
    if sep:
        try:
            data = yaml.safe_load(tail)
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict) and data:
            return one_line(head) + " " + ", ".join(inline_code(f"{k}: {flow(v)}") for k, v in data.items())
    return one_line(text)


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def first_paragraph(doc: str | None) -> str:
    return one_line((doc or "").strip().split("\n\n")[0])
