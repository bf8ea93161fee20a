"""`archtune check`: resolve the Plan from the config and the model's config.json (never its
weights) and show it -- the settings the family or auto-detection changed, each with its
reason, then warnings, then errors.
"""
from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from archtune.config.schema import Config
from archtune.errors import UserError
from archtune.plan import Plan

SHOWN_SOURCES = ("family", "auto")


def check_plan(cfg: Config, world_size: int = 1) -> Plan:
    """The Plan for `cfg` as for `world_size` processes; reads config.json only (no weights).
    The same resolve as `archtune train` (models.load.resolve_plan)."""
    from archtune.models.load import resolve_plan

    return resolve_plan(cfg, world_size=world_size)


def error_json(exc: UserError, world_size: int = 1) -> dict:
    """The `check --json` object for a config that never became a Plan (schema, YAML, file errors):
    the Plan's shape, nothing resolved, `errors` filled."""
    return {"family": None, "model_type": None, "world_size": world_size, "settings": {}, "warnings": [],
            "errors": [p.to_dict() for p in exc.problems]}


def show_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def changed_settings(plan: Plan) -> list[tuple[str, Any, str, str]]:
    """(key, value, source, reason) of the settings the family or auto-detection decided."""
    return [(k, d.value, d.source, d.reason) for k, d in sorted(plan.settings.items()) if d.source in SHOWN_SOURCES]


def render_plan(plan: Plan, console: Console) -> None:
    """Human output: header, table of family/auto settings, warnings, errors (then `render_verdict`)."""
    processes = "1 process" if plan.world_size == 1 else f"{plan.world_size} processes"
    console.print(Text.assemble(("archtune check: ", "bold"), (plan.family.name, "bold cyan"),
                                f" (model_type {plan.model_type}), {processes}"))
    rows = changed_settings(plan)
    if rows:
        # The reason sits under its key: four columns leave each too narrow on an 80-column terminal.
        table = Table(title="settings decided by the family or auto-detection", title_justify="left",
                      show_lines=True, expand=True)
        table.add_column("key / reason", overflow="fold", ratio=5)
        table.add_column("value", overflow="fold", ratio=2)
        table.add_column("source", no_wrap=True)
        for key, value, source, reason in rows:
            table.add_row(Text.assemble((key, "bold"), "\n", (reason, "dim")), Text(show_value(value)), Text(source))
        console.print(table)
    else:
        console.print("no setting decided by the family or auto-detection")
    console.print(Text(f"{len(plan.settings)} settings in all; `archtune check --json` lists every one", style="dim"))
    for warning in plan.warnings:
        console.print(Text.assemble(("warning ", "bold yellow"), warning))
    for problem in plan.errors:
        line = Text.assemble(("error ", "bold red"), (problem.key, "bold"), f": {problem.message}")
        if problem.fix:
            line.append(f"\n  fix: {problem.fix}")
        console.print(line)


def render_verdict(plan: Plan, console: Console) -> None:
    """The last line: passed, or how many errors."""
    if plan.errors:
        n = len(plan.errors)
        console.print(Text(f"check failed: {n} error{'s' if n != 1 else ''}", style="bold red"))
    else:
        console.print(Text("check passed", style="bold green"))


__all__ = ["check_plan", "error_json", "render_plan", "render_verdict", "changed_settings", "show_value"]
