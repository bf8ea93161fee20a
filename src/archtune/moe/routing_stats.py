"""Routing statistics: per-layer expert token counts during training.

    stats = RoutingStats.attach(model)     # hooks every experts module; returns the callback
    trainer = Trainer(..., callbacks=[stats, ...])   # before TensorBoardCallback (see below)
    ...
    summary["experts_load"] = stats.summary()

What is counted: the (token, expert) pairs each experts module receives, i.e. the router's
top-k decisions. They are read from the experts' own input (`top_k_index`, the second argument
of every transformers experts forward), which is the same for every family and every experts
implementation; the routers' outputs differ per family (Gemma 4 returns probabilities, Qwen 3.5
logits). Only training-mode forwards count, and not the forward that activation checkpointing
re-runs during backward (it would count each step twice).

Logged at every Trainer log (scalars, so TensorBoard picks them up), per layer L, over the
steps since the previous log:
    moe/layer_L/min_load, moe/layer_L/max_load   fewest / most pairs of an expert, as a
                                                 multiple of the uniform share (1.0 = uniform)
    moe/layer_L/entropy                          entropy of the expert distribution / log(E)
                                                 (1.0 = uniform, 0.0 = one expert)
A warning names the experts that received under 1% of a uniform share over the whole run:
rarely routed experts get few gradient updates, and are where expert weights drift.

TensorBoard: the Trainer hands the same `logs` dict to each callback in order, so this
callback must come before the TensorBoard one (`stats.install(trainer)` puts it first).
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

RARE_FRACTION = 0.01  # of a uniform share


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every transformers experts module (3D expert tensors, `num_experts`).

    PEFT's wrappers around an experts module are skipped: the hooks go on the module itself.
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # pragma: no cover
        BaseTunerLayer = ()
    found = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) or not isinstance(getattr(module, "num_experts", None), int):
            continue
        if "down_proj" in module._parameters or "down_proj" in getattr(module, "parametrizations", {}):
            found.append((name, module))
    return found


def _inside_backward() -> bool:
    # True while autograd runs a backward pass (e.g. checkpointing recomputes a layer's forward)
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _layer_index(name: str) -> int | None:
    m = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def load_stats(counts: list[int], rare_fraction: float = RARE_FRACTION) -> dict[str, Any]:
    """Statistics of one layer's per-expert pair counts.

    Example: counts [6, 2, 0, 0] -> total 8, uniform share 2 per expert, min_load 0.0,
    max_load 3.0, entropy = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.5623 nats, normalised by ln 4
    -> 0.4056; rare experts (under 1% of 2 pairs) [2, 3].
    """
    n = len(counts)
    total = int(sum(counts))
    uniform = total / n if n else 0.0
    if total:
        probs = [c / total for c in counts]
        entropy = -sum(p * math.log(p) for p in probs if p > 0)
    else:
        entropy = 0.0
    return {
        "tokens": total,
        "counts": [int(c) for c in counts],
        "min": int(min(counts)) if counts else 0,
        "max": int(max(counts)) if counts else 0,
        "min_load": (min(counts) / uniform) if uniform else 0.0,
        "max_load": (max(counts) / uniform) if uniform else 0.0,
        "entropy": entropy,
        "entropy_normalized": (entropy / math.log(n)) if n > 1 else 0.0,
        "rare_experts": [e for e, c in enumerate(counts) if total and c < rare_fraction * uniform],
    }


class RoutingStats(TrainerCallback):
    """Counts routed (token, expert) pairs per experts module; a TrainerCallback."""

    def __init__(self, rare_fraction: float = RARE_FRACTION) -> None:
        self.rare_fraction = rare_fraction
        self.layers: dict[str, dict[str, Any]] = {}  # name -> {"module", "window", "total", "handle"}
        self.num_top_k: int | None = None
        self._warned = False

    # ---- wiring
    @classmethod
    def attach(cls, model: nn.Module, rare_fraction: float = RARE_FRACTION) -> "RoutingStats":
        """Hook every experts module of `model`; returns the callback (no experts: no hooks)."""
        stats = cls(rare_fraction)
        for name, module in experts_modules(model):
            handle = module.register_forward_pre_hook(stats._make_hook(name), with_kwargs=True)
            stats.layers[name] = {"num_experts": module.num_experts, "window": None, "total": None,
                                  "handle": handle, "layer": _layer_index(name)}
        return stats

    def detach(self) -> None:
        for entry in self.layers.values():
            entry["handle"].remove()

    def install(self, trainer) -> None:
        """Put this callback first in `trainer`'s list (before TensorBoard's, see module doc)."""
        handler = trainer.callback_handler
        if self in handler.callbacks:
            handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)

    def _make_hook(self, name: str):
        def hook(module, args, kwargs):
            if not module.training or _inside_backward():
                return None
            index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            if index is None:
                return None
            entry = self.layers[name]
            with torch.no_grad():
                flat = index.reshape(-1)
                flat = flat[(flat >= 0) & (flat < entry["num_experts"])]  # expert-parallel sentinels
                counts = torch.bincount(flat, minlength=entry["num_experts"])
            entry["window"] = counts if entry["window"] is None else entry["window"] + counts
            self.num_top_k = int(index.shape[-1])
            return None

        return hook

    # ---- counting
    def _flush(self) -> dict[str, list[int]]:
        """Window counts (summed over ranks), added to the totals; the window restarts."""
        names = list(self.layers)
        if not names:
            return {}
        width = max(e["num_experts"] for e in self.layers.values())
        rows = []
        for name in names:
            w = self.layers[name]["window"]
            row = torch.zeros(width, dtype=torch.long)
            if w is not None:
                row[: w.numel()] = w.detach().to("cpu", torch.long)
            rows.append(row)
            self.layers[name]["window"] = None
        table = torch.stack(rows)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            table = table.to(device)
            torch.distributed.all_reduce(table)
            table = table.cpu()
        window = {}
        for name, row in zip(names, table):
            n = self.layers[name]["num_experts"]
            counts = row[:n]
            total = self.layers[name]["total"]
            self.layers[name]["total"] = counts.clone() if total is None else total + counts
            window[name] = counts.tolist()
        return window

    def _key(self, name: str) -> str:
        layer = self.layers[name]["layer"]
        return f"layer_{layer}" if layer is not None else name

    def log_scalars(self, window: dict[str, list[int]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, counts in window.items():
            if not sum(counts):
                continue
            s = load_stats(counts, self.rare_fraction)
            key = self._key(name)
            out[f"moe/{key}/min_load"] = round(s["min_load"], 6)
            out[f"moe/{key}/max_load"] = round(s["max_load"], 6)
            out[f"moe/{key}/entropy"] = round(s["entropy_normalized"], 6)
        return out

    # ---- TrainerCallback
    def on_log(self, args, state, control, logs=None, **kwargs):
        scalars = self.log_scalars(self._flush())
        if logs is not None and scalars:
            logs.update(scalars)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(scalars)

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()
        self.warn_rare(getattr(state, "is_world_process_zero", True))

    def warn_rare(self, emit: bool = True) -> dict[str, list[int]]:
        rare = self.summary()["rare_experts"]
        if rare and emit and not self._warned:
            self._warned = True
            parts = [f"{self._key(name)}: {ids}" for name, ids in rare.items()]
            logger.warning(
                "experts receiving under %g%% of a uniform share of tokens (rarely trained, prone to "
                "weight drift): %s", 100 * self.rare_fraction, "; ".join(parts))
        return rare

    # ---- results
    def counts(self) -> dict[str, list[int]]:
        """Total pairs per expert since attach (flushed windows plus the current one, this rank)."""
        out = {}
        for name, entry in self.layers.items():
            total = entry["total"].clone() if entry["total"] is not None else torch.zeros(entry["num_experts"], dtype=torch.long)
            if entry["window"] is not None:
                total += entry["window"].detach().to("cpu", torch.long)
            out[name] = total.tolist()
        return out

    def summary(self) -> dict[str, Any]:
        """JSON-able `experts_load` for train_summary.json."""
        layers = {}
        rare = {}
        for name, counts in self.counts().items():
            s = load_stats(counts, self.rare_fraction)
            s["layer"] = self.layers[name]["layer"]
            layers[name] = s
            if s["rare_experts"]:
                rare[name] = s["rare_experts"]
        return {
            "top_k": self.num_top_k,
            "rare_threshold": self.rare_fraction,
            "layers": layers,
            "rare_experts": rare,
        }


__all__ = ["RoutingStats", "experts_modules", "load_stats", "RARE_FRACTION"]
