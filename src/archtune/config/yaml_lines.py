"""The config file as YAML, with the line of every key (for FILE:LINE in messages), duplicate
keys and PyYAML's syntax errors turned into Problems with a fix."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from archtune.errors import Problem, UserError

from archtune.config.problems import KeyPath, kind

_YAML_FIXES = (  # (words in PyYAML's problem text, the fix)
    ("mapping values are not allowed", "a value holds ': ' or the line is indented under a plain value: "
     "quote the value ('...'), or fix the indentation"),
    ("cannot start any token", "YAML indents with spaces, not tabs: replace the tabs with spaces"),
    ("could not find expected ':'", "write `key: value` (a space after the colon), or close the quote "
     "opened on this line"),
    ("expected <block end>", "line this key up with the other keys of the same mapping (same indentation)"),
    ("end of stream", "close the quote or bracket opened on this line"),
    ("expected ',' or ']'", "close the list with `]` (quote items that contain ':' or ',')"),
    ("expected ',' or '}'", "close the mapping with `}` (quote values that contain ':' or ',')"),
    ("undefined alias", "values that start with `*` or `&` must be quoted: 'like *this'"),
    ("found character '@'", "values that start with `@` or a backtick must be quoted"),
    ("found character '`'", "values that start with `@` or a backtick must be quoted"),
    ("could not determine a constructor", "values that start with `!` must be quoted"),
)


# The mark closest to the real mistake: for these, the error is found later than it is made.
_CONTEXT_FIRST = ("while scanning a simple key", "while scanning a quoted scalar", "while parsing a flow",
                  "while scanning a double-quoted", "while scanning a single-quoted")


def read_yaml(path: Path) -> tuple[Any, dict[KeyPath, int]]:
    where = str(path)
    if not path.exists():
        raise UserError.single(where, "config file not found",
                               f"check the path (working directory: {Path.cwd()})")
    if path.is_dir():
        raise UserError.single(where, "is a directory, not a config file", "pass the path of a .yaml file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError.single(where, f"cannot read the config: {e}", "pass a readable UTF-8 YAML file") from None

    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters first (ReaderError)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        raise UserError([_yaml_problem(where, e)]) from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise UserError.single(f"{where}:{line}", f"the character {chr(e.character)!r} is not allowed in YAML",
                               "remove it (control characters cannot appear in a YAML file, even quoted)") from None
    except yaml.YAMLError as e:  # pragma: no cover - every other PyYAML parse error is marked
        raise UserError.single(where, f"invalid YAML: {e}", "fix the YAML syntax") from None
    except RecursionError:
        raise _too_deep(where) from None
    finally:
        if loader is not None:
            loader.dispose()

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError.single(where, f"the top level must be a mapping of `key: value` lines; got {kind(data)}",
                               "write one `key: value` per line, starting at column 0 (e.g. `base_model: ...`)")
    lines: dict[KeyPath, int] = {}
    dupes: list[Problem] = []
    if node is not None:
        try:
            _walk_nodes(node, (), lines, dupes, where)
        except RecursionError:
            raise _too_deep(where) from None
    if dupes:
        raise UserError(dupes)
    return data, lines


def _too_deep(where: str) -> UserError:
    return UserError.single(where, "the YAML nests lists or mappings too deeply to read",
                            "flatten the deeply nested value (brackets opened hundreds of levels deep)")


def _yaml_problem(where: str, e: yaml.MarkedYAMLError) -> Problem:
    mark = e.problem_mark
    if e.context_mark is not None and e.context and e.context.startswith(_CONTEXT_FIRST):
        mark = e.context_mark
    line = mark.line + 1 if mark is not None else 1
    problem = (e.problem or "invalid YAML").strip()
    message = f"YAML syntax error: {problem}"
    if e.context and e.context_mark is not None and e.context_mark.line + 1 != line:
        message += f" ({e.context} started at line {e.context_mark.line + 1})"
    fix = next((f for words, f in _YAML_FIXES if words in problem), "fix the YAML syntax on this line "
               "(indent with spaces; quote values that contain ': ' or start with a special character)")
    return Problem(f"{where}:{line}", message, fix)


def _walk_nodes(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], dupes: list[Problem], where: str) -> None:
    """Record the line of each key path; report duplicate keys (YAML would keep the last silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            line = key_node.start_mark.line + 1
            key = key_node.value
            if key in seen:
                shown = ".".join(str(p) for p in (*path, key))
                dupes.append(Problem(f"{where}:{line}", f"duplicate key `{shown}` (first at line {seen[key]})",
                                     "keep one of them: YAML would silently use the last"))
                continue
            seen[key] = line
            lines[(*path, key)] = line
            _walk_nodes(value_node, (*path, key), lines, dupes, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _walk_nodes(item, (*path, i), lines, dupes, where)
