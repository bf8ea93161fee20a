"""Will a serving engine read the adapter's 3D expert LoRA as PEFT does? Checked from the files.

PEFT's `target_parameters` layout for a fused expert tensor [E, out, in]: one nested wrapper per
targeted tensor (`experts.base_layer.lora_*` the inner, `experts.lora_*` the outer), lora_A
[E*r, in] expert-major, lora_B [out, r*E] expert-minor. vLLM's loader for models that declare
`is_3d_moe_weight` (vllm/lora/model_manager.py, `_stack_moe_lora_weights`) reads such a file by
position, not by name: the inner wrapper as gate_up_proj, the outer as down_proj, lora_A reshaped
to (E, r, in), lora_B to (out, r, E) then (E, out, r), each expert's delta B_e @ A_e times
alpha / r. Here every expert delta is rebuilt that way from the written files and compared with
the delta stock PEFT applies; vLLM itself is not run (it needs a GPU and is not installed here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

# vLLM's reading order of the nested wrappers: inner (base_layer), then outer.
_VLLM_ROLES = {"gate_up_proj": ".base_layer", "down_proj": ""}


@dataclass
class ExpertLayout:
    reader: str
    expert_tensors: int = 0
    matching: int = 0
    max_abs_diff: float = 0.0
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.matching == self.expert_tensors

    def to_json(self) -> dict:
        return {"reader": self.reader, "expert_tensors": self.expert_tensors, "matching": self.matching,
                "max_abs_diff": self.max_abs_diff, "mismatched": list(self.mismatched), "ok": self.ok}

    def sentence(self) -> str:
        return (f"{self.matching} of {self.expert_tensors} expert deltas read as {self.reader} reads them equal "
                f"PEFT's (max |difference| {self.max_abs_diff:.2e})")


def _scaling(config: dict) -> float:
    r, alpha = int(config["r"]), float(config.get("lora_alpha") or config["r"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def vllm_3d_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int, scaling: float) -> torch.Tensor:
    """[E, out, in]: one fused expert tensor's delta as vLLM's 3D MoE LoRA loader computes it."""
    a = lora_a.float().reshape(num_experts, -1, lora_a.shape[-1])
    b = lora_b.float().reshape(lora_b.shape[0], -1, num_experts).permute(2, 0, 1)
    return torch.bmm(b, a) * scaling


def vllm_3d_layout(adapter_file: Path, config: dict, adapted) -> ExpertLayout | None:
    """The expert tensors of `adapted` (merge_check's AdaptedTensor, from stock PEFT) against the
    deltas vLLM's 3D loader reads from `adapter_file`; None when the adapter has no expert tensors."""
    from safetensors import safe_open

    experts = [t for t in adapted if t.expert and t.delta is not None]
    if not experts:
        return None
    layout = ExpertLayout("vLLM's 3D MoE LoRA loader (is_3d_moe_weight models)")
    scaling = _scaling(config)
    roles: dict[str, set[str]] = {}
    for t in experts:
        prefix, _, role = t.name.rpartition(".")
        roles.setdefault(prefix, set()).add(role)
    with safe_open(str(adapter_file), framework="pt") as f:
        keys = set(f.keys())
        for t in experts:
            layout.expert_tensors += 1
            prefix, _, role = t.name.rpartition(".")
            stem = f"base_model.model.{prefix}{_VLLM_ROLES.get(role, '?')}"
            names = (f"{stem}.lora_A.weight", f"{stem}.lora_B.weight")
            # vLLM asserts both roles on each experts module: one alone fails to load.
            if roles[prefix] != set(_VLLM_ROLES) or not all(n in keys for n in names):
                layout.mismatched.append(t.name)
                continue
            try:
                got = vllm_3d_delta(f.get_tensor(names[0]), f.get_tensor(names[1]), t.delta.shape[0], scaling)
            except RuntimeError:  # the shapes do not reshape as vLLM reshapes them
                layout.mismatched.append(t.name)
                continue
            if got.shape != t.delta.shape:
                layout.mismatched.append(t.name)
                continue
            diff = float((got - t.delta).abs().max())
            layout.max_abs_diff = max(layout.max_abs_diff, diff)
            if diff <= 1e-5 * float(t.delta.abs().max()) + 1e-8:
                layout.matching += 1
            else:
                layout.mismatched.append(t.name)
    return layout


__all__ = ["ExpertLayout", "vllm_3d_delta", "vllm_3d_layout"]
