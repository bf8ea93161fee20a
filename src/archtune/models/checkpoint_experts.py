"""A safetensors checkpoint's expert tensors, read one expert at a time (4-bit experts while loading).

`quantize_moe_experts` stores the 3D expert tensors ([E, out, in]) in 4 bits, each expert on its
own. Read whole, as `from_pretrained` reads them, they exist densely first (in the compute dtype:
fp32 on CPU, 4x the 4-bit result). `CheckpointExperts` instead gives the loader:

- `state_dict()`: every other checkpoint tensor as a lazy safetensors slice, and for each expert
  tensor a zero-byte stand-in of its shape, dtype and device (a 0-d tensor expanded), which
  `from_pretrained(None, config=..., state_dict=...)` loads like a weight: no dense expert
  tensor is allocated, none is reported missing or re-initialised;
- `experts(name, device, dtype)`: expert e of parameter `name` as a dense [out, in] tensor, one
  at a time, read from the shard with safetensors' `get_slice` (only that expert's bytes), for
  `archtune.moe.quant4` to quantize after the adapters are attached.

Shards are read with pread, not mapped: the pages of a mapped shard count in the process's
resident memory as long as it stays open (transformers keeps every shard open while it loads).

Checkpoint layouts: the fused tensor under the parameter's own name (Gemma 4), or one module per
expert (`<experts module>.<e>.<part>.weight`, Qwen 3.5 MoE's hub layout) whose parts the family
names (`expert_checkpoint_parts`), concatenated along the output dimension as transformers fuses
them. Expert e read either way equals expert e of the tensor `from_pretrained` would have built.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class ExpertTensor:
    name: str  # the model's parameter name
    shape: tuple[int, int, int]  # [E, out, in]
    keys: tuple[str, ...]  # fused: (name,); per expert: expert 0's part keys, "{e}" in place of the index
    fused: bool

    def expert_keys(self, e: int) -> tuple[str, ...]:
        return self.keys if self.fused else tuple(k.replace("{e}", str(e)) for k in self.keys)

    def checkpoint_keys(self) -> list[str]:
        return list(self.keys) if self.fused else [k for e in range(self.shape[0]) for k in self.expert_keys(e)]


def weight_map(directory: str | os.PathLike) -> dict[str, str] | None:
    """tensor name -> shard file of a safetensors checkpoint directory (None: not one)."""
    base = Path(directory)
    if (base / INDEX).is_file():
        return dict(json.loads((base / INDEX).read_text())["weight_map"])
    if (base / SINGLE).is_file():
        from safetensors import safe_open

        with safe_open(str(base / SINGLE), framework="pt") as f:
            return {name: SINGLE for name in f.keys()}
    return None


class CheckpointExperts:
    """The expert tensors of one checkpoint directory (see the module docstring)."""

    def __init__(self, directory: Path, files: dict[str, str], tensors: dict[str, ExpertTensor]):
        self.directory, self.files, self.tensors = directory, files, tensors
        self._open: tuple[str, object] | None = None  # one shard open at a time: its mapped pages stay bounded

    @classmethod
    def find(cls, directory: str | os.PathLike, params: dict[str, tuple[int, ...]],
             parts: dict[str, tuple[str, ...]]) -> "CheckpointExperts | str":
        """The checkpoint's layout of the expert parameters `params` ({name: [E, out, in]}), or why
        they cannot be read one expert at a time. `parts`: the family's `expert_checkpoint_parts`."""
        files = weight_map(directory)
        if files is None:
            return f"{directory} is not a safetensors checkpoint directory"
        shapes = _Shapes(Path(directory), files)
        tensors = {}
        for name, shape in params.items():
            if len(shape) != 3:
                return f"{name} is not a 3D expert tensor"
            if name in files:
                if tuple(shapes.of(name)) != tuple(shape):
                    return f"{name} has shape {shapes.of(name)} in the checkpoint, {tuple(shape)} in the model"
                tensors[name] = ExpertTensor(name, tuple(shape), (name,), True)
                continue
            target = next((t for t in parts if name == t or name.endswith("." + t)), None)
            if target is None:
                return f"{name} is not in the checkpoint"
            module = name[: -len(target.split(".")[-1]) - 1]  # the experts module (…mlp.experts)
            keys = tuple(f"{module}.{{e}}.{part}.weight" for part in parts[target])
            tensor = ExpertTensor(name, tuple(shape), keys, False)
            missing = [k for k in tensor.checkpoint_keys() if k not in files]
            if missing:
                return f"{missing[0]} is not in the checkpoint"
            part_shapes = [tuple(shapes.of(k)) for k in tensor.expert_keys(0)]
            if any(len(s) != 2 or s[1] != shape[2] for s in part_shapes) or sum(s[0] for s in part_shapes) != shape[1]:
                return f"{name}'s parts {part_shapes} do not make up its shape {tuple(shape)}"
            tensors[name] = tensor
        shapes.close()
        return cls(Path(directory), files, tensors)

    def at(self, directory: str | os.PathLike) -> "CheckpointExperts":
        """The same tensors in another checkpoint of this one's layout (e.g. a merge written from it)."""
        files = weight_map(directory)
        if files is None:
            raise FileNotFoundError(f"{directory} is not a safetensors checkpoint directory")
        return CheckpointExperts(Path(directory), files, self.tensors)

    def skipped(self) -> set[str]:
        """The checkpoint keys the expert tensors are read from (not given to from_pretrained)."""
        return {k for t in self.tensors.values() for k in t.checkpoint_keys()}

    def state_dict(self, device: torch.device | str, dtype: torch.dtype) -> tuple[dict, list]:
        """(lazy state dict for from_pretrained, the open shard handles to close after loading)."""
        from safetensors import safe_open

        skipped = self.skipped()
        state: dict = {}
        handles = []
        for file in sorted(set(self.files.values())):
            handle = safe_open(str(self.directory / file), framework="pt", backend="pread")
            handles.append(handle)
            for key in handle.keys():
                if key not in skipped:
                    state[key] = handle.get_slice(key)  # read when transformers loads it
        for name, tensor in self.tensors.items():
            state[name] = torch.empty((), dtype=dtype, device=device).expand(tensor.shape)
        return state, handles

    def lookup(self, name: str) -> ExpertTensor | None:
        """The expert tensor `name` (or a name ending with it, e.g. under PEFT's base_model.model.)."""
        found = self.tensors.get(name)
        if found is None:
            found = next((t for n, t in self.tensors.items() if name.endswith("." + n)), None)
        return found

    def experts(self, tensor: ExpertTensor, device, dtype: torch.dtype):
        """Expert e of `tensor` as a dense [out, in] tensor in `dtype` on `device`, for e = 0, 1, ..."""
        for e in range(tensor.shape[0]):
            yield self.expert(tensor, e).to(device=device, dtype=dtype)

    def expert(self, tensor: ExpertTensor, e: int) -> torch.Tensor:
        """Expert e of `tensor` as stored ([out, in], the checkpoint's dtype), read alone."""
        pieces = [self.tensor_slice(key)[e] if tensor.fused else self.read(key) for key in tensor.expert_keys(e)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)

    def tensor_slice(self, key: str):
        """Checkpoint tensor `key` as a safetensors slice: indexing it reads only the rows asked for."""
        return self._handle(self.files[key]).get_slice(key)

    def read(self, key: str) -> torch.Tensor:
        """The checkpoint tensor `key` (e.g. one expert's part), in the checkpoint's dtype."""
        return self._handle(self.files[key]).get_tensor(key)

    def _handle(self, file: str):
        from safetensors import safe_open

        if self._open is None or self._open[0] != file:
            self.close()
            self._open = (file, safe_open(str(self.directory / file), framework="pt", backend="pread"))
        return self._open[1]

    def close(self) -> None:
        if self._open is not None:
            self._open[1].__exit__(None, None, None)
            self._open = None


class _Shapes:
    """Tensor shapes from the shards' headers (no tensor is read)."""

    def __init__(self, directory: Path, files: dict[str, str]):
        self.directory, self.files, self.handles = directory, files, {}

    def of(self, key: str) -> list[int]:
        from safetensors import safe_open

        file = self.files[key]
        if file not in self.handles:
            self.handles[file] = safe_open(str(self.directory / file), framework="pt", backend="pread")
        return list(self.handles[file].get_slice(key).get_shape())

    def close(self) -> None:
        for handle in self.handles.values():
            handle.__exit__(None, None, None)
        self.handles.clear()


__all__ = ["CheckpointExperts", "ExpertTensor", "weight_map"]
