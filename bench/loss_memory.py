"""Loss memory on CPU: archtune's chunked linear cross-entropy vs the stock loss, one training step.

    python bench/loss_memory.py            # prints ONE JSON object (about 2 minutes, 2 cores, ~14 GB free RAM)
    python bench/loss_memory.py --quick    # vocabulary 32,768 and 1,024 tokens: a smoke run

The model is a Gemma 4 text decoder (`Gemma4ForCausalLM`: final_logit_softcapping 30, lm_head
tied to the embeddings) with a 262,144-token vocabulary, hidden size 64 and 2 layers, in fp32;
one sequence of 4,096 tokens, every token a label. A step is forward, backward and an AdamW
update of every weight. Each variant runs in its own process, so that its peak RSS
(`ru_maxrss`) is its own:

* `stock`: transformers' loss (the model's `loss_function` over the full logits);
* `chunked`: archtune's `ChunkedCrossEntropy` (8 chunks) installed on the same model.

Reported: `peak_rss_ratio` (chunked / stock peak RSS of the process, whose only large
allocation is the step; target <= 0.25) and `step_rss_ratio` (the same for the growth of RSS
over the built model), `loss_rel_diff` and `grad_max_rel_diff` (max over parameters of
max|g_chunked - g_stock| / max|g_stock|, first step, before the update; target <= 1e-5), and
`step_time_ratio` (median CPU time of the timed steps, chunked / stock; target <= 1.1). The
processes run one after the other, single-threaded (`torch.set_num_threads(1)`), and the
ratio uses CPU time (`time.process_time`), which a shared machine disturbs much less than wall
time (both are reported, with the load average before and after).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SIZES = dict(vocab=262_144, hidden=64, layers=2, tokens=4096, chunks=8, timed_steps=2)
QUICK = dict(vocab=32_768, hidden=64, layers=2, tokens=1024, chunks=8, timed_steps=2)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(sizes: dict):
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(
        vocab_size=sizes["vocab"], hidden_size=sizes["hidden"], intermediate_size=2 * sizes["hidden"],
        num_hidden_layers=sizes["layers"], num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        global_head_dim=32, layer_types=["sliding_attention", "full_attention"][: sizes["layers"]],
        sliding_window=512, max_position_embeddings=sizes["tokens"], final_logit_softcapping=30.0,
        tie_word_embeddings=True, hidden_size_per_layer_input=0, vocab_size_per_layer_input=sizes["vocab"],
        pad_token_id=0, bos_token_id=2, eos_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma4ForCausalLM(config)
    model.config.use_cache = False
    model.train()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, sizes["vocab"], (1, sizes["tokens"]), generator=generator)
    return model, ids


def child(variant: str, sizes: dict, grads_path: str) -> dict:
    """One process, one variant: first step (memory, loss, gradients), then timed steps."""
    import torch

    torch.set_num_threads(1)
    import archtune.train.trainer  # noqa: F401  (both variants import the same modules before the baseline)

    model, ids = build(sizes)
    labels = ids.clone()
    if variant == "chunked":
        from archtune.train.losses import ChunkedCrossEntropy

        chunked = ChunkedCrossEntropy.install(model, num_chunks=sizes["chunks"])
        context = lambda: chunked.labels(labels)  # noqa: E731
    else:
        import contextlib

        context = contextlib.nullcontext
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rss_model = _rss_mb()

    def step(first: bool = False):
        with context():
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        if first:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            torch.save({"loss": loss.detach(), "grads": grads}, grads_path)
            del grads
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    step(first=True)
    peak_first = _peak_rss_mb()
    cpu, wall = [], []
    for _ in range(sizes["timed_steps"]):
        c0, w0 = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {"variant": variant, "rss_model_mb": round(rss_model, 1), "peak_rss_mb": round(peak_first, 1),
            "step_rss_mb": round(peak_first - rss_model, 1), "cpu_s": [round(c, 3) for c in cpu],
            "wall_s": [round(w, 3) for w in wall]}


def run_child(variant: str, sizes: dict, grads_path: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--sizes", json.dumps(sizes), "--grads", grads_path]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(stock_path: str, chunked_path: str) -> dict:
    import torch

    stock, chunked = torch.load(stock_path), torch.load(chunked_path)
    loss_rel = abs(float(chunked["loss"]) - float(stock["loss"])) / abs(float(stock["loss"]))
    worst, worst_name = 0.0, None
    for name, g in stock["grads"].items():
        other = chunked["grads"].get(name)
        if other is None:
            return {"loss_rel_diff": loss_rel, "grad_max_rel_diff": None, "missing_grad": name}
        rel = float((other - g).abs().max() / g.abs().max().clamp_min(1e-30))
        if rel > worst:
            worst, worst_name = rel, name
    extra = sorted(set(chunked["grads"]) - set(stock["grads"]))
    return {"loss_stock": float(stock["loss"]), "loss_chunked": float(chunked["loss"]), "loss_rel_diff": loss_rel,
            "grad_max_rel_diff": worst, "grad_worst_param": worst_name, "grads_compared": len(stock["grads"]),
            "extra_grads": extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=["stock", "chunked"])
    parser.add_argument("--sizes")
    parser.add_argument("--grads")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.sizes), args.grads)))
        return
    sizes = QUICK if args.quick else SIZES
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {v: str(Path(tmp) / f"{v}.pt") for v in ("chunked", "stock")}
        runs = {v: run_child(v, sizes, paths[v]) for v in ("chunked", "stock")}
        numbers = compare(paths["stock"], paths["chunked"])
    stock, chunked = runs["stock"], runs["chunked"]
    result = {
        "bench": "loss_memory",
        "sizes": sizes,
        "peak_rss_ratio": round(chunked["peak_rss_mb"] / stock["peak_rss_mb"], 4),
        "step_rss_ratio": round(chunked["step_rss_mb"] / stock["step_rss_mb"], 4),
        "step_time_ratio": round(statistics.median(chunked["cpu_s"]) / statistics.median(stock["cpu_s"]), 4),
        "step_wall_ratio": round(statistics.median(chunked["wall_s"]) / statistics.median(stock["wall_s"]), 4),
        **numbers,
        "runs": runs,
        "targets": {"peak_rss_ratio": 0.25, "grad_max_rel_diff": 1e-5, "loss_rel_diff": 1e-5, "step_time_ratio": 1.1},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    result["passed"] = bool(result["peak_rss_ratio"] <= 0.25 and result["step_time_ratio"] <= 1.1
                            and numbers["loss_rel_diff"] <= 1e-5 and (numbers["grad_max_rel_diff"] or 1) <= 1e-5)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
