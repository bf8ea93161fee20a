"""The exactness table of `scattermoe_triton` against transformers' eager experts loop.

    TRITON_INTERPRET=1 python bench/triton_exactness.py            # CPU, Triton's interpreter
    python bench/triton_exactness.py --device cuda                  # the compiled kernels on a GPU
    TRITON_INTERPRET=1 python bench/triton_exactness.py --markdown  # the table as Markdown

Per experts layout (tests/unit/test_scattermoe.py's tiny blocks: Gemma 4 and Qwen 3.5 MoE
[E, out, in], Aria [E, in, out], gpt-oss with biases and its own gate; hidden 32, 8 experts, top-2,
24 tokens) x dtype (fp32, bf16) x mode (full fine-tuning, expert LoRA; and 4-bit experts frozen / with
expert LoRA, against eager on the dequantized tensors): the max absolute and the max relative
difference (max |a - b| / max |b|, per tensor) of the output and of every gradient, one JSON line each.
The same cases and tolerances as tests/unit/test_triton_experts.py (fp32 1e-5, bf16 3e-2), whose
helpers build them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMPL = "scattermoe_triton"


def diffs(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.double(), b.double()
    diff = (a - b).abs().max().item()
    top = b.abs().max().item()
    return diff, diff / top if top > 0 else diff


def case(kind: str, dtype: torch.dtype, mode: str, device: str) -> dict:
    from tests.unit.test_scattermoe import run_block
    from tests.unit.test_triton_experts import _block, _inputs

    four_bit = mode.startswith("4bit")
    lora = mode.endswith("lora")
    if four_bit:
        from tests.unit.test_quant4 import by_tensor, quantized_pair, twin_config

        block, twin, config = quantized_pair(kind, lora)
        ref_block, ref_config = twin, twin_config(twin, lora)
    else:
        block, config = _block(kind, lora, base_trainable=not lora)
        ref_block, ref_config = block, config
    block.to(device=device, dtype=dtype)
    ref_block.to(device=device, dtype=dtype)
    inputs = [t.to(device) for t in _inputs(allowed=[0, 1, 2, 4, 5, 6] if four_bit else None, dtype=dtype)]
    ours = run_block(block, config, IMPL, *inputs)
    ref = run_block(ref_block, ref_config, "eager", *inputs)
    if four_bit:
        ours, ref = (ours[0], by_tensor(block, ours[1])), (ref[0], by_tensor(ref_block, ref[1]))
    tensors = {"output": diffs(ours[0], ref[0])}
    tensors.update({name: diffs(ours[1][name], g) for name, g in ref[1].items()})
    worst = max(rel for _, rel in tensors.values())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    return {"layout": kind, "dtype": str(dtype).removeprefix("torch."), "mode": mode, "device": device,
            "max_rel": worst, "within_tolerance": worst < tol, "tolerance": tol,
            "tensors": {k: {"max_abs": a, "max_rel": r} for k, (a, r) in tensors.items()}}


MODES = ["full_finetune", "lora", "4bit_frozen", "4bit_lora"]


def short(name: str) -> str:
    """`experts.base_layer.lora_A.default.weight` -> `lora_A` (of gate_up), `experts.down_proj` -> `down_proj`."""
    if name.startswith(("gate_up_proj.", "down_proj.")):  # 4-bit rows: keyed by the adapted tensor
        return name.replace("_proj.", ".")
    parts = name.split(".")
    if "lora_A" in parts or "lora_B" in parts:
        part = next(p for p in parts if p.startswith("lora_"))
        # PEFT nests down_proj's wrapper outside gate_up_proj's: base_layer.lora_* adapts gate_up_proj
        target = "gate_up" if "base_layer" in parts else "down"
        return f"{target}.{part}"
    return parts[-1]


def markdown(rows: list[dict]) -> str:
    lines = ["| layout | dtype | mode | output | hidden states | routing weights | expert tensors / LoRA factors (max rel) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["tensors"]
        rest = ", ".join(f"{short(k)} {v['max_rel']:.1e}" for k, v in t.items()
                         if k not in ("output", "hidden_states", "top_k_weights"))
        cell = lambda k: f"{t[k]['max_abs']:.1e} / {t[k]['max_rel']:.1e}"  # noqa: E731
        lines.append(f"| {r['layout']} | {r['dtype']} | {r['mode']} | {cell('output')} | {cell('hidden_states')} "
                     f"| {cell('top_k_weights')} | {rest} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args()
    import archtune.moe  # noqa: F401  (registers scattermoe_triton)
    from archtune.moe.triton_experts import unavailable

    why = unavailable(args.device)
    if why:
        sys.exit(f"scattermoe_triton cannot run on {args.device}: {why}")
    rows = []
    for kind in ("gemma4", "qwen3_5", "aria", "gpt_oss"):
        for dtype in (torch.float32, torch.bfloat16):
            for mode in MODES:
                if mode.startswith("4bit") and (kind == "gpt_oss" or dtype != torch.float32):
                    continue  # 4-bit experts: the layouts quant4 supports, fp32 compute as in its tests
                rows.append(case(kind, dtype, mode, args.device))
                print(json.dumps({"check": "triton_exactness", **rows[-1]}), flush=True)
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
