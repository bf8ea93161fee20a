"""Was every adapted tensor merged? Each one checked against what the trained adapter computes.

For each tensor the adapter changes (a LoRA'd linear's weight, a 3D expert tensor under
`lora_target_parameters`, a module trained whole through `lora_modules_to_save`), the expected
merged value is taken from the trained model itself: its base tensor plus PEFT's own delta
(`get_delta_weight`: B @ A times the scale, per expert for 3D tensors), or the trained copy. The
artifact's tensor of the same name must equal it element by element within the rounding of the
artifact's dtype. A dropped expert delta, a delta applied to 3 of 60 experts, or a base model
saved as "merged" fails this, whatever the logits of a tiny model happen to show.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdaptedTensor:
    name: str  # the tensor's name in the merged model (the module path + parameter)
    expected: torch.Tensor  # float32: base + delta, or the trained copy
    expert: bool  # a 3D expert tensor (lora_target_parameters)
    delta: torch.Tensor | None = None  # float32, expert tensors only: PEFT's delta (the serving-layout check)


@dataclass
class MergeCount:
    adapted: int = 0
    merged: int = 0
    expert: int = 0
    missing: list[str] = field(default_factory=list)  # adapted tensors the artifact lacks or left unmerged

    def to_json(self) -> dict:
        return {"merged": self.merged, "adapted": self.adapted, "expert": self.expert,
                "not_merged": list(self.missing)}

    def sentence(self) -> str:
        return (f"merged {self.merged} of {self.adapted} adapted tensors, {self.expert} of them expert tensors")

    @property
    def ok(self) -> bool:
        return self.merged == self.adapted


def _module_path(peft_name: str) -> str:
    name = peft_name.removeprefix(_PEFT_PREFIX)
    return ".".join(part for part in name.split(".") if part != "base_layer")


def _base_value(module, parameter: str) -> torch.Tensor:
    """A base tensor as the values it computes with (a 4-bit weight dequantized)."""
    tensor = getattr(module, parameter)
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(tensor.data, state).float()
    return tensor.detach().float()


def adapted_tensors(model) -> Iterator[AdaptedTensor]:
    """Every tensor the (unmerged) trained PEFT model's adapter changes, with its expected merged value."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter not in module.lora_A:
                    continue
                parameter = getattr(module, "parameter_name", None)
                base = module.get_base_layer()
                with torch.no_grad():
                    delta = module.get_delta_weight(adapter).float()
                value = _base_value(base, parameter or "weight")
                delta = delta.reshape(value.shape)
                yield AdaptedTensor(f"{_module_path(name)}.{parameter or 'weight'}", value + delta,
                                    expert=parameter is not None, delta=delta if parameter is not None else None)
        elif isinstance(module, ModulesToSaveWrapper):
            for adapter in module.active_adapters:
                trained = module.modules_to_save[adapter]
                for pname, p in trained.named_parameters():
                    yield AdaptedTensor(f"{_module_path(name)}.{pname}", p.detach().float(), expert=False)


def rounding(dtype: torch.dtype) -> float:
    """Relative rounding error of storing a float32 value in `dtype` (half an ulp, doubled for the merge's own sums)."""
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


def count_merged(expected: Iterable[AdaptedTensor], lookup: Callable[[str], torch.Tensor | None],
                 relative: float | None = None) -> MergeCount:
    """How many `expected` tensors `lookup(name)` (the artifact's tensor, or None) holds merged.

    `relative` is the rounding allowed relative to each element (default: the artifact
    tensor's dtype); every element must be within it (plus 1e-6 of the tensor's largest value,
    for the merge's float32 sums)."""
    count = MergeCount()
    for t in expected:
        count.adapted += 1
        count.expert += t.expert
        got = lookup(t.name)
        if got is None or tuple(got.shape) != tuple(t.expected.shape):
            count.missing.append(t.name)
            continue
        rel = rounding(got.dtype) if relative is None else relative
        err = (got.float() - t.expected).abs()
        allowed = rel * t.expected.abs() + 1e-6 * float(t.expected.abs().max()) + 1e-8
        if bool((err <= allowed).all()):
            count.merged += 1
        else:
            count.missing.append(t.name)
    return count


__all__ = ["AdaptedTensor", "MergeCount", "adapted_tensors", "count_merged", "rounding"]
