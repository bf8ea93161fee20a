"""Several processes (torchrun): process group, rank-0-only side effects, FSDP2 arguments,
activation offloading, sharded-to-full final weights.

The DDP/FSDP plumbing itself is transformers' Trainer + accelerate (DistributedDataParallel with
the Plan's `ddp_find_unused_parameters`; FSDP2 `fully_shard` per wrap-class module, then the
root; torch.distributed.checkpoint for sharded checkpoints). What is here is what they leave to
the caller: which backend (NCCL on GPUs, gloo on CPU) and the collective timeout (`ddp_timeout`),
preprocessing once per node (nodes need not share a file system) and the check that every node
prepared the same data, a clean
`destroy_process_group` at exit (gloo can abort at interpreter exit when the group is left open),
the final weights gathered once, and the activation-offloading wrappers; under torchrun's
restarts (`--max-restarts`), a process group of this attempt's own, the attempt's number every
rank agrees on and the id every attempt of one run shares.

Every function is a no-op (or the single-process answer) when WORLD_SIZE is unset or 1.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch

from archtune.errors import UserError

def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def node_rank() -> int:
    """This node's number (torchrun's GROUP_RANK; 0 on one node)."""
    return int(os.environ.get("GROUP_RANK", "0"))


def restart_count() -> int:
    """How often torchrun restarted this node's workers (TORCHELASTIC_RESTART_COUNT; 0 at first).
    Counted by each node's agent alone: see `attempt` for the number every rank agrees on."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


# The key-value store this attempt's process group was built on (progress records go there too),
# the id of the run every attempt of it shares and the attempt's number; set by `init`.
_session: dict = {"store": None, "run_id": None, "attempt": None}


def attempt() -> int:
    """Which start of this run's worker group this is, the same on every rank (0 at first)."""
    return _session["attempt"] if _session["attempt"] is not None else restart_count()


MAIN_RANK = 0  # the one rank that logs and writes outputs and checkpoints
PREPARING_LOCAL_RANK = 0  # on every node, the process that prepares the data first (`local_main_first`)


def is_main() -> bool:
    return rank() == MAIN_RANK


def is_distributed() -> bool:
    return world_size() > 1


def backend() -> str:
    """NCCL when this process has a GPU, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(timeout_seconds: int | None = None) -> bool:
    """Join the process group torchrun describes (env://). True when this call created it.

    `timeout_seconds` (the plan's ddp_timeout): how long a collective, a barrier included, waits
    for the other ranks before it fails (torch's default is 30 minutes)."""
    import torch.distributed as dist

    if not is_distributed() or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    timeout = timedelta(seconds=timeout_seconds) if timeout_seconds else None
    base, attempt = _attempt_store(timeout)
    _session["store"] = attempt
    _session["run_id"] = _shared_run_id(base)
    dist.init_process_group(backend=backend(), timeout=timeout, store=attempt, rank=rank(), world_size=world_size())
    return True


def _attempt_store(timeout: timedelta | None):
    """torchrun's store (env://) and a view of it for this attempt only. torchrun keeps one store
    for every attempt of a run, so the workers it restarts would read the addresses the killed
    attempt's ranks published there and fail to connect (gloo: "Connection refused";
    pytorch/pytorch#167288): keys under an attempt's own prefix keep the attempts apart."""
    import torch.distributed as dist

    kwargs = {"timeout": timeout} if timeout is not None else {}
    base, _, _ = next(dist.rendezvous("env://", rank=rank(), world_size=world_size(), **kwargs))
    # Not TORCHELASTIC_RESTART_COUNT: on several nodes an agent whose own workers were healthy
    # restarts them without counting (a membership change), so nodes disagree (seen: 0 on one,
    # 1 on the other, and the ranks never met). Every worker of an attempt joins once, so the
    # joins counted in the store the attempts share number the attempt alike on every node.
    joins = base.add("archtune/joins", 1)
    _session["attempt"] = (joins - 1) // world_size()
    return base, dist.PrefixStore(f"archtune/attempt-{_session['attempt']}", base)


def _shared_run_id(base) -> str:
    """One id for all attempts of this run: rank 0 of the first attempt writes it into the store
    the attempts share; later attempts read it (a restart is the same run)."""
    key = "archtune/run-id"
    if attempt() == 0 and is_main():
        import uuid

        base.set(key, uuid.uuid4().hex)
    return base.get(key).decode()


def run_id() -> str | None:
    """The id every torchrun attempt of this run shares (None on one process)."""
    return _session["run_id"]


def store():
    """This attempt's key-value store (None on one process)."""
    return _session["store"]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown(synchronize: bool = True) -> None:
    """Destroy the process group; after a barrier when all went well (so no rank tears it down
    under another), at once after an error (the other ranks may be gone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if synchronize:
                dist.barrier()
        finally:
            dist.destroy_process_group()
            _session["store"] = None
            _session["attempt"] = None


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """The first process of every node (LOCAL_RANK 0) runs the block first (tokenize and write the
    data cache), the nodes in parallel; the node's other processes wait, then run it and find that
    cache. Each node prepares from its own files into its own cache, so nodes need no shared file
    system (`same_on_every_rank` then checks that they prepared the same data). If a node's first
    process fails, torchrun stops the waiting ones."""
    first = local_rank() == PREPARING_LOCAL_RANK
    if is_distributed() and not first:
        barrier()
    yield
    if is_distributed() and first:
        barrier()


def gather(value) -> list:
    """`value` of every rank, in rank order (a collective; [value] on one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def same_on_every_rank(value, key: str, what: str, fix: str) -> None:
    """Raise the same UserError on every rank when some rank's `value` differs from rank 0's
    (a collective: every rank calls it)."""
    seen = gather((node_rank(), value))
    odd = [r for r, (_, v) in enumerate(seen) if v != seen[0][1]]
    if odd:
        where = ", ".join(f"rank {r} (node {seen[r][0]})" for r in odd)
        raise UserError.single(key, f"{where} prepared other {what} than rank 0 (node {seen[0][0]}): "
                               f"{seen[odd[0]][1]} against {seen[0][1]}", fix)


# ----------------------------------------------------------------------------- FSDP2

def fsdp_settings(plan) -> dict | None:
    """The Plan's FSDP2 settings (None when FSDP is off): wrap classes, resharding, offload."""
    if not plan.distributed.fsdp:
        return None
    reshard = plan.distributed.fsdp_reshard_after_forward
    return {
        "layer_classes": list(plan.decoder_layer_classes),
        "reshard_after_forward": True if reshard is None else bool(reshard),
        "offload_params": plan.distributed.fsdp_offload_params,
    }


def shard_model(model, settings: dict, own_shards=None) -> int:
    """FSDP2: `fully_shard` on every module of the wrap classes, then on the root, over a 1-D
    device mesh of all ranks (cpu + gloo, or cuda + NCCL). Returns the number of layer units.

    `own_shards` (models/own_shards.py): the base weights are stand-ins; they are sharded on the
    meta device and each rank then reads only its own rows of them from the checkpoint.

    accelerate's FSDP2 path is GPU-only (its "MULTI_CPU" mode always wraps DDP), so the sharding
    is done here, by torch's own `fully_shard`, the same way on CPU and GPU.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world_size(),))
    offload = CPUOffloadPolicy() if settings.get("offload_params") and torch.cuda.is_available() else OffloadPolicy()
    kwargs = dict(mesh=mesh, reshard_after_forward=settings.get("reshard_after_forward", True),
                  offload_policy=offload)
    wanted = set(settings["layer_classes"])
    layers = [m for m in model.modules() if type(m).__name__ in wanted]
    sources = None
    if own_shards is not None:
        sources = own_shards.sources(model)
        own_shards.to_meta(model)
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    if own_shards is not None:
        own_shards.fill(model, sources, device=mesh.device_type)
    return len(layers)


def save_sharded(state: dict, directory: Path) -> None:
    """torch.distributed.checkpoint: every rank writes its own shards (no full gather)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(directory))


def load_sharded(state: dict, directory: Path) -> None:
    """Read shards written by `save_sharded` into `state` (in place; resharded if the layout differs)."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=str(directory))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's full value: DTensor shards (FSDP2) are gathered (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu").contiguous()


def sharded_parameters(model) -> int:
    """How many parameters of `model` are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return sum(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model) -> dict[str, torch.Tensor] | None:
    """The model's full state dict, gathered on rank 0 only (None on other ranks), on CPU.

    One gather at the end of training for the final weights; checkpoints stay sharded.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return state if is_main() else None


# ----------------------------------------------------------------------------- activation offloading

def apply_activation_offloading(model, layer_classes: list[str]) -> int:
    """Checkpoint every decoder layer (non-reentrant) and keep what the checkpoint saves (the layer
    inputs) in CPU memory until backward: torch's checkpoint wrapper inside an offload wrapper.

    Returns the number of layers wrapped. State-dict keys are unchanged (torch's wrappers strip
    their `_checkpoint_wrapped_module.` segment). Needs `use_cache: false` (the Plan sets it).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        ActivationWrapper,
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    class OffloadedCheckpoint(ActivationWrapper):
        """The inner (checkpointed) layer runs under save_on_cpu: saved tensors go to CPU memory."""

        def forward(self, *args, **kwargs):
            # Pinned memory needs an accelerator; on a CPU machine the tensors are already there.
            with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
                return self._checkpoint_wrapped_module(*args, **kwargs)

    wanted = set(layer_classes)
    count = [0]

    def check(module) -> bool:
        hit = type(module).__name__ in wanted
        count[0] += hit
        return hit

    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=lambda m: OffloadedCheckpoint(checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT)),
        check_fn=check,
    )
    return count[0]
