"""Expert LoRA fused into the scattermoe experts implementation.

How PEFT puts LoRA on a 3D expert tensor (peft 0.21, `peft/tuners/lora/layer.py`)
--------------------------------------------------------------------------------
`LoraConfig(target_parameters=["experts.gate_up_proj", "experts.down_proj"])` wraps the
experts module in one `ParamWrapper` per targeted parameter, nested:
`ParamWrapper(down_proj) -> ParamWrapper(gate_up_proj) -> Gemma4TextExperts`. The wrapper
does not change the experts' forward. On each call it registers a *parametrization* on the
experts module for its parameter (`torch.nn.utils.parametrize`), calls the experts, and
removes the parametrization again. While the experts' forward runs, `self.gate_up_proj`
therefore evaluates to the adapted weight, which PEFT materialises as:

* `_LoraFactorsProxy(lhs, rhs, scaling)`: one active adapter (and no float8 weight):
  `W + scaling * lhs @ rhs` with one `baddbmm` over every expert. For the usual layout
  W `[E, out, in]` (`is_transposed=False`) `lhs = B` `[E, out, r]` and `rhs = A` `[E, r, in]`;
  for `is_transposed=True` (W `[E, in, out]`) `lhs = A^T` `[E, in, r]`, `rhs = B^T` `[E, r, out]`.
  Both are views of `lora_B.weight` / `lora_A.weight` (autograd reaches the adapter).
* `_LoraParameterProxy(delta)`: several adapters or a float8 weight: `W + delta`, dense.

The fused path (this module, the ONE place the detection lives)
---------------------------------------------------------------
Inside the experts' forward, `expert_weight(self, "gate_up_proj")` looks at
`self.parametrizations["gate_up_proj"]` *without* evaluating the parametrized attribute
(evaluating it is what materialises W + BA for every expert). When the parametrization is
exactly one `_LoraFactorsProxy`, it returns the raw weight (`parametrizations[name].original`)
and the two factors; scattermoe then computes, per expert segment,
`x @ W_e^T + scaling * (x @ A_e^T) @ B_e^T` (see `scattermoe._Proj`): no `[E, out, in]`
temporary, no gradient for a frozen W, gradients for A and B (and for W when it trains).
Any other state falls back to the attribute itself, which is always correct:

* no parametrization (no adapter, adapter disabled, or merged): the plain weight;
* `_LoraParameterProxy` or an unknown parametrization: the materialised weight, as eager.

One PEFT cost remains outside the experts' forward: `register_parametrization` (default
`unsafe=False`) evaluates the new parametrization once to check its shape and dtype, i.e. one
`baddbmm` W + BA over all experts per forward, thrown away (5-8% of a CPU step at bench
sizes). `skip_parametrization_check(model)` gives each expert `ParamWrapper` an instance-level
`_activate_lora` that registers the same `_LoraFactorsProxy` with `unsafe=True` (the check is
the only difference); every other state defers to PEFT's own method. It is an optimisation:
without it the fused path is used all the same.

Merging: PEFT's `merge_and_unload` already adds `get_delta_weight` (an einsum over the
experts, in the same layout) into the 3D tensors; tests/unit/test_scattermoe.py checks the
merged model against base + adapter, so archtune has no merge code of its own.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from archtune.patches import Patch, register_patch

try:  # a private class of PEFT: imported defensively so that a PEFT change degrades to "not fused"
    from peft.tuners.lora.layer import _LoraFactorsProxy
except Exception:  # pragma: no cover - PEFT absent or reorganised
    _LoraFactorsProxy = None


@dataclass(frozen=True)
class ExpertWeight:
    """A 3D expert weight as the experts' forward should use it.

    `weight` is the tensor to multiply with (the raw parameter when `lora` is set, else whatever
    the attribute evaluates to). `lora` is `(lhs, rhs, scaling)` in PEFT's convention:
    effective weight = `weight + scaling * lhs @ rhs` (batched over experts).
    """

    weight: torch.Tensor
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None

    @property
    def fused(self) -> bool:
        return self.lora is not None

    def in_out_factors(self, transposed: bool, dtype: torch.dtype):
        """(A, B, scaling) in `dtype`, A mapping in -> r and B mapping r -> out, each in the weight's
        layout ([E, r, in] / [E, out, r]; transposed: [E, in, r] / [E, r, out]); None without LoRA."""
        if self.lora is None:
            return None
        lhs, rhs, scaling = self.lora
        a, b = (lhs, rhs) if transposed else (rhs, lhs)
        return a.to(dtype), b.to(dtype), float(scaling)


def lora_factors(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """`(lhs, rhs, scaling)` when `module.<name>` carries exactly one PEFT LoRA factors proxy."""
    if _LoraFactorsProxy is None or not parametrize.is_parametrized(module, name):
        return None
    plist = module.parametrizations[name]
    if len(plist) != 1 or not isinstance(plist[0], _LoraFactorsProxy):
        return None
    proxy = plist[0]
    return proxy.lhs, proxy.rhs, float(proxy.scaling)


def expert_weight(module: nn.Module, name: str) -> ExpertWeight:
    """The expert tensor `name` of `module`, with PEFT's LoRA kept as factors when possible."""
    factors = lora_factors(module, name)
    if factors is not None:
        return ExpertWeight(module.parametrizations[name].original, factors)
    return ExpertWeight(getattr(module, name))


def has_expert_lora(model: nn.Module) -> bool:
    """True when PEFT's `target_parameters` LoRA wraps an experts module of `model`."""
    wrapper_cls = _param_wrapper_class()
    return wrapper_cls is not None and any(isinstance(m, wrapper_cls) for m in model.modules())


def _param_wrapper_class():
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except Exception:  # pragma: no cover
        return None
    return ParamWrapper


@contextmanager
def _activate_lora_unchecked(self, active_adapters):
    """PEFT's `ParamWrapper._activate_lora` for one adapter on a 3D tensor, registered unsafe=True."""
    adapters = [a for a in (active_adapters or []) if a in self.lora_A]
    param = self.get_param()
    if len(adapters) != 1 or getattr(self, "num_experts", 1) <= 1 or not (
        param.dtype.is_floating_point and param.dtype.itemsize >= 2
    ):
        with type(self)._activate_lora(self, active_adapters):
            yield
        return
    proxy = _LoraFactorsProxy(*self.get_delta_factors(adapters[0]))
    base = self.get_base_layer()
    requires_grad = param.requires_grad
    parametrize.register_parametrization(base, self.parameter_name, proxy, unsafe=True)
    base.parametrizations[self.parameter_name].original.requires_grad_(requires_grad)
    try:
        with parametrize.cached():
            yield
    finally:
        self._remove_parametrizations()


def skip_parametrization_check(model: nn.Module) -> int:
    """Install `_activate_lora_unchecked` on every expert ParamWrapper of `model`; returns how many.

    A no-op (returns 0) when PEFT lacks the pieces it relies on.
    """
    wrapper_cls = _param_wrapper_class()
    needed = ("get_delta_factors", "_remove_parametrizations", "get_param", "_activate_lora")
    if wrapper_cls is None or _LoraFactorsProxy is None or not all(hasattr(wrapper_cls, n) for n in needed):
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, wrapper_cls) and getattr(module, "num_experts", 1) > 1:
            module._activate_lora = types.MethodType(_activate_lora_unchecked, module)
            count += 1
    return count


EXPERT_LORA = register_patch(Patch(
    name="expert_lora_factors",
    doc="Expert LoRA runs fused: the experts' forward reads PEFT's LoRA parametrization of a 3D expert tensor as "
        "its two factors instead of materialising W + BA, and PEFT's per-forward parametrization check is skipped.",
    apply=skip_parametrization_check,
    upstream="peft 0.21.2",
    relies_on={
        "peft.tuners.lora.layer._LoraFactorsProxy": "58ece2b3db4d",
        "peft.tuners.lora.layer.ParamWrapper._activate_lora": "94d1ea9101d9",
        "peft.tuners.lora.layer.ParamWrapper.get_delta_factors": "821452c621a3",
        "peft.tuners.lora.layer.ParamWrapper._remove_parametrizations": "032633b6fc38",
    },
))

__all__ = ["ExpertWeight", "expert_weight", "lora_factors", "has_expert_lora", "skip_parametrization_check"]
