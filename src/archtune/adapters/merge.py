"""Merging a LoRA adapter shard by shard: read a base shard, add its deltas, write it, drop it.

`merge_lora_shards(base_dir, adapter_dir, out_dir, dtype=...)` writes the merged model as
safetensors shards with the base's own layout (the same shard files, an index when the base had
one) and holds one shard at a time, never the model. Each merged tensor is computed as PEFT's
`merge_and_unload` computes it on a model loaded in `dtype`: the base tensor cast to `dtype`, the
adapter's A and B in float32 (PEFT's adapter dtype for float bases), `delta = (B @ A) * scaling`
and one in-place add (`W += delta`, rounded once to `dtype`), so the result equals the in-memory
merge exactly.

`stream_refusal(base_dir, adapter_dir)` says why an adapter cannot be merged this way (None when it
can); `archtune merge-lora` then merges in memory. What streams: LoRA on linear weights whose
module names are the checkpoint's tensor names, plain scaling (`lora_alpha / r`, or rsLoRA), no
DoRA, no `modules_to_save`, no expert LoRA (`target_parameters`), a safetensors base.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from archtune.models.checkpoint_experts import INDEX, weight_map
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_SIDES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class MergeResult:
    merged: int  # tensors that received a LoRA delta
    tensors: int  # tensors written in all
    shards: int  # shard files written


def base_shards(base_dir: str | os.PathLike) -> dict[str, str] | None:
    """tensor name -> shard file of a safetensors checkpoint directory (None: not one)."""
    return weight_map(base_dir)


def adapter_pairs(adapter_dir: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """checkpoint tensor name -> (adapter A key, adapter B key), for each LoRA'd linear weight."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    pairs = {}
    for key in keys:
        if key.startswith(_PREFIX) and key.endswith(_SIDES[0]):
            module = key[len(_PREFIX):-len(_SIDES[0])]
            pairs[f"{module}.weight"] = (key, f"{_PREFIX}{module}{_SIDES[1]}")
    return pairs


def stream_refusal(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike) -> str | None:
    """Why this adapter cannot be merged shard by shard into this base; None when it can."""
    from safetensors import safe_open

    adapter = Path(adapter_dir)
    if not (adapter / ADAPTER_WEIGHTS).is_file() or not (adapter / ADAPTER_CONFIG).is_file():
        return f"{adapter} holds no {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}"
    shards = base_shards(base_dir)
    if shards is None:
        return f"{base_dir} is not a safetensors checkpoint directory"
    saved = json.loads((adapter / ADAPTER_CONFIG).read_text())
    for key in ("use_dora", "fan_in_fan_out", "modules_to_save", "target_parameters", "rank_pattern", "alpha_pattern"):
        if saved.get(key):
            return f"the adapter sets {key}"
    if saved.get("peft_type", "LORA") != "LORA":
        return f"the adapter is {saved.get('peft_type')}, not LoRA"
    pairs = adapter_pairs(adapter)
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    known = {k for pair in pairs.values() for k in pair}
    if keys - known:
        return f"the adapter holds tensors other than linear LoRA pairs ({sorted(keys - known)[0]})"
    missing = [name for name in pairs if name not in shards]
    if missing:
        return f"{missing[0]} (a LoRA target) is not a tensor of the base checkpoint"
    return None


def lora_scaling(adapter_dir: str | os.PathLike) -> float:
    """PEFT's scaling of the delta: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    saved = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    r, alpha = saved["r"], saved["lora_alpha"]
    return alpha / math.sqrt(r) if saved.get("use_rslora") else alpha / r


def merge_lora_shards(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      *, dtype: torch.dtype) -> MergeResult:
    """The adapter merged into the base, written shard by shard into `out_dir` (see the module
    docstring); the caller has checked `stream_refusal`. Tensors are cast to `dtype`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base, out = Path(base_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = base_shards(base)
    pairs = adapter_pairs(adapter_dir)
    scaling = lora_scaling(adapter_dir)
    by_file: dict[str, list[str]] = {}
    for name, file in shards.items():
        by_file.setdefault(file, []).append(name)
    merged = total = 0
    total_size = 0
    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as lora:
        for file in sorted(by_file):
            tensors = {}
            with safe_open(str(base / file), framework="pt") as f:
                for name in by_file[file]:
                    t = f.get_tensor(name).to(dtype)
                    if name in pairs:
                        a_key, b_key = pairs[name]
                        a = lora.get_tensor(a_key).to(torch.float32)
                        b = lora.get_tensor(b_key).to(torch.float32)
                        t.add_((b @ a) * scaling)  # PEFT: base_layer.weight.data += delta_weight
                        merged += 1
                    tensors[name] = t.contiguous()
                    total_size += t.numel() * t.element_size()
            save_file(tensors, str(out / file), metadata={"format": "pt"})
            total += len(tensors)
            del tensors
    if (base / INDEX).is_file():
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(shards.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return MergeResult(merged=merged, tensors=total, shards=len(by_file))


def write_merged_config(base_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: torch.dtype) -> None:
    """The base's config.json (its dtype the merged tensors' dtype) and generation_config.json."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(base_dir))
    config.dtype = dtype
    config.save_pretrained(str(out_dir))
    if (Path(base_dir) / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(str(base_dir)).save_pretrained(str(out_dir))


__all__ = ["MergeResult", "adapter_pairs", "base_shards", "lora_scaling", "merge_lora_shards",
           "stream_refusal", "write_merged_config"]
