"""Where a training step's time goes, by part: one JSON object with each part's share.

    python bench/step_parts.py CONFIG [key=value ...] [--steps 4:12]

Runs `archtune train CONFIG` (the real recipe, the real Trainer) and profiles the steps in
--steps with torch.profiler. Every piece of work is given a phase and a part:

phases  forward (the loss's forward), backward (autograd nodes), recompute (a forward op run
        during backward: activation checkpointing), optimizer (gradient clipping, AdamW,
        scheduler, zeroing), data (fetching and collating batches), trainer (the rest of the
        Trainer's loop: callbacks, logging, token counting).
parts   attention (the attention modules less their projections), mask (attention-mask
        creation), linear (frozen base projections), lora (adapter products, incl. expert LoRA
        materialised by PEFT), experts (expert MLPs), router, dense mlp (its element-wise part),
        routing hooks (routing statistics), other (embeddings, norms, head, loss).

A backward node is given the part of the forward op that created it (autograd sequence
numbers). Python time is given to the innermost part whose range encloses it. The profiler
adds a cost per op; `profiled_step_s` vs `unprofiled_step_s` says how much, so compare shares,
not seconds, and compare runs on the same machine state.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time

import torch
from torch import nn

PHASE, PART = "phase:", "part:"
NODE = "autograd::engine::evaluate_function: "


def _ranged(name: str, fn):
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    wrapped.__wrapped__ = fn
    return wrapped


def part_of(name: str, module: nn.Module) -> str | None:
    cls = type(module).__name__
    leaf = name.rsplit(".", 1)[-1]
    if cls in ("_LoraFactorsProxy", "_LoraParameterProxy") or ".lora_A." in f".{name}." or ".lora_B." in f".{name}.":
        return "lora"
    if leaf == "base_layer" and isinstance(module, nn.Linear):
        return "linear"
    if isinstance(getattr(module, "num_experts", None), int) and cls != "ParamWrapper" and "Router" not in cls:
        return "experts" if hasattr(module, "down_proj") or "down_proj" in getattr(module, "parametrizations", {}) else None
    if cls == "ParamWrapper":
        return "experts"
    if "Router" in cls or leaf == "router" or leaf == "gate" and isinstance(module, nn.Linear):
        return "router"
    if leaf in ("self_attn", "linear_attn"):
        return "attention"
    if leaf == "mlp" or leaf == "shared_expert":
        return "dense mlp"
    if isinstance(module, nn.Linear) and ".layers." in name:
        return "linear"
    return None


def instrument(model: nn.Module) -> int:
    count = 0
    for name, module in model.named_modules():
        part = part_of(name, module)
        if part:
            module.forward = _ranged(PART + part, module.forward)
            count += 1
    # attention-mask creation: module-level functions of the model's modeling file
    seen = set()
    for module in model.modules():
        mod = sys.modules.get(type(module).__module__)
        if mod is None or mod in seen:
            continue
        seen.add(mod)
        for attr in dir(mod):
            if attr.startswith("create_") and "mask" in attr and callable(getattr(mod, attr)):
                fn = getattr(mod, attr)
                if not hasattr(fn, "__wrapped__") or not getattr(fn, "_archtune_profile", False):
                    w = _ranged(PART + "mask", fn)
                    w._archtune_profile = True
                    setattr(mod, attr, w)
    return count


def patch_trainer() -> None:
    from transformers import Trainer

    from archtune.data.collate import DataCollator
    from archtune.moe.routing_stats import RoutingStats

    Trainer.compute_loss = _ranged(PHASE + "forward", Trainer.compute_loss)
    Trainer._clip_grad_norm = _ranged(PHASE + "optimizer", Trainer._clip_grad_norm)
    Trainer.get_batch_samples = _ranged(PHASE + "data", Trainer.get_batch_samples)
    DataCollator.__call__ = _ranged(PHASE + "data", DataCollator.__call__)
    make_hook = RoutingStats._make_hook
    RoutingStats._make_hook = lambda self, name: _ranged(PART + "routing hooks", make_hook(self, name))
    import accelerate

    accelerate.Accelerator.backward = _ranged(PHASE + "backward", accelerate.Accelerator.backward)
    opt_step = torch.optim.Optimizer.zero_grad
    torch.optim.Optimizer.zero_grad = _ranged(PHASE + "optimizer", opt_step)
    nn.Module.zero_grad = _ranged(PHASE + "optimizer", nn.Module.zero_grad)


def analyse(events, wall: float) -> dict:
    seq_part: dict[int, str] = {}
    info = {}

    def markers(ev):
        """(phase, innermost marker) of an event: the marker is a part range or a backward node."""
        phase, inner = None, None
        p = ev.cpu_parent
        chain = [ev]
        while p is not None:
            chain.append(p)
            p = p.cpu_parent
        for e in chain:
            n = e.name
            if inner is None and (n.startswith(PART) or n.startswith(NODE)):
                inner = e
            if phase is None and n.startswith(PHASE):
                phase = n[len(PHASE):]
        return phase, inner

    # A forward op records the sequence number of the next autograd node; the op that creates the
    # node is the last one recorded with that number (the counter moves on after it).
    for ev in sorted(events, key=lambda e: e.time_range.start):
        info[id(ev)] = phase, inner = markers(ev)
        if ev.sequence_nr >= 0 and inner is not None and inner.name.startswith(PART):
            seq_part[ev.sequence_nr] = inner.name[len(PART):]
    table: dict[tuple[str, str], float] = collections.defaultdict(float)
    for ev in events:
        phase, inner = info[id(ev)]
        if phase is None and not ev.name.startswith(PHASE):
            continue  # outside the phases: the trainer's share is what is left of the wall time
        self_s = ev.self_cpu_time_total / 1e6
        if ev.name.startswith(PHASE):
            phase = ev.name[len(PHASE):] if phase is None else phase
        if inner is None:
            part = "other"
        elif inner.name.startswith(NODE):
            part = seq_part.get(inner.sequence_nr, "other")
            phase = "backward"
        else:
            part = inner.name[len(PART):]
            if phase == "backward":
                phase = "recompute"
        table[(phase, part)] += self_s
    measured = sum(table.values())
    table[("trainer", "other")] += max(0.0, wall - measured)
    total = sum(table.values())
    phases: dict[str, dict] = {}
    for (phase, part), s in sorted(table.items(), key=lambda kv: -kv[1]):
        p = phases.setdefault(phase, {"share": 0.0, "parts": {}})
        p["share"] += s / total
        p["parts"][part] = round(s / total, 4)
    parts: dict[str, float] = collections.defaultdict(float)
    for (phase, part), s in table.items():
        key = {"recompute": "checkpoint recompute", "optimizer": "optimizer", "data": "data",
               "trainer": "trainer overhead"}.get(phase, part)
        parts[key] += s / total
    return {"phases": {k: {"share": round(v["share"], 4), "parts": v["parts"]}
                       for k, v in sorted(phases.items(), key=lambda kv: -kv[1]["share"])},
            "parts": {k: round(v, 4) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", default="4:12", help="A:B profiles the steps after step A up to step B")
    args = parser.parse_args(argv)
    first, last = (int(x) for x in args.steps.split(":"))

    from transformers import TrainerCallback

    from archtune.config import load_config
    from archtune.train import recipe
    from archtune.train.lifecycle import RecipeRun

    patch_trainer()
    result: dict = {"bench": "profile_parts", "config": args.config, "overrides": args.overrides,
                    "steps": [first, last]}
    times: list[float] = []

    class Window(TrainerCallback):
        prof = None
        started = 0.0
        last_end = None

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            if self.last_end is not None and not (first < state.global_step <= last):
                times.append(now - self.last_end)
            self.last_end = now
            if state.global_step == first:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()
                self.started = time.perf_counter()
            elif state.global_step == last and self.prof is not None:
                wall = time.perf_counter() - self.started
                self.prof.__exit__(None, None, None)
                result["profiled_step_s"] = round(wall / (last - first), 4)
                result.update(analyse(self.prof.events(), wall))
                self.prof = None

    assemble_model = recipe.assemble_model

    def build_instrumented(*a, **kw):
        built = assemble_model(*a, **kw)
        result["instrumented_modules"] = instrument(built.model)
        return built

    recipe.assemble_model = build_instrumented
    callbacks = RecipeRun.callbacks
    RecipeRun.callbacks = lambda run, plugins: callbacks(run, plugins) + [Window()]
    summary = recipe.train(load_config(args.config, args.overrides))
    result["unprofiled_step_s"] = round(sorted(times)[len(times) // 2], 4) if times else None
    result["experts_implementation"] = summary.get("experts_implementation")
    result["train_seconds"] = summary["train_seconds"]
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
