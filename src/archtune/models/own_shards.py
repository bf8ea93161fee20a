"""FSDP2 loading in which no rank holds the full model: each rank reads only the rows it keeps.

`load_without_weights(plan)` builds the model through `from_pretrained` from a state dict of
zero-byte stand-ins (a 0-d tensor expanded to each checkpoint tensor's shape), so transformers
renames keys, ties embeddings, computes non-persistent buffers and checks for missing keys as it
always does, and PEFT attaches adapters as usual (on meta-device base weights PEFT would put the
adapters on the meta device too, losing their initial values). The few checkpoint tensors that
are buffers (e.g. Gemma 4's `layer_scalar`) are read whole at once.

`OwnShards.fill(model, sources)` runs after `fully_shard`: FSDP2 shards every parameter along
dimension 0 (`torch.chunk` over the ranks), so rank r's local tensor holds rows
[r * ceil(n / world), ...) of the full one. Those rows are read from the shard with safetensors'
`get_slice` (pread: only those bytes, nothing mapped), written into freshly allocated local
tensors, and nothing else of the tensor is ever read. Expert tensors ([E, out, in]) are read one
expert at a time (`CheckpointExperts.expert`), in either checkpoint layout.

Peak host memory per rank while loading: its own shards, the adapters (whole, until sharded),
and one tensor's rows in flight; the values equal what `from_pretrained` loads (same bytes, cast
to the same dtype), so training is the same as when every rank loads the whole model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import torch

from archtune.models.checkpoint_experts import CheckpointExperts, ExpertTensor
from archtune.plan import Plan

Source = str | ExpertTensor  # a checkpoint key, or an expert tensor read one expert at a time


@dataclass
class OwnShards:
    """The stand-ins a model was built from, and where each one's values are in the checkpoint."""

    checkpoint: CheckpointExperts
    owners: dict[int, Source]  # a stand-in's storage address -> its values in the checkpoint
    stand_ins: list[torch.Tensor] = field(default_factory=list)  # kept alive: their addresses stay unique

    def sources(self, model) -> dict[str, Source]:
        """{parameter name: its checkpoint source} for every parameter still a stand-in (the base
        weights; adapters and new heads are real tensors). Call it before `fully_shard`."""
        found = {name: self.source_of(p) for name, p in model.named_parameters(remove_duplicate=False)}
        return {name: source for name, source in found.items() if source is not None}

    def source_of(self, t: torch.Tensor) -> Source | None:
        """Where stand-in `t`'s values are in the checkpoint; None for a real tensor."""
        if any(s != 0 for s in t.stride()):
            return None
        return self.owners.get(t.untyped_storage().data_ptr())

    def to_meta(self, model) -> None:
        """Stand-in parameters replaced by meta-device ones (FSDP2 shards no expanded tensor);
        tied parameters stay one parameter."""
        replaced: dict[int, torch.nn.Parameter] = {}
        for module in model.modules():
            for leaf, p in list(module.named_parameters(recurse=False)):
                if self.source_of(p) is not None:
                    new = replaced.setdefault(id(p), torch.nn.Parameter(
                        torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad))
                    setattr(module, leaf, new)

    def fill(self, model, sources: dict[str, Source], device) -> int:
        """After `fully_shard` of a model whose stand-ins were made meta (`to_meta`): every local
        shard allocated on `device`, the meta ones read from the checkpoint (this rank's rows only),
        the others (adapters, buffers) given back the values they had. Returns the tensors read."""
        from torch.distributed.tensor import DTensor

        kept = {name: _local(p).clone() for name, p in model.named_parameters() if not _local(p).is_meta}
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        model.to_empty(device=device)
        read = 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                local = _local(p)
                if name in kept:
                    local.copy_(kept.pop(name))
                    continue
                start = _first_row(p) if isinstance(p, DTensor) else 0
                self._read_rows(sources[name], start, local)
                read += 1
            for name, b in model.named_buffers():
                b.copy_(buffers.pop(name))
        self.checkpoint.close()
        return read

    def _read_rows(self, source: Source, start: int, out: torch.Tensor) -> None:
        """Rows [start, start + len(out)) of `source` into `out`."""
        if out.dim() == 0:
            out.copy_(self.checkpoint.tensor_slice(source)[...])
            return
        stop = start + out.shape[0]
        if out.shape[0] == 0:
            return
        if isinstance(source, ExpertTensor):
            for e in range(start, stop):
                out[e - start].copy_(self.checkpoint.expert(source, e))
            return
        out.copy_(self.checkpoint.tensor_slice(source)[start:stop])


def _local(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


def _first_row(p) -> int:
    """The first row of the full tensor that this rank's FSDP2 shard holds (Shard(0), torch.chunk)."""
    from torch.distributed.tensor import Shard

    if tuple(p.placements) != (Shard(0),):
        raise RuntimeError(f"expected an FSDP2 shard along dimension 0, got placements {p.placements}")
    mesh = p.device_mesh
    rows = p.shape[0]
    per_rank = -(-rows // mesh.size())
    return min(rows, mesh.get_local_rank() * per_rank)


def load_without_weights(plan: Plan, checkpoint: CheckpointExperts):
    """(the model built from stand-ins, its `OwnShards`): see the module docstring."""
    from safetensors import safe_open

    from archtune.models.load import load_from_state_dict, torch_dtype
    from archtune.models.quant import device_map

    device = next(iter(device_map().values()))
    dtype = torch_dtype(plan)
    skipped = checkpoint.skipped()
    state: dict[str, torch.Tensor] = {}
    owners: dict[int, Source] = {}
    for file in sorted(set(checkpoint.files.values())):
        with safe_open(str(checkpoint.directory / file), framework="pt", backend="pread") as handle:
            for key in handle.keys():
                if key not in skipped:
                    state[key] = _stand_in(handle.get_slice(key).get_shape(), dtype, device)
                    owners[state[key].untyped_storage().data_ptr()] = key
    for name, tensor in checkpoint.tensors.items():
        state[name] = _stand_in(tensor.shape, dtype, device)
        owners[state[name].untyped_storage().data_ptr()] = tensor
    shards = OwnShards(checkpoint, owners, list(state.values()))
    model = load_from_state_dict(plan, state, dict(dtype=dtype, device_map=device_map(), output_loading_info=True))
    _read_buffers(model, shards)
    return model, shards


def _stand_in(shape, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=device).expand(tuple(shape))


def _read_buffers(model, shards: OwnShards) -> None:
    """Checkpoint tensors that are buffers (FSDP2 does not shard them) read whole now."""
    for name, b in list(model.named_buffers()):
        source = shards.source_of(b)
        if isinstance(source, str):
            module, _, leaf = name.rpartition(".")
            owner = model.get_submodule(module) if module else model
            owner.register_buffer(leaf, shards.checkpoint.tensor_slice(source)[:].to(device=b.device, dtype=b.dtype))


__all__ = ["OwnShards", "load_without_weights"]
