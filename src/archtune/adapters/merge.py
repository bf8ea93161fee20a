"""Merging a LoRA adapter shard by shard: read a base shard, add its deltas, write it, drop it.

`merge_lora_shards(stream, out_dir, dtype=...)` writes the merged model as safetensors shards
with the base's own layout (the same shard files and tensor names, an index when the base had
one) and holds one shard at a time, never the model. Each merged tensor is computed as PEFT's
`merge_and_unload` computes it on the model `archtune merge-lora` would otherwise build in memory:

- a LoRA'd linear weight (`lora.Linear`): the base tensor in `dtype`, the adapter's A and B in
  float32 (PEFT's adapter dtype for float bases), `delta = (B @ A) * scaling` and one in-place
  add (`W += delta`, rounded once to `dtype`);
- a LoRA'd 3D expert tensor (`lora.ParamWrapper`, `target_parameters`): lora_A [E*r, in] and
  lora_B [out, r*E] per expert, `delta_e = B[:, :, e] @ A[e] * scaling` (PEFT's einsum, one
  expert at a time), cast to `dtype` and added (`W += delta.to(dtype)`). Expert e is read alone
  from the checkpoint, in either layout (`models.checkpoint_experts`): the fused [E, out, in]
  tensor, or one module per expert whose parts are concatenated as transformers fuses them and
  split again on writing;
- `BaseValues` maps each base tensor to what the trained model computed with first: the tensor
  itself, or (a 4-bit base, train/assembly.py) the tensor through 4 bits and back.

`stream_plan(base_dir, adapter_dir, skeleton, parts)` finds what the adapter changes by putting
it on `skeleton` (the base model built on the meta device) with PEFT itself, so the key names,
the nesting of several expert LoRAs on one module and the [E, out, in] or [E, in, out] order are
PEFT's; it returns a `StreamPlan`, or a sentence saying why the adapter cannot stream (then
`archtune merge-lora` merges in memory): DoRA, `modules_to_save`, LoRA biases, rank or alpha
patterns, a target that is not a tensor of the checkpoint, a base that is not safetensors.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from archtune.models.checkpoint_experts import INDEX, CheckpointExperts, ExpertTensor, weight_map

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_REFUSED_KEYS = ("use_dora", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern", "lora_bias")


@dataclass(frozen=True)
class LoraTarget:
    a_key: str  # the adapter file's lora_A key
    b_key: str
    scaling: float  # PEFT's lora_alpha / r (or / sqrt(r) with rsLoRA)
    experts: int = 0  # 0: a linear weight; E: a 3D expert tensor of E experts
    out_in: bool = True  # expert tensors: stored [E, out, in] (PEFT swaps in/out) rather than [E, in, out]
    shape: tuple[int, ...] = ()  # expert tensors: the model's [E, ., .]


@dataclass(frozen=True)
class StreamPlan:
    base_dir: Path
    adapter_dir: Path
    targets: dict[str, LoraTarget]  # the model's tensor name -> its LoRA
    experts: CheckpointExperts | None  # where each 3D expert tensor is read from (None: none is touched)


@dataclass(frozen=True)
class MergeResult:
    merged: int  # adapted tensors that received their LoRA delta
    expert: int  # of them, 3D expert tensors
    tensors: int  # checkpoint tensors written in all
    shards: int  # shard files written


class BaseValues:
    """The values the trained model computed with, from the checkpoint's tensors (already in the
    merge's dtype): the tensors themselves. A 4-bit base overrides both (train/assembly.py)."""

    def rounded(self) -> set[str]:
        """Tensor names whose values differ from the checkpoint's (read them even without a LoRA)."""
        return set()

    def weight(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def expert(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Expert e of the 3D tensor `name`, [out, in] as the model stores it."""
        return tensor


def base_shards(base_dir: str | os.PathLike) -> dict[str, str] | None:
    """tensor name -> shard file of a safetensors checkpoint directory (None: not one)."""
    return weight_map(base_dir)


def lora_targets(adapter_dir: str | os.PathLike, skeleton) -> dict[str, LoraTarget] | str:
    """The model's tensor name -> its LoRA, for every layer PEFT puts on `skeleton` (the base
    model on the meta device) from the adapter's config; or why a layer does not stream."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer, ParamWrapper

    from archtune.patches.peft_targets import keep_module_targets

    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = True
    with keep_module_targets():
        inject_adapter_in_model(config, skeleton)
    targets: dict[str, LoraTarget] = {}
    for module_name, module in skeleton.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        key = f"{_PREFIX}{module_name}"
        path = ".".join(p for p in module_name.split(".") if p != "base_layer")
        pair = (f"{key}.lora_A.weight", f"{key}.lora_B.weight")
        scaling = float(module.scaling["default"])
        if isinstance(module, ParamWrapper):
            name = f"{path}.{module.parameter_name}"
            param = module.get_param()
            if param.dim() != 3:
                return f"{name} is a {param.dim()}D parameter LoRA, not a 3D expert tensor"
            # PEFT swaps in/out for [E, out, in] tensors, i.e. unless the experts module says is_transposed
            out_in = not getattr(module.get_base_layer(), "is_transposed", False)
            targets[name] = LoraTarget(*pair, scaling, module.num_experts, out_in, tuple(param.shape))
        elif type(module).__name__ == "Linear":  # lora.Linear; other layer kinds merge in memory
            targets[f"{path}.weight"] = LoraTarget(*pair, scaling)
        else:
            return f"{path} is a LoRA {type(module).__name__} layer"
    return targets


def stream_plan(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, skeleton,
                parts: dict[str, tuple[str, ...]], expert_names: tuple[str, ...] = ()) -> StreamPlan | str:
    """What the adapter in `adapter_dir` changes in the checkpoint `base_dir`, or why it cannot be
    merged shard by shard. `skeleton`: the base model on the meta device (PEFT's layers are put on
    it); `parts`: the family's `expert_checkpoint_parts`; `expert_names`: 3D tensors the merge reads
    one expert at a time even without a LoRA (a 4-bit base's experts, `BaseValues.rounded`)."""
    from safetensors import safe_open

    adapter = Path(adapter_dir)
    if not (adapter / ADAPTER_WEIGHTS).is_file() or not (adapter / ADAPTER_CONFIG).is_file():
        return f"{adapter} holds no {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}"
    shards = base_shards(base_dir)
    if shards is None:
        return f"{base_dir} is not a safetensors checkpoint directory"
    saved = json.loads((adapter / ADAPTER_CONFIG).read_text())
    for key in _REFUSED_KEYS:
        if saved.get(key):
            return f"the adapter sets {key}"
    if saved.get("peft_type", "LORA") != "LORA":
        return f"the adapter is {saved.get('peft_type')}, not LoRA"
    found = lora_targets(adapter, skeleton)
    if isinstance(found, str):
        return found
    targets, shapes = found, {n: t.shape for n, t in found.items() if t.experts}
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    known = {k for t in targets.values() for k in (t.a_key, t.b_key)}
    if keys - known:
        return f"the adapter holds tensors other than LoRA pairs of its targets ({sorted(keys - known)[0]})"
    if known - keys:
        return f"the adapter file lacks {sorted(known - keys)[0]}"
    params = {".".join(s for s in n.split(".") if s != "base_layer"): t for n, t in skeleton.named_parameters()}
    for name in expert_names:
        if name not in shapes and name in params:
            shapes[name] = tuple(params[name].shape)
    experts = None
    if shapes:
        found = CheckpointExperts.find(base_dir, shapes, parts)
        if isinstance(found, str):
            return found
        experts = found
    missing = [n for n, t in targets.items() if not t.experts and n not in shards]
    if missing:
        return f"{missing[0]} (a LoRA target) is not a tensor of the base checkpoint"
    return StreamPlan(Path(base_dir), adapter, targets, experts)


@dataclass
class _ExpertKeys:
    """Checkpoint key -> (expert tensor, expert index or None for the fused tensor, part index)."""

    by_key: dict[str, tuple[ExpertTensor, int | None, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, experts: CheckpointExperts | None) -> "_ExpertKeys":
        out = cls()
        for tensor in (experts.tensors.values() if experts is not None else ()):
            if tensor.fused:
                out.by_key[tensor.name] = (tensor, None, 0)
                continue
            for e in range(tensor.shape[0]):
                for p, key in enumerate(tensor.expert_keys(e)):
                    out.by_key[key] = (tensor, e, p)
        return out


class _Merger:
    """The merged value of each checkpoint tensor (see the module docstring)."""

    def __init__(self, stream: StreamPlan, lora, dtype: torch.dtype, values: BaseValues, base_dtype: torch.dtype):
        self.stream, self.lora, self.dtype, self.values, self.base_dtype = stream, lora, dtype, values, base_dtype
        self.expert_keys = _ExpertKeys.of(stream.experts)
        self.rounded = values.rounded()
        self.merged: set[str] = set()
        # the last merged expert of the per-expert layout (its parts are neighbours in a shard):
        # ((name, e), merged [out, in], rows per part)
        self.last: tuple[tuple[str, int], torch.Tensor, list[int]] | None = None
        self.factors: tuple[str, torch.Tensor, torch.Tensor] | None = None  # the last expert LoRA's A, B per expert

    def linear(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        t = tensor.to(self.base_dtype)
        if name in self.rounded:
            t = self.values.weight(name, t)
        t = t.to(self.dtype)
        target = self.stream.targets.get(name)
        if target is not None:
            a = self.lora.get_tensor(target.a_key).to(torch.float32)
            b = self.lora.get_tensor(target.b_key).to(torch.float32)
            t.add_((b @ a) * target.scaling)  # PEFT: base_layer.weight.data += delta_weight
            self.merged.add(name)
        return t

    def expert(self, tensor: ExpertTensor, e: int, weight: torch.Tensor) -> torch.Tensor:
        """Expert e of `tensor` merged: weight [out, in] as the model holds it."""
        w = self.values.expert(tensor.name, weight.to(self.base_dtype)).to(self.dtype)
        target = self.stream.targets.get(tensor.name)
        if target is None:
            return w
        if self.factors is None or self.factors[0] != tensor.name:
            a = self.lora.get_tensor(target.a_key).to(torch.float32)  # [E*r, in]
            b = self.lora.get_tensor(target.b_key).to(torch.float32)  # [out, r*E]
            experts = target.experts
            self.factors = (tensor.name, a.reshape(experts, -1, a.shape[-1]), b.reshape(b.shape[0], -1, experts))
        _, a, b = self.factors
        # PEFT: einsum("o r e, e r i -> e o i") (or "e i o"), times the scaling, cast to the tensor's dtype
        delta = torch.einsum("o r, r i -> o i", b[:, :, e], a[e]) * target.scaling
        if not target.out_in:
            delta = delta.t()
        self.merged.add(tensor.name)
        return w.add_(delta.to(w.dtype))

    def fused(self, tensor: ExpertTensor, handle) -> torch.Tensor:
        """A fused [E, ...] expert tensor merged, expert by expert, into one tensor allocated once."""
        piece = handle.get_slice(tensor.name)
        out = torch.empty(tuple(piece.get_shape()), dtype=self.dtype)
        for e in range(tensor.shape[0]):
            out[e] = self.expert(tensor, e, piece[e])
        return out

    def part(self, tensor: ExpertTensor, e: int, p: int) -> torch.Tensor:
        """Part p of expert e (per-expert layout): its parts concatenated as transformers fuses them,
        merged, and split again (a part in another shard is read from there)."""
        key = (tensor.name, e)
        if self.last is None or self.last[0] != key:
            self.last = None
            pieces = [self.stream.experts.read(k) for k in tensor.expert_keys(e)]
            merged = self.expert(tensor, e, torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0])
            self.last = (key, merged, [t.shape[0] for t in pieces])
        _, merged, rows = self.last
        start = sum(rows[:p])
        return merged[start:start + rows[p]].clone()

    def shard_done(self) -> None:
        self.last = None


def merge_lora_shards(stream: StreamPlan, out_dir: str | os.PathLike, *, dtype: torch.dtype,
                      values: BaseValues | None = None, base_dtype: torch.dtype | None = None) -> MergeResult:
    """The adapter merged into the base, written shard by shard into `out_dir` (see the module
    docstring); `stream` comes from `stream_plan`. Base tensors are read as the trained model
    loaded them (in `base_dtype`, default `dtype`), then merged and written in `dtype`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    values = values or BaseValues()
    base, out = stream.base_dir, Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = base_shards(base)
    by_file: dict[str, list[str]] = {}
    for name, file in shards.items():
        by_file.setdefault(file, []).append(name)
    total = total_size = 0
    try:
        with safe_open(str(stream.adapter_dir / ADAPTER_WEIGHTS), framework="pt") as lora:
            merger = _Merger(stream, lora, dtype, values, base_dtype or dtype)
            for file in sorted(by_file):
                tensors = {}
                # pread, not mapped: a mapped shard's pages count as resident while it is open
                with safe_open(str(base / file), framework="pt", backend="pread") as f:
                    for name in by_file[file]:
                        found = merger.expert_keys.by_key.get(name)
                        if found is None:
                            t = merger.linear(name, f.get_tensor(name))
                        elif found[1] is None:
                            t = merger.fused(found[0], f)
                        else:
                            t = merger.part(*found)
                        tensors[name] = t.contiguous()
                        total_size += t.numel() * t.element_size()
                merger.shard_done()
                save_file(tensors, str(out / file), metadata={"format": "pt"})
                total += len(tensors)
                del tensors
    finally:
        if stream.experts is not None:
            stream.experts.close()
    if (base / INDEX).is_file():
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(shards.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    merged = merger.merged
    return MergeResult(merged=len(merged), expert=sum(1 for n in merged if stream.targets[n].experts),
                       tensors=total, shards=len(by_file))


class MergedTensors:
    """A merge's tensors read back from its files one at a time by the model's names (a 3D expert
    tensor of the per-expert layout put together from its parts), for checking them."""

    def __init__(self, stream: StreamPlan, out_dir: str | os.PathLike):
        self.out = Path(out_dir)
        self.files = base_shards(self.out) or {}
        self.experts = stream.experts.at(self.out) if stream.experts is not None else None

    def get(self, name: str) -> torch.Tensor | None:
        from safetensors import safe_open

        if name in self.files:
            with safe_open(str(self.out / self.files[name]), framework="pt") as f:
                return f.get_tensor(name)
        tensor = self.experts.tensors.get(name) if self.experts is not None else None
        if tensor is None:
            return None
        dtype = self._dtype(tensor.expert_keys(0)[0])
        try:
            return torch.stack(list(self.experts.experts(tensor, "cpu", dtype)))
        finally:
            self.experts.close()

    def _dtype(self, key: str) -> torch.dtype:
        from safetensors import safe_open

        with safe_open(str(self.out / self.files[key]), framework="pt") as f:
            return f.get_slice(key)[:1].dtype


def write_merged_config(base_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: torch.dtype) -> None:
    """The base's config.json (its dtype the merged tensors' dtype) and generation_config.json."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(base_dir))
    config.dtype = dtype
    config.save_pretrained(str(out_dir))
    if (Path(base_dir) / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(str(base_dir)).save_pretrained(str(out_dir))


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "BaseValues", "LoraTarget", "MergeResult", "MergedTensors", "StreamPlan",
           "base_shards", "lora_targets", "merge_lora_shards", "stream_plan", "write_merged_config"]
