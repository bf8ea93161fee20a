"""Decisions for mixture-of-experts models and quantization: the experts implementation
(transformers' registered ones, or scattermoe chosen by the experts' shape), 4-bit experts with a
4-bit base, and the refusal of 8-bit training."""
from __future__ import annotations

from typing import TYPE_CHECKING

from archtune.plan.shared import Rule
from archtune.plan.experts import (EXPERTS, SCATTERMOE, SCATTERMOE_TRITON, choose_experts_implementation,
                                   triton_unavailable)
from archtune.plan.shared import refused
from archtune.plan.training_rules import cuda_available

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import Plan

def _experts_implementation(plan: "Plan") -> None:
    cfg, fam = plan.config, plan.family
    key = "experts_implementation"
    given = cfg.experts_implementation
    if cfg.use_scattermoe:
        if not plan.get("use_kernels"):
            plan.set("use_kernels", True, "auto", "use_scattermoe runs through the kernels plugin")
        if given is None:
            name, reason = _scattermoe_or_stock(plan)
            plan.set(key, name, "auto", reason)
        elif given not in (SCATTERMOE, SCATTERMOE_TRITON):
            plan.error(key, f"use_scattermoe: true asks for ScatterMoE but experts_implementation is {given!r}",
                       "set `experts_implementation: scattermoe`, or `use_scattermoe: false`")
            return
    elif given is not None:
        if given not in EXPERTS:
            plan.error(key, f"{given!r} is not an experts implementation",
                       f"use one of: {', '.join(EXPERTS.names())}")
            return
    if given == SCATTERMOE_TRITON:
        missing = triton_unavailable(cuda_available())
        if missing is not None:
            plan.error(key, *missing)
            return
    if plan.get(key) is not None and fam.is_moe is not None and not fam.moe(plan.model_config):
        plan.warn(f"experts_implementation: {plan.get(key)} has no effect: this {plan.model_type} model has no experts")


def _scattermoe_or_stock(plan: "Plan") -> tuple[str, str]:
    """use_scattermoe without an explicit experts_implementation: scattermoe where it measured
    faster for this model's experts, transformers' stock implementation elsewhere (plan/experts.py)."""
    cfg = plan.config
    shape = plan.family.moe_shape(plan.model_config)
    if cfg.quantize_moe_experts:
        return "scattermoe", "use_scattermoe with quantize_moe_experts: only scattermoe dequantizes one expert at a time"
    if shape is None:
        return "scattermoe", "use_kernels + use_scattermoe select the ScatterMoE experts kernel"
    expert_lora = plan.get("adapter") in ("lora", "qlora") and bool(plan.get("lora_target_parameters"))
    dtype = "bfloat16" if plan.get("bf16") is True else "float16" if plan.get("fp16") is True else "float32"
    choice = choose_experts_implementation(**shape, tokens=cfg.micro_batch_size * cfg.sequence_len,
                                           expert_lora=expert_lora, dtype=dtype, device="cuda" if cuda_available() else "cpu")
    return choice.name, f"use_scattermoe: {choice.reason} (set experts_implementation: scattermoe to force it)"


def _quantize_moe_experts(plan: "Plan") -> None:
    cfg, fam = plan.config, plan.family
    key = "quantize_moe_experts"
    four_bit = bool(plan.get("load_in_4bit")) or plan.get("adapter") == "qlora"
    moe = bool(fam.expert_param_names) and fam.moe(plan.model_config)
    if cfg.quantize_moe_experts is None:
        if four_bit and moe:
            plan.set(key, True, "auto",
                     f"4-bit base on a mixture-of-experts model: bitsandbytes quantizes nn.Linear layers only, and the "
                     f"3D expert tensors ({', '.join(fam.expert_param_names)}) hold most of the weights; left in 16 "
                     "bits, a \"4-bit\" Gemma 4 26B-A4B still takes ~46 GB")
        else:
            plan.set(key, False, "default", "no 4-bit base" if not four_bit else "the model has no expert tensors")
        return
    if not cfg.quantize_moe_experts:
        return
    if cfg.adapter is None:
        plan.error(key, "quantize_moe_experts requires an adapter: 4-bit expert tensors are frozen",
                   "set `adapter: qlora` (with `load_in_4bit: true`), or remove quantize_moe_experts")
        return
    if not four_bit:
        plan.error(key, "quantize_moe_experts requires a 4-bit base (the experts are stored like its linear layers)",
                   "set `load_in_4bit: true` and `adapter: qlora`, or remove quantize_moe_experts")
        return
    if not moe:
        structure = plan.structure()
        stacked = structure is not None and any(len(shape) == 3 for shape in structure.parameters.values())
        why = (f"archtune knows no expert tensors of this {plan.model_type} model (no family declares them), so its "
               "3D tensors stay in 16 bits" if stacked else f"this {plan.model_type} model has no expert tensors")
        plan.warn(f"quantize_moe_experts: true has no effect: {why}")
        plan.set(key, False, "auto", why)


def _experts_for_4bit_experts(plan: "Plan") -> None:
    key = "experts_implementation"
    if not plan.get("quantize_moe_experts"):
        return
    why = ("4-bit experts are dequantized one expert at a time only by scattermoe; the other implementations read "
           "the whole expert tensor, dequantized at every forward")
    if plan.get(key) is None:
        plan.set(key, "scattermoe", "auto", why)
    elif plan.get(key) not in (SCATTERMOE, SCATTERMOE_TRITON):  # scattermoe_triton dequantizes per tile
        plan.warn(f"experts_implementation: {plan.get(key)} with quantize_moe_experts works but saves little memory "
                  f"while training: {why}")


MOE_RULES: tuple[Rule, ...] = (
    Rule("experts_implementation",
         "`experts_implementation` must be eager, one of transformers' registered implementations, scattermoe, or "
         "scattermoe_triton (Triton kernels: needs triton and a CUDA GPU, or TRITON_INTERPRET=1 on CPU; chosen only "
         "by name, not yet measured on a GPU); "
         "`use_scattermoe: true` turns on `use_kernels` and runs scattermoe where it measured faster for the "
         "model's experts, the run's dtype and the device (on CPU: with expert LoRA, in bf16, or with enough "
         "token-expert pairs per expert), else the fastest stock implementation (grouped_mm; batched_mm for "
         "small batches on CUDA); `experts_implementation: scattermoe` forces it.",
         _experts_implementation),
    Rule("quantize_moe_experts",
         "With a 4-bit base (`load_in_4bit`, `adapter: qlora`) on a mixture-of-experts model, `quantize_moe_experts` "
         "defaults to true: the 3D expert tensors, most of the weights, are stored in 4 bits too (NF4, double "
         "quantization), which bitsandbytes alone does not do; it requires an adapter and a 4-bit base.",
         _quantize_moe_experts),
    Rule("experts_implementation_for_4bit_experts",
         "With `quantize_moe_experts`, `experts_implementation` defaults to scattermoe, which dequantizes one expert "
         "at a time (scattermoe_triton: one tile at a time); another implementation gets a warning.",
         _experts_for_4bit_experts),
)


def _refuse_8bit(plan: "Plan") -> None:
    if plan.get("load_in_8bit") and not refused(plan, "load_in_8bit"):
        plan.error("load_in_8bit", "8-bit training is not supported in this release",
                   "remove `load_in_8bit` (QLoRA: `adapter: qlora` with `load_in_4bit: true`)")


REFUSE_LOAD_IN_8BIT = Rule(
    "refuse_load_in_8bit",
    "`load_in_8bit: true` is refused: 8-bit training is not supported in this release (4-bit QLoRA is).",
    _refuse_8bit)


__all__ = ["MOE_RULES", "REFUSE_LOAD_IN_8BIT"]
