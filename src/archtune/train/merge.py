"""`archtune merge-lora` for a QLoRA run: the adapter merged into its dequantized 4-bit base.

Here, after moe/, because a run with 4-bit experts (`quantize_moe_experts`) merges into the
experts as training saw them (through 4 bits and back, archtune.moe.quant4).
"""
from __future__ import annotations

from archtune.models.quant import compute_dtype, dequantize, load_quantized
from archtune.plan import Plan


def merge_adapter(plan: Plan, tokenizer, adapter_dir: str):
    """A QLoRA run's adapter merged into its dequantized 4-bit base: a plain transformers model.

    For `archtune merge-lora` on a run with `adapter: qlora` / `load_in_4bit: true`.
    """
    from archtune.adapters.lora import load_adapter

    base = load_quantized(plan, tokenizer)
    dequantize(base)
    if plan.quantize_moe_experts:
        # the experts as training saw them: through 4 bits and back
        from archtune.moe import quant4

        quant4.quantize_experts(base, plan.expert_param_names, dtype=compute_dtype(plan))
        quant4.dequantize_experts(base)
    model = load_adapter(base, adapter_dir)
    return model.merge_and_unload()


__all__ = ["merge_adapter"]
