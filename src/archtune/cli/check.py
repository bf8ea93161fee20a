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
    The same resolve as `archtune train` (models.load.resolve_plan), plus what train's data step
    will meet loading the processor of a multimodal model (models.load.processor_problems), and the
    warnings about an environment that is not the verified one (libraries outside their ranges,
    drifted patches)."""
    from archtune.models.load import processor_problems, resolve_plan
    from archtune.diagnostics.environment import environment_warnings

    plan = resolve_plan(cfg, world_size=world_size)
    if not plan.errors:
        processor_problems(plan)
    plan.warnings.extend(environment_warnings())
    return plan


def error_json(exc: UserError, world_size: int = 1) -> dict:
    """The `check --json` object for a config that never became a Plan (schema, YAML, file errors):
    the Plan's shape, nothing resolved, `errors` filled."""
    return {"family": None, "model_type": None, "world_size": world_size, "settings": {}, "info": [], "warnings": [],
            "errors": [p.to_dict() for p in exc.problems]}


def launch_json(plan: Plan | None, nodes: list[dict], nproc: int, nnodes: int) -> dict:
    """The `check --json` "launch" object: the world the plan is for and what each node runs
    (train/launch.py `node_layout`); strategy and global batch are None without a plan."""
    from archtune.train.outputs import strategy_name

    return {"nproc_per_node": nproc, "nnodes": nnodes, "world_size": nproc * nnodes,
            "strategy": strategy_name(plan) if plan is not None else None,
            "micro_batch_size": plan.training.micro_batch_size if plan is not None else None,
            "gradient_accumulation_steps": plan.training.gradient_accumulation_steps if plan is not None else None,
            "global_batch_size": plan.training.global_batch_size if plan is not None else None,
            "nodes": nodes}


def render_launch(launch: dict, console: Console) -> None:
    """Human output for several processes: the world, the batch, and what each node runs."""
    nodes = launch["nodes"]
    console.print(Text.assemble(("world: ", "bold"), f"{launch['world_size']} processes ({launch['nproc_per_node']} "
                                f"per node x {launch['nnodes']} node{'s' if launch['nnodes'] != 1 else ''}), "
                                f"{launch['strategy']}; global batch {launch['global_batch_size']} rows per optimizer "
                                f"step ({launch['micro_batch_size']} per device x {launch['gradient_accumulation_steps']} "
                                f"accumulated x {launch['world_size']} processes)"))
    for node in nodes:
        ranks = node["global_ranks"]
        span = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        roles = [f"rank {node['prepares_data']} prepares the data into this node's cache"]
        if node["writes_outputs"] is not None:
            roles.append(f"rank {node['writes_outputs']} writes the outputs and checkpoints")
        console.print(Text.assemble((f"node {node['node_rank']}", "bold"), f": global ranks {span}; ",
                                    "; ".join(roles)))
        console.print(Text(f"  {node['command']}"), soft_wrap=True)
        console.print(Text(f"  or: {node['torchrun']}", style="dim"), soft_wrap=True)


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
    for line in plan.info:
        console.print(Text.assemble(("info ", "bold blue"), line))
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


# ---------------------------------------------------------------- --memory

def detected_gpu_memory() -> int | None:
    """Total memory of GPU 0 in bytes, or None without one."""
    try:
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None
    except Exception:  # a driver problem is not a check failure
        return None


def memory_check(plan: Plan, gpu_memory: str | None):
    """The Plan's memory estimate; with a budget (--gpu-memory, else the detected GPU's), a warning
    naming the settings that would make it fit when the estimate exceeds it."""
    from archtune.diagnostics.memory import estimate_memory, fitting_settings, parse_bytes
    from archtune.plan.structure import StructureUnavailable

    try:
        budget = parse_bytes(gpu_memory) if gpu_memory else detected_gpu_memory()
    except ValueError as exc:
        plan.error("--gpu-memory", str(exc), "give a size such as 80GiB or 24GB")
        return None
    try:
        estimate = estimate_memory(plan)
    except StructureUnavailable as exc:
        plan.warn(f"no memory estimate: the model cannot be built from its config.json ({exc})")
        return None
    if budget is not None and estimate.peak_bytes > budget:
        fits = fitting_settings(plan, budget)
        advice = ("; it would fit with any one of: " + "; ".join(fits)) if fits else \
            "; no single change of checkpointing, offloading, FSDP2 degree (up to 8), QLoRA or micro batch fits it"
        plan.warn(f"the estimated peak memory per device, {_gib(estimate.peak_bytes)}, exceeds "
                  f"{_gib(budget)}{advice}")
    estimate.budget = budget
    return estimate


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def render_memory(estimate, console: Console) -> None:
    table = Table(title=f"memory per device ({estimate.strategy}, {estimate.world_size} "
                        f"process{'es' if estimate.world_size != 1 else ''}), estimated from config.json",
                  title_justify="left")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for part, n in estimate.parts.items():
        table.add_row(part, f"{n / 2**30:.2f}")
    table.add_row(Text("peak", style="bold"), Text(f"{estimate.peak_bytes / 2**30:.2f}", style="bold"))
    load = estimate.load
    if load is not None:
        table.add_row("loading (resident + mapped shards + in flight)", f"{load.device_bytes / 2**30:.2f}")
        if load.device == "cpu":
            table.add_row(Text("host RAM peak (CPU run: load or training)", style="bold"),
                          Text(f"{estimate.host_peak_bytes / 2**30:.2f}", style="bold"))
        else:
            table.add_row(Text("device peak (load or training)", style="bold"),
                          Text(f"{estimate.device_peak_bytes / 2**30:.2f}", style="bold"))
            table.add_row("host RAM peak (while loading)", f"{estimate.host_peak_bytes / 2**30:.2f}")
    console.print(table)
    for note in estimate.notes:
        console.print(Text(note, style="dim"))


__all__ = ["check_plan", "error_json", "launch_json", "render_launch", "render_plan", "render_verdict", "changed_settings", "show_value", "memory_check",
           "render_memory", "detected_gpu_memory"]
