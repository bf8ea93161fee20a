"""scattermoe's two execution strategies side by side on CPU: the per-expert loop and grouped_mm.

    python bench/moe_strategies.py           # prints ONE JSON object (a few minutes on a busy 2-core machine)
    python bench/moe_strategies.py --quick   # one small shape, a smoke run
    python bench/moe_strategies.py --shapes 128-2-512-512,8-8-1024-512 --dtypes float32
                                             # experts-top_k-tokens-hidden (intermediate = hidden / 4)

Same block and LoRA as bench/moe.py (Gemma 4's router + experts, PEFT expert LoRA r16, base
frozen, input requires grad), forward + backward, single-threaded, interleaved rounds, median of
this thread's CPU time (`time.thread_time`). Per shape, dtype and LoRA: the step time of
`scattermoe_loop` (strategy "loop"), `scattermoe_grouped` (strategy "grouped") and transformers'
`grouped_mm`, and `grouped_vs_loop` = loop time / grouped time (> 1: grouped faster).

The two names are also experts implementations for the benchmarks (`register()`, used by
bench/gpu.py): `scattermoe_experts_forward` with its `strategy` argument fixed.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import archtune.moe  # noqa: E402
from archtune.moe.scattermoe import GROUPED, LOOP, scattermoe_experts_forward  # noqa: E402

STRATEGY_IMPLS = {"scattermoe_loop": LOOP, "scattermoe_grouped": GROUPED}
# Shapes where the strategies' costs differ most: many small experts (per-expert Python cost),
# few large ones, and bench/moe.py's default size.
SHAPES = [
    dict(experts=128, top_k=2, tokens=256, hidden=256),
    dict(experts=128, top_k=8, tokens=2048, hidden=512),
    dict(experts=64, top_k=8, tokens=4096, hidden=512),
    dict(experts=8, top_k=2, tokens=2048, hidden=1024),
    dict(experts=32, top_k=4, tokens=2048, hidden=1024),
]
QUICK = [dict(experts=16, top_k=4, tokens=512, hidden=128)]


def register() -> None:
    """`scattermoe_loop` / `scattermoe_grouped` in transformers' experts registry (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    for name, strategy in STRATEGY_IMPLS.items():
        ALL_EXPERTS_FUNCTIONS.register(name, functools.partial(scattermoe_experts_forward, strategy=strategy))


def run_impl(block: torch.nn.Module, impl: str, x: torch.Tensor, grad: torch.Tensor) -> None:
    """bench/moe.py's `run_impl`, plus the two strategy names (set up as scattermoe is)."""
    import moe as bench_moe

    if impl not in STRATEGY_IMPLS:
        return bench_moe.run_impl(block, impl, x, grad)
    register()
    for c in {id(m.config): m.config for m in block.modules() if hasattr(m, "config")}.values():
        c._experts_implementation = impl
    archtune.moe.skip_parametrization_check(block)
    block.zero_grad(set_to_none=True)
    bench_moe.step(block, x, grad)


def measure_shape(shape: dict, dtype: torch.dtype, lora: bool, rounds: int) -> dict:
    import moe as bench_moe

    sizes = dict(shape, intermediate=shape["hidden"] // 4, rank=16)
    _, plain, lora_block = bench_moe.build(sizes, dtype, "lora" if lora else "plain")
    block = lora_block if lora else plain
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sizes["tokens"], sizes["hidden"], generator=gen).to(dtype)
    grad = torch.randn(sizes["tokens"], sizes["hidden"], generator=gen).to(dtype)
    impls = ["scattermoe_loop", "scattermoe_grouped", "grouped_mm"]
    grads = {}
    for impl in impls:  # warm-up, and the gradients to compare
        run_impl(block, impl, x, grad)
        grads[impl] = [p.grad.float() for p in block.parameters() if p.grad is not None]
    times: dict[str, list[float]] = {k: [] for k in impls}
    for _ in range(rounds):
        for impl in impls:
            t0 = time.thread_time()
            run_impl(block, impl, x, grad)
            times[impl].append(time.thread_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    err = max(float((a - b).norm() / b.norm().clamp_min(1e-30))
              for a, b in zip(grads["scattermoe_grouped"], grads["scattermoe_loop"]))
    return {**shape, "dtype": str(dtype).removeprefix("torch."), "lora": lora,
            "ms": {k: round(v * 1e3, 2) for k, v in med.items()},
            "grouped_vs_loop": round(med["scattermoe_loop"] / med["scattermoe_grouped"], 3),
            "grad_rel_err_grouped_vs_loop": err}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--shapes", default="", help="experts-top_k-tokens-hidden, comma-separated")
    args = parser.parse_args(argv)
    shapes = QUICK if args.quick else SHAPES
    if args.shapes:
        keys = ("experts", "top_k", "tokens", "hidden")
        shapes = [dict(zip(keys, map(int, spec.split("-")))) for spec in args.shapes.split(",")]
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    rows = []
    for shape in shapes:
        for dtype in [getattr(torch, d) for d in args.dtypes.split(",") if d]:
            for lora in (False, True):
                rows.append(measure_shape(shape, dtype, lora, args.rounds))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    ratios = [r["grouped_vs_loop"] for r in rows]
    result = {"torch": torch.__version__, "threads": 1, "rounds": args.rounds, "rows": rows,
              "grouped_vs_loop_min": min(ratios), "grouped_vs_loop_max": max(ratios),
              "grouped_vs_loop_median": statistics.median(ratios),
              "loadavg_before_after": [load, os.getloadavg()[0]]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
