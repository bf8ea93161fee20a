"""End-to-end LoRA + expert LoRA train loop at real widths: experts implementations side by side.

    python bench/moe_train_loop.py                      # CUDA: both models, grouped_mm vs scattermoe_triton
    python bench/moe_train_loop.py --impls grouped_mm,batched_mm,scattermoe_triton --steps 8
    TRITON_INTERPRET=1 python bench/moe_train_loop.py --tiny --cpu-smoke   # tries the script on CPU

The models are bench/real_width.py's 2-layer truncations at the published text widths (Gemma 4
26B-A4B: hidden 2816, 128 experts of width 704, top-8; Qwen 3.5 35B-A3B: hidden 2048, 256 experts
of width 512, top-8), built from their configs in bf16 directly on the device (random weights, no
checkpoint written). LoRA r16 on the family's default targets (attention and MLP projections of
the language model) plus expert LoRA on experts.gate_up_proj / experts.down_proj (PEFT
target_parameters), AdamW, micro batch `--batch` x `--seq` tokens of random ids, no gradient
checkpointing.

Per model, in ONE process on the same weights: first one forward + backward per implementation
from the same state, in bf16 and in fp32 (loss and every LoRA gradient against the first
implementation's: the exactness on this device), then `--rounds` rounds, each running `--steps` optimizer steps per
implementation in turn (interleaved, so drift on a shared GPU hits all alike); per implementation
the median step time over the rounds (CUDA events, after 2 warm-up steps that also compile the
Triton kernels), tokens/s, and the peak memory of its steps (torch.cuda.max_memory_allocated, reset
before each implementation's steps; the weights and the optimizer state are shared, so the
difference is the implementations' own). One JSON line per model, ratios against `--baseline`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
DEV = "cuda" if torch.cuda.is_available() else "cpu"
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def emit(**row) -> None:
    print(json.dumps({"check": "moe_train_loop", **row}), flush=True)


def build(model: str, tiny: bool):
    """(PEFT model on DEV in bf16, vocab size)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    import archtune.moe  # noqa: F401  (registers scattermoe and scattermoe_triton)
    from archtune.families import detect
    from archtune.models.tiny import build_tiny_config

    import real_width

    tiny_name = real_width.MODELS[model][0]
    config = build_tiny_config(tiny_name) if tiny else real_width.model_config(model)
    family = detect(config.to_dict())
    torch.manual_seed(0)
    with torch.device(DEV):
        base = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=family.lora_target_regex,
                      target_parameters=EXPERTS)
    model_ = get_peft_model(base, lora)
    model_.train()
    return model_, config.get_text_config().vocab_size


def use(model, impl: str) -> None:
    """`impl` for every experts module, PEFT set up as archtune runs it (skip_parametrization_check for
    archtune's implementations, PEFT as shipped for transformers' own: what a user of each gets)."""
    import archtune.moe

    model.set_experts_implementation(impl)
    for m in model.modules():
        m.__dict__.pop("_activate_lora", None)
    if impl in archtune.moe.FORWARDS:
        archtune.moe.skip_parametrization_check(model)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def step(model, opt, ids) -> float:
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def timed_steps(model, opt, batches) -> list[float]:
    """Seconds of each step (CUDA events on a GPU)."""
    out = []
    for ids in batches:
        if DEV == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(model, opt, ids)
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step(model, opt, ids)
            out.append(time.perf_counter() - t0)
    return out


def first_gradients(model, impls: list[str], ids) -> dict:
    """Loss and LoRA gradients of one forward + backward per implementation, from the same weights."""
    results = {}
    for impl in impls:
        use(model, impl)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        results[impl] = (loss.item(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                                       if p.grad is not None})
    model.zero_grad(set_to_none=True)
    ref_loss, ref = results[impls[0]]
    rows = {}
    for impl, (loss, grads) in results.items():
        err = max(float((grads[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in ref.items())
        rows[impl] = {"loss": round(loss, 5), "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss),
                      "max_grad_rel_err": err, "expert_lora_grads": sum("experts" in n for n in grads)}
    return rows


def run_model(name: str, args) -> dict:
    from archtune.moe.triton_experts import unavailable

    impls = args.impls.split(",")
    skipped = {}
    if "scattermoe_triton" in impls and unavailable(DEV) is not None:
        skipped["scattermoe_triton"] = unavailable(DEV)
        impls.remove("scattermoe_triton")
    model, vocab = build(name, args.tiny)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(5, vocab, (args.batch, args.seq), generator=gen).to(DEV) for _ in range(args.steps + 2)]
    # the same weights in fp32 (bf16 -> fp32 -> bf16 is exact): there the implementations agree to round-off,
    # where bf16 runs of a random model differ by bf16's own noise (grouped_mm vs eager alike)
    exact = {"bfloat16": first_gradients(model, impls, batches[0])}
    model.float()
    exact["float32"] = first_gradients(model, impls, batches[0])
    model.to(torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = {impl: [] for impl in impls}
    peak = {impl: 0 for impl in impls}
    errors = {}
    for _ in range(args.rounds):
        for impl in impls:
            if impl in errors:
                continue
            use(model, impl)
            try:
                timed_steps(model, opt, batches[:2])  # warm-up (Triton compiles here)
                if DEV == "cuda":
                    sync()
                    torch.cuda.reset_peak_memory_stats()
                times[impl] += timed_steps(model, opt, batches[2:])
                if DEV == "cuda":
                    peak[impl] = max(peak[impl], torch.cuda.max_memory_allocated())
            except Exception as exc:  # e.g. out of memory for one implementation: the others still run
                errors[impl] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                if DEV == "cuda":
                    torch.cuda.empty_cache()
    tokens = args.batch * args.seq
    rows = {}
    for impl, t in times.items():
        if t:
            med = statistics.median(t)
            rows[impl] = {"step_ms": round(med * 1e3, 2), "tokens_per_s": round(tokens / med, 1),
                          "peak_gib": round(peak[impl] / 2**30, 3) if DEV == "cuda" else None, "steps": len(t)}
    base = rows.get(args.baseline)
    ratios = {}
    if base:
        for impl, r in rows.items():
            if impl != args.baseline:
                ratios[impl] = {"throughput_vs_" + args.baseline: round(r["tokens_per_s"] / base["tokens_per_s"], 3),
                                "peak_vs_" + args.baseline: (round(r["peak_gib"] / base["peak_gib"], 3)
                                                             if base["peak_gib"] else None)}
    del model, opt
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return {"model": name, "tiny": args.tiny, "dtype": "bfloat16", "batch": args.batch, "seq": args.seq,
            "tokens_per_step": tokens, "results": rows, "ratios": ratios, "exactness": exact, "errors": errors,
            "skipped": skipped}


def main(argv: list[str] | None = None) -> None:
    import real_width

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(real_width.MODELS), help="comma-separated bench/real_width.py MODELS")
    parser.add_argument("--impls", default="grouped_mm,scattermoe_triton")
    parser.add_argument("--baseline", default="grouped_mm")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per implementation and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tiny family models instead of the real widths")
    parser.add_argument("--cpu-smoke", action="store_true", help="run on CPU to try the script")
    args = parser.parse_args(argv)
    if DEV == "cpu" and not args.cpu_smoke:
        sys.exit("bench/moe_train_loop.py needs a CUDA GPU (--cpu-smoke tries the script on CPU)")
    print(json.dumps({"check": "device", "name": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu",
                      "torch": torch.__version__}), flush=True)
    for name in args.models.split(","):
        emit(**run_model(name, args))


if __name__ == "__main__":
    main()
