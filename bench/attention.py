"""Attention over packed rows on CPU: which exact method is fastest, per shape (forward+backward).

    python bench/attention.py            # prints ONE JSON object
    python bench/attention.py --quick    # a smoke run

A packed row of L tokens holds documents of some length; each document must attend only to
itself (causal, and within the sliding window on sliding layers). Methods, all exact:

* `block_mask`: one sdpa call per batch with the [B, 1, L, L] block-diagonal boolean mask
  (what transformers' "sdpa" does with packed position_ids); the mask is built from the
  position_ids inside the timed step, as the model builds it every forward;
* `per_document`: one sdpa call per document block (archtune's "sdpa_packed": documents
  shorter than 64 tokens share a block), each with its diagonal slice of that mask;
* `band`: chunks of C queries attend to the 2C keys before and in them, one sdpa call for the
  batch (C = the farthest any query looks back: the window, or the longest document);
* `archtune`: what "sdpa_packed" runs (`document_sdpa_attention`): band or per-document blocks,
  whichever computes fewer scores (its choice is reported as `archtune_layout`);
* `flex`: torch's flex_attention with a document mask, reported only where it runs (on CPU it
  needs torch.compile; when it fails the reason is recorded).

Shapes: the tiny gemma4-moe of the speed comparisons (4 heads, 2 KV heads, head dim 16) and a
Gemma 4 26B-A4B-like layer (16 heads, 8 KV heads, head dim 256), each with short documents
(~25 tokens, the quickstart data) and longer ones (100-400 tokens), full and sliding (window
512 for the large layer, 32 for the tiny one) layers. Timed with this thread's CPU time,
interleaved round by round, single-threaded; ratios only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

MODELS = {
    "tiny-gemma4-moe": dict(heads=4, kv_heads=2, head_dim=16, window=32),
    "gemma4-26b-a4b-like": dict(heads=16, kv_heads=8, head_dim=256, window=512),
}
DOCS = {"short": (15, 40), "long": (100, 400)}


def packed_positions(batch: int, length: int, doc_range: tuple[int, int], seed: int) -> torch.Tensor:
    """[B, L] position_ids of rows filled with documents drawn from doc_range (the last one cut)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        pos, left = [], length
        while left > 0:
            n = min(left, int(torch.randint(doc_range[0], doc_range[1] + 1, (1,), generator=gen)))
            pos.append(torch.arange(n))
            left -= n
        rows.append(torch.cat(pos))
    return torch.stack(rows)


def document_mask(position_ids: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, L, L] boolean: same document, causal, within the window."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    doc = starts.cumsum(-1)
    i = torch.arange(position_ids.shape[1], device=position_ids.device)
    mask = (doc[:, :, None] == doc[:, None, :]) & (i[None, :, None] >= i[None, None, :])
    if window is not None:
        mask &= (i[None, :, None] - i[None, None, :]) < window
    return mask[:, None]


def blocks_of(position_ids: torch.Tensor, min_block: int = 64) -> list[list[tuple[int, int]]]:
    out = []
    for row in position_ids:
        starts = (row == 0).nonzero().flatten().tolist()[1:] + [row.numel()]
        spans, begin = [], 0
        for end in starts:
            if end - begin >= min_block or end == row.numel():
                spans.append((begin, end))
                begin = end
        out.append(spans)
    return out


def run_block_mask(q, k, v, pos, window, grad):
    mask = document_mask(pos, window)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out.backward(grad)


def run_per_document(q, k, v, pos, window, grad):
    mask = document_mask(pos, window)
    rows = []
    for b, spans in enumerate(blocks_of(pos)):
        parts = [F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                                attn_mask=mask[b:b + 1, :, s:e, s:e], enable_gqa=True)
                 for s, e in spans]
        rows.append(torch.cat(parts, dim=2))
    torch.cat(rows).backward(grad)


def run_per_document_causal(q, k, v, pos, window, grad):
    """per_document, but a block holding one document (within the window) runs sdpa's causal
    kernel with no mask at all; the others get their mask slice."""
    mask = None
    rows = []
    for b, spans in enumerate(blocks_of(pos)):
        parts = []
        for s, e in spans:
            single = bool((pos[b, s:e] == torch.arange(e - s)).all())
            if single and (window is None or e - s <= window):
                parts.append(F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e],
                                                            v[b:b + 1, :, s:e], is_causal=True, enable_gqa=True))
                continue
            if mask is None:
                mask = document_mask(pos, window)
            parts.append(F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                                        attn_mask=mask[b:b + 1, :, s:e, s:e], enable_gqa=True))
        rows.append(torch.cat(parts, dim=2))
    torch.cat(rows).backward(grad)


class _Module:  # what transformers' attention functions read from the attention module
    is_causal = True

    def __init__(self, groups: int):
        self.num_key_value_groups = groups


def run_band(q, k, v, pos, window, grad):
    from archtune.patches.packing import _band_attention, _window_band

    mask = document_mask(pos, window)
    chunk, band = _window_band(mask, mask.shape[-1])
    _band_attention(q, k, v, chunk, band, 0.0, None).backward(grad.transpose(1, 2))


def run_archtune(q, k, v, pos, window, grad):
    from archtune.patches.packing import document_sdpa_attention

    out, _ = document_sdpa_attention(_Module(q.shape[1] // k.shape[1]), q, k, v, document_mask(pos, window),
                                     position_ids=pos)
    out.backward(grad.transpose(1, 2))


def archtune_layout(pos, window) -> str:
    from archtune.patches.packing import _attention_layout

    mask = document_mask(pos, window)
    layout = _attention_layout(mask, pos, mask.shape[-1], mask.shape[-1])
    return "plain sdpa" if layout is None else f"band of {layout[1]}" if layout[0] == "band" else "blocks"


def make_flex(window):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:  # pragma: no cover
        return None, f"flex_attention unavailable: {exc}"
    compiled = torch.compile(flex_attention)

    def run(q, k, v, pos, w, grad):
        starts = torch.ones_like(pos, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        doc = starts.cumsum(-1)

        def mask_mod(b, h, qi, ki):
            ok = (doc[b, qi] == doc[b, ki]) & (qi >= ki)
            return ok & (qi - ki < w) if w is not None else ok

        bm = create_block_mask(mask_mod, pos.shape[0], None, pos.shape[1], pos.shape[1], device=pos.device)
        compiled(q, k, v, block_mask=bm, enable_gqa=True).backward(grad)
    return run, None


def measure(model: dict, docs: tuple[int, int], window: int | None, batch: int, length: int, rounds: int,
            with_flex: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    h, kvh, d = model["heads"], model["kv_heads"], model["head_dim"]
    q = torch.randn(batch, h, length, d, generator=gen).requires_grad_(True)
    k = torch.randn(batch, kvh, length, d, generator=gen).requires_grad_(True)
    v = torch.randn(batch, kvh, length, d, generator=gen).requires_grad_(True)
    grad = torch.randn(batch, h, length, d, generator=gen)
    pos = packed_positions(batch, length, docs, seed=1)
    methods = {"block_mask": run_block_mask, "per_document": run_per_document,
               "per_document_causal": run_per_document_causal, "band": run_band, "archtune": run_archtune}
    notes = {"archtune_layout": archtune_layout(pos, window)}
    if with_flex:
        flex, why = make_flex(window)
        if flex is None:
            notes["flex"] = why
        else:
            try:
                flex(q, k, v, pos, window, grad)
                methods["flex"] = flex
            except Exception as exc:
                notes["flex"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    # exactness: every method gives the same output as block_mask
    ref = None
    for name, fn in methods.items():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v, pos, window, grad)
        gq = q.grad.clone()
        if ref is None:
            ref = gq
        notes.setdefault("max_grad_diff", {})[name] = float((gq - ref).abs().max())
    times = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            for t in (q, k, v):
                t.grad = None
            t0 = time.thread_time()
            fn(q, k, v, pos, window, grad)
            times[name].append(time.thread_time() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    best = min(med, key=med.get)
    return {"ms": {n: round(t * 1e3, 2) for n, t in med.items()}, "fastest": best,
            "per_document_vs_block_mask": round(med["block_mask"] / med["per_document"], 3),
            "archtune_vs_fastest": round(med[best] / med["archtune"], 3), **notes}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--flex", action="store_true", help="also try flex_attention (compiles; slow to start)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = {"bench": "packed_attention_fwd_bwd", "torch": torch.__version__, "threads": 1, "shapes": []}
    started = time.perf_counter()
    for mname, model in MODELS.items():
        batch, length = (4, 512) if mname.startswith("tiny") else (1, 2048)
        if args.quick:
            batch, length = 2, 256
        for dname, docs in DOCS.items():
            for layer in ("full", "sliding"):
                window = model["window"] if layer == "sliding" else None
                r = measure(model, docs, window, batch, length, 2 if args.quick else args.rounds, args.flex)
                result["shapes"].append({"model": mname, "docs": dname, "layer": layer, "batch": batch,
                                         "length": length, **r})
    result["seconds"] = round(time.perf_counter() - started, 1)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
