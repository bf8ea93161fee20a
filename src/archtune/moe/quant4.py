"""4-bit expert tensors (`quantize_moe_experts`): NF4 storage, dequantized one expert at a time.

Why: bitsandbytes' `load_in_4bit` quantizes `nn.Linear` layers only. A MoE's experts are 3D
parameters (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) that hold most of
its weights, so a "4-bit" Gemma 4 26B-A4B keeps them in 16 bits. This module stores them in 4
bits and gives the scattermoe experts implementation one expert's weight at a time.

Storage, per expert tensor `W` [E, out, in] (n = out * in elements per expert)
-------------------------------------------------------------------------------
Each expert is quantized on its own with bitsandbytes' `quantize_4bit` (NF4, blocks of 64,
double quantization): 64 consecutive elements share one absmax; the absmaxes are stored as
8-bit codes of `absmax - offset` with one fp32 scale per 256 of them. The per-expert results
are stacked on a leading expert dimension, so every stored tensor is [E, ...] (FSDP2 shards
them all along the experts, consistently):

    module.parametrizations.<name>.original   uint8 [E, ceil(n/2)]  two NF4 codes per byte
    module.parametrizations.<name>[0]         `NF4Experts`: absmax_q uint8 [E, ceil(n/64)],
                                               absmax2 fp32 [E, ceil(n/64/256)], offset fp32 [E],
                                               and the two code tables (NF4, 8-bit dynamic)

That is about 4.13 bits per weight (0.258x of bf16). It is a torch parametrization, so
`module.<name>` still evaluates to the whole dequantized tensor for any code that reads it
(transformers' eager / grouped_mm experts, inspection): correct everywhere, small only where
scattermoe reads it. `expert_weight_4bit` gives scattermoe an `ExpertSlices` instead, whose
`per_expert` sequence dequantizes expert e when indexed, in the run's compute dtype (the
dequantization is torch code equal to bitsandbytes' `dequantize_4bit`, tested).

Expert LoRA (PEFT `target_parameters`)
-------------------------------------
PEFT's `ParamWrapper` reads the parameter (`get_param()`) for its dtype on every forward and
registers its LoRA proxy as a parametrization. On a 4-bit tensor that would dequantize the
whole tensor twice per forward, and PEFT's clean-up only knows its own proxy. `adapt_peft`
gives each such wrapper (instance-level, peft 0.21.2): `get_param` -> a zero-byte stand-in of
the right shape, dtype and device; `_activate_lora` -> registers PEFT's `_LoraFactorsProxy`
after `NF4Experts` (unsafe=True: no evaluation) and removes exactly it afterwards; `merge` ->
an error, because adding a delta to a dequantized temporary would be lost silently
(`dequantize_experts` first; it also undoes these overrides).
"""
from __future__ import annotations

import math
import types
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from archtune.models.quant import BLOCKSIZE, NESTED_BLOCKSIZE

try:  # a private class of PEFT (peft 0.21): without it, LoRA on 4-bit experts takes PEFT's dense path
    from peft.tuners.lora.layer import _LoraFactorsProxy
except Exception:  # pragma: no cover - PEFT absent or reorganised
    _LoraFactorsProxy = None



def expert_4bit_bytes(shape: tuple[int, ...], blocksize: int = BLOCKSIZE,
                      nested_blocksize: int = NESTED_BLOCKSIZE) -> int:
    """Bytes one [E, out, in] expert tensor takes with `quantize_moe_experts` (all its stored parts:
    each expert quantized on its own, NF4 with double quantization). The memory estimate counts
    4-bit experts with it before any weight is loaded.

    >>> expert_4bit_bytes((64, 256, 512))   # 8.4M weights: 16 MiB in bf16
    4330816
    """
    experts, n = int(shape[0]), math.prod(int(s) for s in shape[1:])
    blocks = math.ceil(n / blocksize)
    nested = math.ceil(blocks / nested_blocksize)
    per_expert = math.ceil(n / 2) + blocks + 4 * nested + 4  # codes, absmax codes, scales, offset
    return experts * per_expert + 4 * (16 + 256 + 512)  # + the NF4 and 8-bit code tables, the byte decoder

def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a parameter or buffer holds in this process (a DTensor: its local shard)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def model_bytes(model: nn.Module, adapters: bool = True) -> int:
    """Bytes of `model`'s parameters and buffers (shared tensors once); `adapters=False` leaves PEFT's
    LoRA tensors (`lora_*`) out: the loaded model alone, `model_bytes` in train_summary.json."""
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:  # named_*: duplicates once
        if adapters or ".lora_" not in f".{name}":
            total += tensor_bytes(t)
    return total


# ---- the parametrization: storage and dequantization -----------------------------------------


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class NF4Experts(nn.Module):
    """Quantization state of one 4-bit expert tensor; as a parametrization it dequantizes all of it.

    `expert(packed, e)` dequantizes expert e only: what scattermoe uses. The state tensors are
    frozen parameters (not buffers) so that DDP broadcasts them once and FSDP2 shards them.
    """

    def __init__(self, absmax_q, absmax2, offset, code, code2, shape: tuple[int, ...], dtype: torch.dtype):
        super().__init__()
        self.absmax_q = _frozen(absmax_q)  # uint8 [E, blocks]
        self.absmax2 = _frozen(absmax2)  # fp32 [E, nested blocks]
        self.offset = _frozen(offset)  # fp32 [E]
        self.register_buffer("code", code)  # fp32 [16]: the NF4 values
        self.register_buffer("code2", code2)  # fp32 [256]: bitsandbytes' 8-bit dynamic map
        # byte -> its two NF4 values (high nibble first): one gather per byte decodes both
        byte = torch.arange(256, device=code.device)
        self.register_buffer("pairs", torch.stack((code[byte >> 4], code[byte & 15]), dim=-1), persistent=False)
        self.shape = torch.Size(shape)  # the logical [E, out, in]
        self.dtype = dtype  # what dequantization returns (the run's compute dtype)

    def expert(self, packed: torch.Tensor, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert e as a dense [out, in] tensor (bitsandbytes' dequantize_4bit, in torch)."""
        out_in = self.shape[1:]
        n = math.prod(out_in)
        # int32 indices and in-place products: 3-4x faster than long indices and temporaries on CPU
        values = self.pairs.index_select(0, packed[e].int()).view(-1)  # fp32 [2 * ceil(n/2)]
        q = self.absmax_q[e]
        blocks = q.shape[0]
        scale = self.absmax2[e].repeat_interleave(NESTED_BLOCKSIZE)[:blocks]
        absmax = self.code2.index_select(0, q.int()).mul_(scale).add_(self.offset[e])
        pad = blocks * BLOCKSIZE - values.shape[0]
        if pad:
            values = nn.functional.pad(values, (0, pad))
        w = values.view(blocks, BLOCKSIZE).mul_(absmax[:, None]).view(-1)[:n].view(out_in)
        return w.to(dtype or self.dtype)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.expert(packed, e) for e in range(self.shape[0])])


def quantize_tensor(weight: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, NF4Experts]:
    """(packed codes [E, ceil(n/2)], state) of a 3D expert tensor: bitsandbytes NF4 per expert."""
    if weight.dim() != 3:
        raise ValueError(f"expected a 3D expert tensor [E, out, in], got shape {tuple(weight.shape)}")
    data = weight.detach()
    return quantize_experts_of((data[e] for e in range(data.shape[0])), tuple(weight.shape), dtype or weight.dtype)


def quantize_experts_of(experts: Iterable[torch.Tensor], shape: tuple[int, ...],
                        dtype: torch.dtype) -> tuple[torch.Tensor, NF4Experts]:
    """`quantize_tensor` of the [E, out, in] tensor whose experts `experts` yields one at a time
    ([out, in] each, e.g. read from a checkpoint): no dense copy of the whole tensor exists."""
    import bitsandbytes.functional as bnbf

    # Each expert's results are written into [E, ...] tensors allocated once (no list of pieces stacked
    # afterwards: that would hold the 4-bit tensor twice).
    stored: list[torch.Tensor] = []
    code = code2 = None
    count = 0
    for e, expert in enumerate(experts):
        q, state = bnbf.quantize_4bit(expert.contiguous(), blocksize=BLOCKSIZE, compress_statistics=True,
                                      quant_type="nf4")
        parts = (q.view(-1), state.absmax.view(-1), state.state2.absmax.view(-1).float(),
                 torch.as_tensor(state.offset, dtype=torch.float32, device=q.device).view(()))
        if not stored:
            stored = [torch.empty((shape[0], *t.shape), dtype=t.dtype, device=t.device) for t in parts]
        for out, t in zip(stored, parts):
            out[e].copy_(t)
        code, code2 = state.code.float(), state.state2.code.float()
        count = e + 1
    if count != shape[0]:
        raise ValueError(f"{count} experts given for a tensor of shape {tuple(shape)}")
    packed, absmax_q, absmax2, offset = stored
    state = NF4Experts(absmax_q, absmax2, offset, code.clone(), code2.clone(), tuple(shape), dtype)
    return packed, state


def expert_through_4bit(expert: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One expert [out, in] as `quantize_experts` stores it and training dequantizes it (in `dtype`),
    on the expert's device: each expert is quantized on its own, so this equals expert e of the
    whole tensor's round trip."""
    packed, state = quantize_experts_of((expert,), (1, *expert.shape), dtype)
    return state.expert(packed, 0)


def quantize_parameter_(module: nn.Module, name: str, dtype: torch.dtype | None = None,
                        experts: Iterable[torch.Tensor] | None = None) -> None:
    """Replace `module.<name>` (a 3D expert parameter) by its 4-bit storage, in place. `experts`:
    its experts one at a time (from the checkpoint) when the parameter is only a stand-in of its shape."""
    weight = getattr(module, name)
    if experts is None:
        packed, state = quantize_tensor(weight, dtype)
    else:
        packed, state = quantize_experts_of(experts, tuple(weight.shape), dtype or weight.dtype)
    delattr(module, name)
    module.register_parameter(name, _frozen(packed))
    # unsafe: the parametrization changes shape and dtype (uint8 codes -> dense weight) on purpose.
    parametrize.register_parametrization(module, name, state, unsafe=True)


def nf4_state(module: nn.Module, name: str) -> NF4Experts | None:
    """The `NF4Experts` of `module.<name>` when that tensor is stored in 4 bits."""
    if not parametrize.is_parametrized(module, name):
        return None
    first = module.parametrizations[name][0]
    return first if isinstance(first, NF4Experts) else None


def expert_tensors(model: nn.Module, targets: tuple[str, ...]):
    """(module, leaf name, full name) of every 3D parameter whose name is or ends with a target
    (PEFT's `base_layer.` segments left out of the name: a LoRA'd expert tensor matches too)."""
    for module_name, module in model.named_modules():
        for leaf, param in list(module.named_parameters(recurse=False)):
            full = ".".join(p for p in f"{module_name}.{leaf}".split(".") if p and p != "base_layer")
            if param.dim() == 3 and any(full == t or full.endswith("." + t) for t in targets):
                yield module, leaf, full


def quantize_experts(model: nn.Module, targets: tuple[str, ...], dtype: torch.dtype | None = None,
                     checkpoint=None) -> list[str]:
    """Store every expert tensor of `model` named by `targets` (e.g. the family's
    `expert_param_names`: experts.gate_up_proj, experts.down_proj) in 4 bits. Returns their names.

    `checkpoint` (a models.checkpoint_experts.CheckpointExperts): the tensors it holds are
    stand-ins in the model, and their experts are read from it one at a time."""
    done = []
    for module, leaf, full in list(expert_tensors(model, tuple(targets))):
        source = checkpoint.lookup(full) if checkpoint is not None else None
        experts = None
        if source is not None:
            param = getattr(module, leaf)
            experts = checkpoint.experts(source, param.device, dtype or param.dtype)
        quantize_parameter_(module, leaf, dtype, experts)
        done.append(full)
    return done


def quantized_experts(model: nn.Module) -> list[str]:
    """Names (`module.<name>`) of the expert tensors of `model` stored in 4 bits."""
    out = []
    for module_name, module in model.named_modules():
        for name in getattr(module, "parametrizations", {}) or {}:
            if nf4_state(module, name) is not None:
                out.append(f"{module_name}.{name}" if module_name else name)
    return out


def dequantize_experts(model: nn.Module) -> int:
    """Replace every 4-bit expert tensor by a plain frozen parameter holding its dequantized value
    (what training saw), and give PEFT's wrappers their own methods back; returns how many.

    For merging: PEFT's `merge_and_unload` then adds the expert LoRA into real tensors.
    """
    count = 0
    for module in list(model.modules()):
        for name in list(getattr(module, "parametrizations", {}) or {}):
            state = nf4_state(module, name)
            if state is None:
                continue
            plist = module.parametrizations[name]
            if len(plist) != 1:
                raise RuntimeError(f"{type(module).__name__}.{name} has an active LoRA parametrization: "
                                   "dequantize outside the forward pass")
            with torch.no_grad():
                weight = state(plist.original)
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
            delattr(module, name)
            module.register_parameter(name, _frozen(weight))
            count += 1
    for module in model.modules():
        for attr in _PEFT_OVERRIDES:
            if getattr(module, "_archtune_4bit", False):
                module.__dict__.pop(attr, None)
        if getattr(module, "_archtune_4bit", False):
            del module._archtune_4bit
    return count


# ---- what scattermoe reads: one expert at a time ---------------------------------------------


@dataclass(frozen=True)
class ExpertSlices:
    """A 4-bit expert tensor as scattermoe's per-expert weight provider.

    `shape`, `dtype`, `device` describe the dense tensor; `to(dtype)` sets the dtype experts are
    dequantized to; `per_expert(right, transposed)` is the sequence scattermoe indexes by expert:
    R(W)_e (right=True: y = x @ R(W)_e) or R(W)_e^T, each dequantized when indexed.
    """

    packed: torch.Tensor
    state: NF4Experts
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.state.shape

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, dtype: torch.dtype) -> "ExpertSlices":
        return self if dtype == self.dtype else ExpertSlices(self.packed, self.state, dtype)

    def per_expert(self, right: bool, transposed: bool) -> "_PerExpert":
        # stored [E, out, in] (transposed=False): R(W)_e = W_e^T; [E, in, out]: R(W)_e = W_e
        return _PerExpert(self, flip=(right != transposed))

    def dense(self) -> torch.Tensor:
        """The whole tensor (for tests and merging, never in the training path)."""
        return torch.stack([self.state.expert(self.packed, e, self.dtype) for e in range(self.shape[0])])


class _PerExpert:
    def __init__(self, slices: ExpertSlices, flip: bool):
        self.slices, self.flip = slices, flip

    def __len__(self) -> int:
        return self.slices.shape[0]

    def __getitem__(self, e: int) -> torch.Tensor:
        w = self.slices.state.expert(self.slices.packed, e, self.slices.dtype)
        return w.t() if self.flip else w


def expert_weight_4bit(module: nn.Module, name: str):
    """scattermoe's view of `module.<name>` when it is stored in 4 bits (else None): an
    `ExpertWeight` whose weight is an `ExpertSlices`, with PEFT's LoRA factors when its proxy is
    the only other parametrization; with anything else stacked on it, the evaluated tensor."""
    from archtune.patches.expert_lora import ExpertWeight

    state = nf4_state(module, name)
    if state is None:
        return None
    plist = module.parametrizations[name]
    slices = ExpertSlices(plist.original, state, state.dtype)
    if len(plist) == 1:
        return ExpertWeight(slices)
    if len(plist) == 2 and _LoraFactorsProxy is not None and isinstance(plist[1], _LoraFactorsProxy):
        proxy = plist[1]
        return ExpertWeight(slices, (proxy.lhs, proxy.rhs, float(proxy.scaling)))
    return ExpertWeight(getattr(module, name))


# ---- PEFT's ParamWrapper on a 4-bit tensor (peft 0.21.2) -------------------------------------

_PEFT_OVERRIDES = ("get_param", "_activate_lora", "merge")


def _get_param_stand_in(self):
    """Shape, dtype and device of the dense tensor without dequantizing it (zero bytes)."""
    base = self.get_base_layer()
    state = nf4_state(base, self.parameter_name)
    if state is None:  # dequantized since: PEFT's own behaviour
        return type(self).get_param(self)
    packed = base.parametrizations[self.parameter_name].original
    return torch.empty((), dtype=state.dtype, device=packed.device).expand(state.shape)


@contextmanager
def _activate_lora_4bit(self, active_adapters):
    """PEFT's `_activate_lora` for a 4-bit tensor: the LoRA proxy goes after `NF4Experts`."""
    base = self.get_base_layer()
    adapters = [a for a in (active_adapters or []) if a in self.lora_A]
    if not adapters or nf4_state(base, self.parameter_name) is None:
        with type(self)._activate_lora(self, active_adapters):
            yield
        return
    if len(adapters) == 1 and self.num_experts > 1 and _LoraFactorsProxy is not None:
        proxy = _LoraFactorsProxy(*self.get_delta_factors(adapters[0]))
    else:
        from peft.tuners.lora.layer import _LoraParameterProxy

        proxy = _LoraParameterProxy(sum(self.get_delta_weight(a) for a in adapters))
    plist = base.parametrizations[self.parameter_name]
    parametrize.register_parametrization(base, self.parameter_name, proxy, unsafe=True)
    try:
        with parametrize.cached():
            yield
    finally:
        if len(plist) > 1 and plist[-1] is proxy:
            del plist[-1]


def _refuse_merge(self, *args, **kwargs):
    raise RuntimeError(f"cannot merge LoRA into the 4-bit {self.parameter_name}: call "
                       "archtune.moe.quant4.dequantize_experts(model) first")


def adapt_peft(model: nn.Module) -> int:
    """Install the 4-bit overrides on every PEFT ParamWrapper of `model` whose tensor is 4-bit."""
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except Exception:  # pragma: no cover - PEFT absent
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, ParamWrapper):
            continue
        if nf4_state(module.get_base_layer(), module.parameter_name) is None:
            continue
        module.get_param = types.MethodType(_get_param_stand_in, module)
        module._activate_lora = types.MethodType(_activate_lora_4bit, module)
        module.merge = types.MethodType(_refuse_merge, module)
        module._archtune_4bit = True
        count += 1
    return count


__all__ = [
    "BLOCKSIZE",
    "NESTED_BLOCKSIZE",
    "ExpertSlices",
    "NF4Experts",
    "adapt_peft",
    "dequantize_experts",
    "expert_4bit_bytes",
    "expert_tensors",
    "expert_through_4bit",
    "expert_weight_4bit",
    "model_bytes",
    "nf4_state",
    "quantize_experts",
    "quantize_experts_of",
    "quantize_parameter_",
    "quantize_tensor",
    "quantized_experts",
    "tensor_bytes",
]
