"""MoE block forward+backward on CPU: scattermoe (expert LoRA fused) vs transformers' paths.

    python bench/moe.py            # prints ONE JSON object (about 2 minutes on a busy 2-core machine)
    python bench/moe.py --quick    # smaller sizes, a smoke run
    python bench/moe.py --dtypes '' # the 4-bit experts rows only
    python bench/moe.py --sweep --rows ROWS.jsonl   # every implementation at the sweep's cells (~25 min);
                                                    # rows kept as measured, a rerun resumes
    python bench/moe.py --table bench/moe_sweep_cpu.jsonl   # measured rows + the rule's pick, as Markdown

The block is Gemma 4's MoE branch (`Gemma4TextRouter` + `Gemma4TextExperts`, built from a
`Gemma4TextConfig`): 64 experts, top-8, hidden 512, expert intermediate 256, 4096 tokens.
LoRA is PEFT's `target_parameters=["experts.gate_up_proj", "experts.down_proj"]` (r=16,
alpha=32), trained with the base weights frozen; the block's input requires grad (as inside a
model). All variants run side by side, interleaved round by round, single-threaded
(`torch.set_num_threads(1)`). Ratios use the median CPU time of this thread
(`time.thread_time`), which a shared machine disturbs much less than wall time (both are
reported, with the load average before and after).

Reported per dtype:
* `lora_speedup_vs_best_stock`: min(eager+PEFT, grouped_mm+PEFT) / scattermoe+LoRA (target >= 1.5);
* `lora_overhead`: scattermoe+LoRA / scattermoe without LoRA, base frozen in both (target <= 1.25);
* `gflops_scattermoe` vs `gflops_dense`: the FLOPs of the block's products (forward, input
  gradient, LoRA) over scattermoe's time, and the same FLOPs as dense matmuls of the same
  shapes (one weight instead of 64).

`4bit_experts` (`quantize_moe_experts`): scattermoe + expert LoRA with the experts in fp32, bf16
and NF4 (dequantized per expert to fp32 or bf16): step time ratios, the block's weight bytes, and
each variant's resident memory after building it and its peak over two steps, measured in a
fresh process per variant.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import archtune.moe  # noqa: E402,F401  (registers "scattermoe")

SIZES = dict(experts=64, top_k=8, hidden=512, intermediate=256, tokens=4096, rank=16)
QUICK = dict(experts=16, top_k=4, hidden=128, intermediate=64, tokens=512, rank=8)


class MoEBlock(nn.Module):
    """Gemma 4's routed branch: router (with its scales) -> experts."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts, Gemma4TextRouter

        self.router = Gemma4TextRouter(config)
        self.experts = Gemma4TextExperts(config)

    def forward(self, x):
        _, weights, index = self.router(x)
        return self.experts(x, index, weights)


def build(sizes: dict, dtype: torch.dtype, which: str = "both"):
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import Gemma4TextConfig

    config = Gemma4TextConfig(
        hidden_size=sizes["hidden"], num_experts=sizes["experts"], top_k_experts=sizes["top_k"],
        moe_intermediate_size=sizes["intermediate"], enable_moe_block=True, vocab_size=256,
        num_hidden_layers=1,
    )
    config._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(0)
    plain = MoEBlock(config)
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02 if p.ndim > 1 else torch.ones(p.shape))
    plain = plain.to(dtype)
    plain.requires_grad_(False)
    # The router stays trainable in every variant (its weights get gradients through top_k_weights).
    plain.router.requires_grad_(True)
    if which == "plain":
        return config, plain, None
    lora = copy.deepcopy(plain) if which == "both" else plain
    lora_config = LoraConfig(
        r=sizes["rank"], lora_alpha=2 * sizes["rank"], lora_dropout=0.0, target_modules=[],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"], init_lora_weights=False,
    )
    lora = inject_adapter_in_model(lora_config, lora)
    for name, p in lora.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
    return config, plain, lora


def step(block: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    x = x.detach().requires_grad_(True)
    block(x).backward(grad)


def run_impl(block: nn.Module, impl: str, x: torch.Tensor, grad: torch.Tensor) -> None:
    """One forward+backward of `block` with experts implementation `impl`."""
    for c in {id(m.config): m.config for m in block.modules() if hasattr(m, "config")}.values():
        c._experts_implementation = impl  # each block has its own config (the LoRA block is a deep copy)
    # PEFT as shipped for the stock paths; scattermoe as archtune's kernels plugin sets it up
    # (archtune.moe.skip_parametrization_check, an instance-level override).
    for m in block.modules():
        m.__dict__.pop("_activate_lora", None)
    if impl in archtune.moe.FORWARDS:  # scattermoe, scattermoe_triton
        archtune.moe.skip_parametrization_check(block)
    block.zero_grad(set_to_none=True)
    step(block, x, grad)


def dense_step(x, w_up, w_down, grad):
    """The same products as the experts' forward and input gradient, as dense matmuls."""
    h = x @ w_up  # [N, H] @ [H, 2I]
    y = h[:, : w_down.shape[0]] @ w_down  # [N, I] @ [I, H]
    g_mid = grad @ w_down.t()  # [N, H] @ [H, I]
    g_x = h @ w_up.t()  # [N, 2I] @ [2I, H] (stands in for the gradient of the gate/up output)
    return y, g_mid, g_x


def flops(sizes: dict, pairs: int, lora: bool) -> float:
    h, i, r = sizes["hidden"], sizes["intermediate"], sizes["rank"]
    base = 2 * pairs * (h * 2 * i + i * h)  # one pass over gate_up and down
    total = 2 * base  # forward + input gradient (base frozen)
    if lora:  # per product: forward 2 small products, backward 4
        total += 6 * pairs * r * ((h + 2 * i) + (i + h))
    return float(total)


def measure(sizes: dict, dtype: torch.dtype, rounds: int, cheap_repeats: int = 3) -> dict:
    _, plain, lora = build(sizes, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sizes["tokens"], sizes["hidden"], generator=gen).to(dtype)
    grad = torch.randn(sizes["tokens"], sizes["hidden"], generator=gen).to(dtype)

    def variant(block, impl):
        return lambda: run_impl(block, impl, x, grad)

    pairs = sizes["tokens"] * sizes["top_k"]
    w_up = torch.randn(sizes["hidden"], 2 * sizes["intermediate"], generator=gen).to(dtype)
    w_down = torch.randn(sizes["intermediate"], sizes["hidden"], generator=gen).to(dtype)
    xd = torch.randn(pairs, sizes["hidden"], generator=gen).to(dtype)
    gd = torch.randn(pairs, sizes["hidden"], generator=gen).to(dtype)
    variants = {
        "eager_peft_lora": variant(lora, "eager"),
        "grouped_mm_peft_lora": variant(lora, "grouped_mm"),
        "scattermoe_lora": variant(lora, "scattermoe"),
        "scattermoe_no_lora": variant(plain, "scattermoe"),
        "grouped_mm_no_lora": variant(plain, "grouped_mm"),
        "dense_same_products": lambda: dense_step(xd, w_up, w_down, gd),
    }
    # Interleaved rounds: every round runs each stock variant once and the cheap ones (the two
    # scattermoe variants, whose ratio is the tightest target, and the dense reference)
    # `cheap_repeats` times, so machine noise hits all variants alike.
    cheap = ("scattermoe_lora", "scattermoe_no_lora", "dense_same_products")
    times: dict[str, list[float]] = {k: [] for k in variants}  # CPU seconds of this thread
    walls: dict[str, list[float]] = {k: [] for k in variants}
    for k, fn in variants.items():  # warm-up (allocator, oneDNN primitives)
        fn()
    for r in range(rounds):
        for k, fn in variants.items():
            if k == "eager_peft_lora" and r == rounds - 1 and rounds > 2:
                continue  # the slowest variant, never the best stock one on CPU: one round fewer
            for _ in range(cheap_repeats if k in cheap else 1):
                w0, t0 = time.perf_counter(), time.thread_time()
                fn()
                times[k].append(time.thread_time() - t0)
                walls[k].append(time.perf_counter() - w0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best_stock = min(med["eager_peft_lora"], med["grouped_mm_peft_lora"])
    f_lora, f_base = flops(sizes, pairs, True), flops(sizes, pairs, False)
    f_dense = flops(sizes, pairs, False)
    return {
        "runs": {k: len(v) for k, v in times.items()},
        "cpu_ms_median": {k: round(v * 1e3, 2) for k, v in med.items()},
        "wall_ms_median": {k: round(statistics.median(v) * 1e3, 2) for k, v in walls.items()},
        "wall_ms_min": {k: round(min(v) * 1e3, 2) for k, v in walls.items()},
        "best_stock_lora": "eager_peft_lora" if med["eager_peft_lora"] <= med["grouped_mm_peft_lora"] else "grouped_mm_peft_lora",
        "lora_speedup_vs_best_stock": round(best_stock / med["scattermoe_lora"], 3),
        "lora_overhead": round(med["scattermoe_lora"] / med["scattermoe_no_lora"], 3),
        "gflops_scattermoe_lora": round(f_lora / med["scattermoe_lora"] / 1e9, 1),
        "gflops_scattermoe_no_lora": round(f_base / med["scattermoe_no_lora"] / 1e9, 1),
        "gflops_dense": round(f_dense / med["dense_same_products"] / 1e9, 1),
        "scattermoe_vs_dense_efficiency": round((f_base / med["scattermoe_no_lora"]) / (f_dense / med["dense_same_products"]), 3),
        "gflop_per_step": {"lora": round(f_lora / 1e9, 2), "no_lora": round(f_base / 1e9, 2)},
    }


# ---- 4-bit experts (quantize_moe_experts) --------------------------------------------------

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
# name -> (dtype of the block, 4-bit experts?)
QUANT4_VARIANTS = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False),
                   "4bit_fp32_compute": (torch.float32, True), "4bit_bf16_compute": (torch.bfloat16, True)}


def build_4bit_variant(sizes: dict, name: str) -> nn.Module:
    """The LoRA block of `name`: scattermoe with expert LoRA; 4-bit variants store the experts in NF4."""
    from archtune.moe import quant4

    dtype, four_bit = QUANT4_VARIANTS[name]
    _, _, block = build(sizes, dtype)
    for m in block.modules():
        if hasattr(m, "config"):
            m.config._experts_implementation = "scattermoe"
    if four_bit:
        quant4.quantize_experts(block, tuple(EXPERTS), dtype=dtype)
        quant4.adapt_peft(block)
    return block


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def peak_memory(sizes: dict, name: str) -> dict:
    """One variant in this process: resident memory after building it, and the peak of two steps
    (the kernel's high-water mark, reset before the steps: /proc/self/clear_refs)."""
    import gc

    dtype = QUANT4_VARIANTS[name][0]
    block = build_4bit_variant(sizes, name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sizes["tokens"], sizes["hidden"], generator=gen).to(dtype)
    grad = torch.randn(sizes["tokens"], sizes["hidden"], generator=gen).to(dtype)
    step(block, x, grad)  # warm-up: allocator and oneDNN state belong to the baseline
    gc.collect()
    resident = _rss_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(2):
        block.zero_grad(set_to_none=True)
        step(block, x, grad)
    return {"rss_after_build_mb": round(resident, 1), "step_peak_mb": round(_rss_mb("VmHWM"), 1),
            "step_extra_mb": round(_rss_mb("VmHWM") - resident, 1)}


def measure_4bit(sizes: dict, rounds: int, quick: bool) -> dict:
    """scattermoe + expert LoRA with the experts in fp32, bf16 and 4 bits: step time (interleaved
    rounds, this thread's CPU time), the block's weight bytes, and resident memory (each variant
    in a fresh process: `--peak-memory NAME`)."""
    import subprocess

    from archtune.moe import quant4

    blocks = {name: build_4bit_variant(sizes, name) for name in QUANT4_VARIANTS}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sizes["tokens"], sizes["hidden"], generator=gen)
    grad = torch.randn(sizes["tokens"], sizes["hidden"], generator=gen)
    inputs = {name: (x.to(QUANT4_VARIANTS[name][0]), grad.to(QUANT4_VARIANTS[name][0])) for name in blocks}
    times: dict[str, list[float]] = {k: [] for k in blocks}
    for name, block in blocks.items():
        step(block, *inputs[name])
    for _ in range(rounds):
        for name, block in blocks.items():
            block.zero_grad(set_to_none=True)
            t0 = time.thread_time()
            step(block, *inputs[name])
            times[name].append(time.thread_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    weights = {k: quant4.model_bytes(b, adapters=False) for k, b in blocks.items()}
    memory = {}
    for name in QUANT4_VARIANTS:
        cmd = [sys.executable, __file__, "--peak-memory", name] + (["--quick"] if quick else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        memory[name] = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else done.stderr[-300:]
    return {
        "cpu_ms_median": {k: round(v * 1e3, 2) for k, v in med.items()},
        "time_4bit_vs": {"fp32": round(med["4bit_fp32_compute"] / med["fp32"], 3),
                         "bf16": round(med["4bit_bf16_compute"] / med["bf16"], 3)},
        "weight_bytes": weights,
        "weight_bytes_4bit_vs": {"fp32": round(weights["4bit_fp32_compute"] / weights["fp32"], 3),
                                 "bf16": round(weights["4bit_bf16_compute"] / weights["bf16"], 3)},
        "memory": memory,
    }


# ---- the sweep: where does scattermoe win, where does a stock implementation? -------------------
#
# Corners and centre of the ranges the experts implementation must hold at: experts 8-128,
# top-k 2-8, tokens 256-8192, hidden 256-2048 (expert intermediate = hidden / 4, as in
# Gemma 4 26B-A4B and Qwen 3.5 35B-A3B), with and without expert LoRA, fp32 and bf16.
SWEEP_AXES = dict(experts=(8, 128), top_k=(2, 8), tokens=(256, 8192), hidden=(256, 2048))
SWEEP_CENTRE = dict(experts=32, top_k=4, tokens=2048, hidden=1024)
# batched_mm gathers one weight matrix per (token, expert) pair: skipped where that copy exceeds this.
BATCHED_MM_BYTES = 1 << 30
# Shapes whose step costs more than this many GFLOP run one round fewer and skip eager.
HEAVY_GFLOP = 200.0
# eager with PEFT expert LoRA rebuilds W + BA of every expert at each expert's weight access (experts^2
# expert matrices a step): skipped where that is more than this many elements (minutes a step).
EAGER_LORA_ELEMENTS = 1 << 31


def sweep_shapes() -> list[dict]:
    import itertools

    keys = list(SWEEP_AXES)
    shapes = [dict(zip(keys, values)) for values in itertools.product(*(SWEEP_AXES[k] for k in keys))]
    # The one corner left out: 8,192 tokens x top-8 x hidden 2,048 (about 0.8 TFLOP a step, minutes per
    # implementation on one core); its top-2 sibling covers the compute-bound end of the range.
    shapes = [s for s in shapes if not (s["tokens"] == 8192 and s["top_k"] == 8 and s["hidden"] == 2048)]
    shapes.append(dict(SWEEP_CENTRE))
    for shape in shapes:
        shape["intermediate"] = shape["hidden"] // 4
        shape["rank"] = 16
    return shapes


def measure_shape(sizes: dict, dtype: torch.dtype, lora: bool, rounds: int) -> dict:
    """Per-step thread CPU time (median) of every implementation at one shape."""
    _, block, lora_block = build(sizes, dtype, "lora" if lora else "plain")
    block = lora_block if lora else block
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sizes["tokens"], sizes["hidden"], generator=gen).to(dtype)
    grad = torch.randn(sizes["tokens"], sizes["hidden"], generator=gen).to(dtype)
    pairs = sizes["tokens"] * sizes["top_k"]
    heavy = flops(sizes, pairs, lora) / 1e9 > HEAVY_GFLOP
    impls = ["grouped_mm", "scattermoe"]
    skipped = {}
    rebuilt = sizes["experts"] ** 2 * 3 * sizes["hidden"] * sizes["intermediate"]
    if heavy:
        skipped["eager"] = f"step above {HEAVY_GFLOP:.0f} GFLOP (the Python loop over experts is never the fastest there)"
    elif lora and rebuilt > EAGER_LORA_ELEMENTS:
        skipped["eager"] = (f"PEFT rebuilds all {sizes['experts']} experts' W + BA at each expert's access "
                            f"({rebuilt / 1e9:.0f}G elements a step)")
    else:
        impls.insert(0, "eager")
    itemsize = torch.finfo(dtype).bits // 8
    if pairs * sizes["hidden"] * 3 * sizes["intermediate"] * itemsize <= BATCHED_MM_BYTES:
        impls.insert(0, "batched_mm")
    else:
        skipped["batched_mm"] = "its per-pair weight copy exceeds 1 GiB"

    def run(impl):
        run_impl(block, impl, x, grad)

    times: dict[str, list[float]] = {k: [] for k in impls}
    if not heavy:
        for impl in impls:
            run(impl)  # warm-up (a heavy step's first run is its measurement: its setup cost is negligible)
    for _ in range(1 if heavy else rounds):
        for impl in impls:
            t0 = time.thread_time()
            run(impl)
            times[impl].append(time.thread_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    stock = {k: v for k, v in med.items() if k != "scattermoe"}
    best = min(stock, key=stock.get)
    return {"ms": {k: round(v * 1e3, 2) for k, v in med.items()}, "best_stock": best,
            "scattermoe_vs_best_stock": round(stock[best] / med["scattermoe"], 3), "skipped": skipped}


SWEEP_KEY = ("experts", "top_k", "tokens", "hidden", "dtype", "lora")


def sweep_row(shape: dict, dtype: str, lora: bool, measured: dict, device: str = "cpu") -> dict:
    """One cell of the sweep: the measured times and the choice `use_scattermoe` makes there."""
    from archtune.plan.experts import choose_experts_implementation

    choice = choose_experts_implementation(
        num_experts=shape["experts"], top_k=shape["top_k"], hidden=shape["hidden"],
        intermediate=shape["intermediate"], tokens=shape["tokens"], expert_lora=lora, dtype=dtype,
        device=device)
    ms = measured["ms"]
    return {**{k: shape[k] for k in ("experts", "top_k", "tokens", "hidden", "intermediate")}, "dtype": dtype,
            "lora": lora, **{k: measured[k] for k in ("ms", "best_stock", "scattermoe_vs_best_stock")},
            "skipped": measured.get("skipped", {}),
            "rule_choice": choice.name, "rule_vs_best": round(min(ms.values()) / ms[choice.name], 3)}


def run_sweep(dtypes: list[torch.dtype], rounds: int, reuse: list[dict] = (), only: set | None = None,
              rows_file: str | None = None) -> dict:
    rows = []
    done = {tuple(r[k] for k in SWEEP_KEY): r for r in reuse}
    for shape in sweep_shapes():
        if only and f"{shape['experts']}-{shape['top_k']}-{shape['tokens']}-{shape['hidden']}" not in only:
            continue
        for dtype in dtypes:
            name = str(dtype).removeprefix("torch.")
            for lora in (False, True):
                r = done.get((shape["experts"], shape["top_k"], shape["tokens"], shape["hidden"], name, lora))
                if r is None:
                    r = measure_shape(shape, dtype, lora, rounds)
                    if rows_file:  # kept as soon as measured: a stopped sweep resumes from here
                        with open(rows_file, "a") as f:
                            f.write(json.dumps({**{k: shape[k] for k in ("experts", "top_k", "tokens", "hidden",
                                                                         "intermediate")},
                                                "dtype": name, "lora": lora, **r,
                                                "load_avg_1m": round(os.getloadavg()[0], 2)}) + "\n")
                rows.append(sweep_row(shape, name, lora, r))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    wins = [r for r in rows if r["scattermoe_vs_best_stock"] >= 1.0]
    return {"rows": rows, "scattermoe_wins": len(wins), "shapes": len(rows),
            "rule_worst_vs_best": min(r["rule_vs_best"] for r in rows)}


def sweep_table(measured: list[dict], device: str = "cpu") -> str:
    """The sweep as a Markdown table (one line per cell, the rule's choice recomputed now)."""
    order = {(s["experts"], s["top_k"], s["tokens"], s["hidden"]): i for i, s in enumerate(sweep_shapes())}
    cells = {tuple(r[k] for k in SWEEP_KEY): r for r in measured}
    lines = ["| experts | top-k | tokens | hidden x inter. | pairs / expert | dtype | expert LoRA | best stock (ms) "
             "| scattermoe (ms) | scattermoe vs best stock | rule picks | rule vs fastest |",
             "|---:|---:|---:|---|---:|---|---|---|---:|---:|---|---:|"]
    for key in sorted(cells, key=lambda k: (k[4] != "float32", order.get(k[:4], len(order)), k[5])):
        r = sweep_row(cells[key], key[4], key[5], cells[key], device)
        best = r["best_stock"]
        lines.append(f"| {r['experts']} | {r['top_k']} | {r['tokens']} | {r['hidden']} x {r['intermediate']} "
                     f"| {r['tokens'] * r['top_k'] / r['experts']:.0f} | {r['dtype']} | {'yes' if r['lora'] else 'no'} "
                     f"| {best} {r['ms'][best]:.1f} | {r['ms']['scattermoe']:.1f} | {r['scattermoe_vs_best_stock']:.2f}x "
                     f"| {r['rule_choice']} | {r['rule_vs_best']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-4bit", action="store_true", help="skip the 4-bit experts rows")
    parser.add_argument("--peak-memory", choices=sorted(QUANT4_VARIANTS), help=argparse.SUPPRESS)


    parser.add_argument("--sweep", action="store_true",
                        help="every implementation at the corners and centre of the supported shape ranges")
    parser.add_argument("--only", help="comma-separated EXPERTS-TOPK-TOKENS-HIDDEN shapes of the sweep to run")
    parser.add_argument("--reuse", help="JSONL of sweep rows already measured (from --sweep's stderr): not rerun")
    parser.add_argument("--rows", help="JSONL read like --reuse, and each newly measured row appended to it")
    parser.add_argument("--table", nargs="+", metavar="JSONL", help="print the sweep rows of these files (later "
                        "files win) as a Markdown table with the rule's choice at each cell, and exit")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="with --table: the device the rows were measured on (bench/gpu.py moe rows: cuda)")
    args = parser.parse_args(argv)
    if args.table:
        sys.stdout.write(sweep_table([json.loads(line) for path in args.table for line in open(path) if line.strip()],
                                     args.device))
        return {}
    if args.sweep:
        torch.set_num_threads(1)
        started = time.perf_counter()
        dtypes = [getattr(torch, n) for n in args.dtypes.split(",")]
        reuse = [json.loads(line) for path in (args.reuse, args.rows) if path and os.path.exists(path)
                 for line in open(path) if line.strip()]
        result = {"bench": "moe_sweep", "torch": torch.__version__, "threads": 1,
                  "load_avg_1m": round(os.getloadavg()[0], 2), **run_sweep(dtypes, args.rounds or 3, reuse,
                                                                       set(args.only.split(",")) if args.only else None,
                                                                       args.rows)}
        result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
        result["seconds"] = round(time.perf_counter() - started, 1)
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
        return result
    sizes = QUICK if args.quick else SIZES
    torch.set_num_threads(1)
    if args.peak_memory:  # a child of measure_4bit: one variant, one JSON line
        print(json.dumps(peak_memory(sizes, args.peak_memory)))
        return {}
    started = time.perf_counter()
    result = {
        "bench": "moe_block_fwd_bwd",
        "sizes": sizes,
        "lora": {"r": sizes["rank"], "alpha": 2 * sizes["rank"], "base_frozen": True},
        "threads": torch.get_num_threads(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "torch": torch.__version__,
        "targets": {"lora_speedup_vs_best_stock": ">= 1.5", "lora_overhead": "<= 1.25"},
    }
    for name in filter(None, args.dtypes.split(",")):
        dtype = getattr(torch, name)
        rounds = args.rounds or (3 if args.quick else (3 if dtype == torch.float32 else 5))
        result[name] = measure(sizes, dtype, rounds)
    if not args.no_4bit:
        result["4bit_experts"] = measure_4bit(sizes, args.rounds or 3, args.quick)
    result["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    result["seconds"] = round(time.perf_counter() - started, 1)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
