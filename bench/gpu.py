"""archtune's GPU checks, for a session that is lent a CUDA machine: one JSON line per result.

    python bench/gpu.py moe         # experts implementations at bench/moe.py's sweep shapes
    python bench/gpu.py attention   # exact document-attention methods over packed rows
    torchrun --nproc_per_node 1 bench/gpu.py fsdp   # FSDP2 (fully_shard, NCCL) vs unsharded
    bash bench/gpu_check.sh         # all of them plus `archtune train` runs, into $OUT

CPU benchmarks time with this thread's CPU time; here every step is timed with CUDA events after
warm-up, median of `--reps`. Exactness is checked on the same device: each method's gradients
against a reference method's, and scattermoe's against grouped_mm's.

moe: `scattermoe` runs scattermoe's default strategy for the device (on CUDA "grouped": one
grouped_mm per product over all experts), and the other strategy is timed beside it under its
own name (`scattermoe_loop` on CUDA, `scattermoe_grouped` on CPU; bench/moe_strategies.py);
`scattermoe_strategy` says which strategy `scattermoe` ran. `scattermoe_triton` (the Triton
kernels, when triton runs here) is timed beside them: `triton_vs_grouped_mm`, `triton_vs_batched_mm`
(> 1: the kernels faster) and its gradients' `grad_rel_err_triton_vs_*`; `best_stock` excludes
all of archtune's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# CUDA when there is one; `--cpu-smoke` runs the same code on CPU (wall-clock timing) to try the script.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def emit(kind: str, **row) -> None:
    print(json.dumps({"check": kind, **row}), flush=True)


def cuda_ms(fn, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of `fn` on the current CUDA stream (events around each call)."""
    for _ in range(warmup):
        fn()
    if DEV == "cpu":
        import time
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------ MoE

def moe(args) -> None:
    import moe as bench_moe
    import moe_strategies
    from archtune.moe.routing_stats import experts_modules
    from archtune.moe.scattermoe import STRATEGIES, resolve_strategy
    from archtune.moe.triton_experts import unavailable as triton_unavailable
    from archtune.plan.experts import choose_experts_implementation

    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    shapes = bench_moe.sweep_shapes() if not args.quick else [dict(bench_moe.QUICK)]
    if args.only:
        shapes = [s for s in shapes if f"{s['experts']}-{s['top_k']}-{s['tokens']}-{s['hidden']}" in args.only.split(",")]
    for shape in shapes:
        for dtype in dtypes:
            for lora in (False, True):
                _, plain, lora_block = bench_moe.build(shape, dtype, "lora" if lora else "plain")
                block = (lora_block if lora else plain).to(DEV)
                gen = torch.Generator().manual_seed(1)
                x = torch.randn(shape["tokens"], shape["hidden"], generator=gen).to(dtype).to(DEV)
                grad = torch.randn(shape["tokens"], shape["hidden"], generator=gen).to(dtype).to(DEV)
                experts = experts_modules(block)[0][1]
                index = torch.zeros(shape["tokens"], shape["top_k"], dtype=torch.long, device=DEV)
                strategy = resolve_strategy(experts, x, index)[0]
                other = next(f"scattermoe_{s}" for s in STRATEGIES if s != strategy)
                impls = ["grouped_mm", "scattermoe", other, "eager"]
                if triton_unavailable(DEV) is None:
                    impls.insert(1, "scattermoe_triton")
                pairs = shape["tokens"] * shape["top_k"]
                if pairs * shape["hidden"] * 3 * shape["intermediate"] * x.element_size() <= bench_moe.BATCHED_MM_BYTES:
                    impls.append("batched_mm")
                if args.impls:
                    impls = [i for i in impls if i in args.impls.split(",")]
                ms, errors, grads = {}, {}, {}
                for impl in impls:
                    try:
                        moe_strategies.run_impl(block, impl, x, grad)
                        grads[impl] = [p.grad.detach().clone() for p in block.parameters() if p.grad is not None]
                        ms[impl] = round(cuda_ms(lambda: moe_strategies.run_impl(block, impl, x, grad), args.reps), 3)
                    except Exception as exc:  # a stock path may not support this dtype on this torch
                        errors[impl] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                choice = choose_experts_implementation(
                    num_experts=shape["experts"], top_k=shape["top_k"], hidden=shape["hidden"],
                    intermediate=shape["intermediate"], tokens=shape["tokens"], expert_lora=lora,
                    dtype=str(dtype).removeprefix("torch."), device=DEV)
                stock = {k: v for k, v in ms.items() if not k.startswith("scattermoe")}
                best = min(stock, key=stock.get) if stock else None
                row = {k: shape[k] for k in ("experts", "top_k", "tokens", "hidden", "intermediate")}
                row.update(dtype=str(dtype).removeprefix("torch."), lora=lora, ms=ms, errors=errors,
                           best_stock=best, rule_choice=choice.name, scattermoe_strategy=strategy)
                if best and "scattermoe" in ms:
                    row["scattermoe_vs_best_stock"] = round(ms[best] / ms["scattermoe"], 3)
                    chosen = ms.get(choice.name)
                    row["rule_vs_best"] = round(min(ms.values()) / chosen, 3) if chosen else None
                if "scattermoe" in ms and other in ms:
                    row[f"scattermoe_vs_{other}"] = round(ms[other] / ms["scattermoe"], 3)
                if "scattermoe_triton" in ms:  # the Triton kernels against transformers' CUDA paths
                    for ref in ("grouped_mm", "batched_mm", "scattermoe"):
                        if ref in ms:
                            row[f"triton_vs_{ref}"] = round(ms[ref] / ms["scattermoe_triton"], 3)
                        if ref in grads and "scattermoe_triton" in grads:
                            row[f"grad_rel_err_triton_vs_{ref}"] = max(
                                rel_err(a, b) for a, b in zip(grads["scattermoe_triton"], grads[ref]))
                if "scattermoe" in grads and "grouped_mm" in grads:
                    row["grad_rel_err_scattermoe_vs_grouped_mm"] = max(
                        rel_err(a, b) for a, b in zip(grads["scattermoe"], grads["grouped_mm"]))
                for ref in ("grouped_mm", "scattermoe"):
                    if other in grads and ref in grads:
                        row[f"grad_rel_err_{other}_vs_{ref}"] = max(
                            rel_err(a, b) for a, b in zip(grads[other], grads[ref]))
                emit("moe", **row)
                del block, plain, lora_block, grads
                if DEV == "cuda":
                    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ attention

def attention(args) -> None:
    import attention as bench_attention  # its methods and mask follow the rows' device

    flex, why = bench_attention.make_flex(None)  # the window is each call's argument
    if flex is None:
        emit("attention_note", flex=why)
    methods = {"block_mask": bench_attention.run_block_mask, "per_document": bench_attention.run_per_document,
               "archtune": bench_attention.run_archtune}
    if flex is not None and not args.no_flex:
        methods["flex"] = flex
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods.split(",")}
    length, batch = (512, 2) if args.quick else (args.length, args.batch)
    for model_name, model in bench_attention.MODELS.items():
        if args.models and model_name not in args.models.split(","):
            continue
        for docs_name, docs in bench_attention.DOCS.items():
            for window in (None, model["window"]):
                gen = torch.Generator().manual_seed(0)
                h, kvh, d = model["heads"], model["kv_heads"], model["head_dim"]
                dtype = torch.bfloat16

                def leaf(*shape):
                    return torch.randn(*shape, generator=gen).to(dtype).to(DEV).requires_grad_(True)

                q, k, v = leaf(batch, h, length, d), leaf(batch, kvh, length, d), leaf(batch, kvh, length, d)
                grad = torch.randn(batch, h, length, d, generator=gen).to(dtype).to(DEV)
                pos = bench_attention.packed_positions(batch, length, docs, seed=1).to(DEV)
                ms, errs, notes, ref = {}, {}, {}, None
                for name, fn in methods.items():
                    try:
                        for t in (q, k, v):
                            t.grad = None
                        fn(q, k, v, pos, window, grad)
                        got = q.grad.detach().clone()
                        if ref is None:
                            ref = got
                        errs[name] = round(rel_err(got, ref), 5)

                        def call(fn=fn):
                            for t in (q, k, v):
                                t.grad = None
                            fn(q, k, v, pos, window, grad)
                        ms[name] = round(cuda_ms(call, args.reps), 3)
                    except Exception as exc:
                        notes[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                fastest = min(ms, key=ms.get) if ms else None
                emit("attention", model=model_name, docs=docs_name, window=window, batch=batch, length=length,
                     dtype="bfloat16", ms=ms, fastest=fastest, grad_rel_err_vs_block_mask=errs, errors=notes,
                     archtune_vs_fastest=round(ms[fastest] / ms["archtune"], 3) if "archtune" in ms else None)


# ----------------------------------------------------------------------------------------- FSDP

def fsdp(args) -> None:
    """FSDP2 over one GPU (NCCL, world size 1) against the same model unsharded: same losses."""
    import copy

    import torch.distributed as dist

    from archtune.models.tiny import build_tiny_model
    from archtune.train.distributed import shard_model, sharded_parameters

    dist.init_process_group("nccl" if DEV == "cuda" else "gloo")
    if DEV == "cuda":
        torch.cuda.set_device(0)
    model, _ = build_tiny_model(args.model, dtype=torch.bfloat16)
    model.train().to(DEV)
    sharded = copy.deepcopy(model)
    layer_classes = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("DecoderLayer")})
    units = shard_model(sharded, {"layer_classes": layer_classes, "reshard_after_forward": True})
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(5, vocab, (4, 256), generator=gen).to(DEV) for _ in range(args.steps)]
    losses = {"unsharded": [], "fsdp2": []}
    for name, m in (("unsharded", model), ("fsdp2", sharded)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        for ids in batches:
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(round(float(loss), 5))
    diffs = [abs(a - b) for a, b in zip(losses["unsharded"], losses["fsdp2"])]
    emit("fsdp2_one_gpu", model=args.model, layer_units=units, sharded_parameters=sharded_parameters(sharded),
         layer_classes=layer_classes, losses=losses, max_loss_diff=max(diffs), dtype="bfloat16",
         peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if DEV == "cuda" else None)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["moe", "attention", "fsdp"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--methods", help="attention: comma-separated subset of block_mask,per_document,archtune,flex")
    parser.add_argument("--impls", help="moe: comma-separated subset of the experts implementations to time "
                                        "(grouped_mm, scattermoe_triton, scattermoe, scattermoe_loop, eager, batched_mm)")
    parser.add_argument("--only", help="moe: comma-separated EXPERTS-TOPK-TOKENS-HIDDEN shapes of the sweep")
    parser.add_argument("--models", help="attention: comma-separated subset of bench/attention.py's MODELS")
    parser.add_argument("--model", default="gemma4-moe")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cpu-smoke", action="store_true", help="run on CPU to try the script")
    args = parser.parse_args()
    if DEV == "cpu" and not args.cpu_smoke:
        sys.exit("bench/gpu.py needs a CUDA GPU (--cpu-smoke tries the script on CPU)")
    emit("device", name=torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", torch=torch.__version__, what=args.what,
         pid=os.getpid())
    {"moe": moe, "attention": attention, "fsdp": fsdp}[args.what](args)


if __name__ == "__main__":
    main()
