"""The memory a Plan's training takes per device, estimated from config.json alone.

`estimate_memory(plan)` builds the model on the meta device (shapes, no storage: seconds, no
weights) and adds up, per device, for the world size and strategy the Plan resolved:

- weights: the base parameters in their training dtype (bf16: 2 bytes, else 4); QLoRA keeps
  nn.Linear weights in 4 bit (`weight_bytes(n, "nf4")`) and, as PEFT's k-bit preparation does,
  every other parameter in fp32, but for the expert tensors `quantize_moe_experts` stores in 4
  bits (`expert_4bit_bytes`); FSDP2 holds 1/world_size of them (none with CPU offloading);
  preference training of a full fine-tune (`rl_reference_model: frozen_copy`) holds a second,
  frozen copy as its reference (its buffers too);
- adapter: LoRA matrices (fp32), r * (in + out) per targeted linear layer, r * E * (in + out) per
  targeted expert tensor [E, out, in]; `lora_modules_to_save` copies;
- gradients: one per trainable parameter, in its dtype (FSDP2: sharded);
- optimizer: the optimizer's states per trainable parameter (AdamW: 2, 8-bit Adam: 2 bytes,
  SGD without momentum: none; FSDP2: sharded);
- activations: what autograd saves for backward, measured by running the decoder's forward on
  the meta device at micro_batch_size x sequence_len with saved-tensor hooks (attention as the
  fused SDPA kernels save it: q, k, v, output and log-sum-exp, no [T x T] matrix; experts as a
  balanced grouped matmul). With gradient checkpointing only each layer's input is kept plus one
  layer's activations during its recompute; activation offloading moves the layer inputs to host
  memory; backward adds one layer's worth (the gradients of what that layer saved);
- logits: the loss over the vocabulary: the stock loss holds [tokens x vocab] fp32 logits, their
  log-softmax and gradient (and the softcap's output); the chunked cross-entropy holds that for
  one chunk of tokens;
- buffers: the model's buffers, DDP's gradient buckets (a copy of the gradients), FSDP2's
  gathered parameters and gradients of the two largest layers (one computing, one prefetched),
  and, training tied embeddings, the second of the two gradients summed into theirs.

`peak_bytes` is their sum: the moment of the backward pass when activations, gradients and
optimizer states all exist.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from archtune.models.quant import NF4_BYTES_PER_PARAM
from archtune.patches.meta_forward import META_BALANCED_EXPERTS, META_FUSED_ATTENTION

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan.resolver import Plan

PARTS = ("weights", "adapter", "gradients", "optimizer", "activations", "logits", "buffers")

# Bytes per parameter of each storage kind; bitsandbytes' NF4 layouts are models/quant.py's.
BYTES_PER_PARAM: dict[str, float] = {
    "float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0 + 4 / 4096, **NF4_BYTES_PER_PARAM,
}
# Optimizer states per trainable parameter, in units of the parameter's own bytes ("x") or fixed bytes.
OPTIMIZER_STATES: dict[str, tuple[float, str]] = {
    "adamw_torch": (2, "x"), "adamw_torch_fused": (2, "x"), "adamw_hf": (2, "x"), "adamw_torch_xla": (2, "x"),
    "adamw_apex_fused": (2, "x"), "adamw_anyprecision": (2, "x"), "adam": (2, "x"),
    "adamw_bnb_8bit": (2, "bytes"), "adamw_8bit": (2, "bytes"), "paged_adamw_8bit": (2, "bytes"),
    "paged_adamw_32bit": (8, "bytes"), "lion_8bit": (1, "bytes"), "lion_32bit": (4, "bytes"),
    "paged_lion_8bit": (1, "bytes"), "paged_lion_32bit": (4, "bytes"),
    "sgd": (0, "x"), "adagrad": (1, "x"), "rmsprop": (1, "x"), "adafactor": (0, "x"),
}
GIB = 2**30


def weight_bytes(numel: int, kind: str) -> int:
    """Bytes of `numel` parameters stored as `kind` (a torch dtype name, "nf4", "int8")."""
    try:
        return int(math.ceil(numel * BYTES_PER_PARAM[kind]))
    except KeyError:
        raise KeyError(f"unknown weight storage {kind!r}; known: {', '.join(BYTES_PER_PARAM)}") from None


@dataclass
class MemoryEstimate:
    parts: dict[str, int]
    world_size: int
    strategy: str
    notes: list[str] = field(default_factory=list)
    budget: int | None = None  # the device memory it was checked against (bytes), if any

    load: "LoadMemory | None" = None  # what loading the weights materializes (see LoadMemory)

    @property
    def peak_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def device_peak_bytes(self) -> int:
        """The training device's peak: the larger of loading's and training's."""
        return max(self.peak_bytes, self.load.device_bytes if self.load else 0)

    @property
    def host_peak_bytes(self) -> int:
        """Host RAM at its peak (beyond Python and the libraries): on a CPU run the device's peak."""
        if self.load is None or self.load.device == "cpu":
            return self.device_peak_bytes
        return self.load.host_bytes

    def to_json(self) -> dict:
        """The `"memory"` object of `archtune check --memory --json`."""
        out = {"peak_bytes": self.peak_bytes, "parts": {k: int(self.parts[k]) for k in PARTS}, "per_device": True}
        if self.load is not None:
            out.update(load_peak_bytes=self.load.device_bytes, host_peak_bytes=self.host_peak_bytes,
                       device_peak_bytes=self.device_peak_bytes, device=self.load.device,
                       load_parts=self.load.parts())
        return out


@dataclass
class LoadMemory:
    """The peak while the weights load, before training starts.

    resident: the weights as they are at loading's peak: the trained weights, but, when 4-bit
    experts are quantized after loading whole (no per-expert read from the checkpoint), the expert
    tensors dense in the compute dtype first; plus the adapter. mapped: the checkpoint's shards
    mapped into memory while transformers reads them (their pages count as resident until loading
    ends); none when archtune reads them itself (pread), or when the weights are those pages (a
    checkpoint stored in the training dtype: then nothing is in flight either). FSDP2 ranks that read
    only their own rows hold their shards and the adapters, and a shard of the largest tensor in
    flight. transient: the largest tensor in flight:
    read in the checkpoint's dtype, plus its dense compute-dtype copy when it is then quantized.
    On a GPU the weights and their conversion go to the device; the host holds what is read.
    """

    device: str  # "cpu" or "cuda"
    resident: int
    mapped: int
    transient: int
    read_buffer: int  # the largest tensor read, in the checkpoint's dtype (host RAM on a GPU run)

    @property
    def device_bytes(self) -> int:
        return self.resident + self.transient + (self.mapped if self.device == "cpu" else 0)

    @property
    def host_bytes(self) -> int:
        return self.read_buffer + self.mapped

    def parts(self) -> dict[str, int]:
        return {"resident": int(self.resident), "mapped": int(self.mapped), "transient": int(self.transient)}


# ---------------------------------------------------------------- the meta-device model

def _text_model(model):
    """The decoder that turns input_ids into hidden states (no lm_head)."""
    inner = getattr(model, "model", None)
    return inner if inner is not None else model.get_decoder()


@dataclass
class SavedActivations:
    per_layer: list[int]  # bytes autograd saves inside each decoder layer
    outside: int  # embeddings, final norm, rotary tables, masks
    layer_input: int  # one layer's input hidden states (what checkpointing keeps per layer)


def measure_activations(model, layer_classes: set[str], batch: int, seq: int) -> SavedActivations:
    """Run the decoder's forward on the meta device and count the bytes autograd saves."""
    import torch

    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    per_layer = [0] * len(layers)
    seen: set[int] = set()
    where = {"layer": None}
    counts = {"outside": 0}

    def pack(t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in params and key not in seen:
            seen.add(key)
            if where["layer"] is None:
                counts["outside"] += storage.nbytes()
            else:
                per_layer[where["layer"]] += storage.nbytes()
        return t

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__("layer", i)))
        handles.append(layer.register_forward_hook(lambda m, a, o: where.__setitem__("layer", None)))
    if hasattr(model, "set_experts_implementation"):
        with contextlib.suppress(Exception):  # models without experts refuse any implementation
            model.set_experts_implementation(META_BALANCED_EXPERTS.apply())
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    try:
        with META_FUSED_ATTENTION.apply(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _text_model(model)(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    hidden = model.config.get_text_config().hidden_size
    dtype_bytes = next(model.parameters()).element_size()
    return SavedActivations(per_layer, counts["outside"], batch * seq * hidden * dtype_bytes)


# ---------------------------------------------------------------- parameters

def _lora_targets(plan: "Plan", model) -> tuple[list[tuple[str, Any]], list[tuple[str, tuple]]]:
    """(targeted linear modules, targeted expert tensors) as PEFT would pick them."""
    import torch

    targets = plan.adapter.target_modules
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    output = model.get_output_embeddings()
    if isinstance(targets, str) and targets.lower() == "all-linear":
        hit = [(n, m) for n, m in linears if m is not output]
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        hit = [(n, m) for n, m in linears if pattern.fullmatch(n)]
    else:
        names = [str(t) for t in targets or []]
        hit = [(n, m) for n, m in linears if any(n == t or n.endswith("." + t) for t in names)]
    tensors = []
    for target in plan.adapter.target_parameters:
        tensors += [(n, tuple(p.shape)) for n, p in model.named_parameters()
                    if (n == target or n.endswith("." + target)) and p.dim() == 3]
    return hit, tensors


def _is_frozen_tower(name: str, plan: "Plan") -> bool:
    return plan.freeze_mm_modules and any(
        name.startswith(prefix + ".") or f".{prefix}." in f".{name}" for prefix in plan.family.mm_module_prefixes)


def _parameter_bytes(plan: "Plan", model) -> dict[str, Any]:
    import torch

    bf16 = plan.training.bf16  # as resolved: `bf16: auto` is true on a GPU with bfloat16
    quantized = plan.model.four_bit_base
    base_kind = "bfloat16" if bf16 else "float32"
    output = model.get_output_embeddings()
    quantized_weights = set()
    if quantized:
        quantized_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output}
    four_bit_experts = set()
    if plan.quantize_moe_experts:  # the expert tensors stored as archtune.moe.quant4 stores them
        from archtune.moe.quant4 import expert_4bit_bytes  # (it imports PEFT: only for a model that has them)

        four_bit_experts = {id(p) for n, p in model.named_parameters() if p.dim() == 3 and any(
            n == t or n.endswith("." + t) for t in plan.expert_param_names)}
    weights = 0
    seen = set()
    experts_4bit = experts_dense = largest_read = largest_in_flight = 0
    read_kind = checkpoint_kind(plan, base_kind)
    compute_kind = base_kind
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        read = weight_bytes(p.numel(), read_kind)
        largest_read = max(largest_read, read)
        if id(p) in four_bit_experts:
            experts_4bit += expert_4bit_bytes(tuple(p.shape))
            experts_dense += weight_bytes(p.numel(), compute_kind)
            continue
        kind = ("nf4" if id(p) in quantized_weights else "float32") if quantized else base_kind
        weights += weight_bytes(p.numel(), kind)
        # in flight: the tensor read, and (a 4-bit linear) its dense copy before bitsandbytes quantizes it
        largest_in_flight = max(largest_in_flight, read + (weight_bytes(p.numel(), compute_kind)
                                                           if kind == "nf4" else 0))
    weights += experts_4bit
    adapter_params = 0
    trainable_bytes = 0
    if plan.adapter.is_lora:
        r = int(plan.adapter.r)
        linears, tensors = _lora_targets(plan, model)
        adapter_params = sum(r * (m.in_features + m.out_features) for _, m in linears)
        adapter_params += sum(r * shape[0] * (shape[1] + shape[2]) for _, shape in tensors)
        saved = 0
        for name in plan.adapter.modules_to_save:
            for n, m in model.named_modules():
                if n == name or n.endswith("." + name):
                    saved += sum(p.numel() for p in m.parameters(recurse=True))
        adapter_params += saved
        trainable_bytes = adapter_params * 4  # PEFT keeps adapter weights in fp32
        trainable_params = adapter_params
    else:
        trainable_params = sum(p.numel() for n, p in model.named_parameters() if not _is_frozen_tower(n, plan))
        trainable_bytes = int(trainable_params * BYTES_PER_PARAM[base_kind])
    largest_layer = 0
    classes = layer_classes(plan, model)
    for m in model.modules():
        if type(m).__name__ in classes:
            largest_layer = max(largest_layer, sum(p.numel() for p in m.parameters()))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"weights": weights, "adapter": adapter_params * 4 if plan.adapter.is_lora else 0,
            "trainable_params": trainable_params, "trainable_bytes": trainable_bytes,
            "largest_layer_bytes": int(largest_layer * BYTES_PER_PARAM[base_kind]), "buffers": buffers,
            "layer_classes": classes, "experts_4bit": experts_4bit, "experts_dense": experts_dense,
            "largest_read": largest_read, "largest_in_flight": largest_in_flight,
            "checkpoint_bytes": sum(weight_bytes(p.numel(), read_kind) for p in model.parameters()),
            "cast_while_loading": read_kind != compute_kind, "read_kind": read_kind}


def checkpoint_kind(plan: "Plan", default: str) -> str:
    """The dtype the checkpoint's tensors are stored in (config.json's dtype), as a BYTES_PER_PARAM key."""
    config = plan.model_config
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    kind = str(config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or default)
    kind = kind.removeprefix("torch.")
    return kind if kind in BYTES_PER_PARAM else default


def load_memory(plan: "Plan", sizes: dict) -> LoadMemory:
    """`LoadMemory` of the Plan's load (see there), from `_parameter_bytes`' sizes."""
    import torch

    from archtune.models import quant

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ws = plan.world_size
    if plan.distributed.fsdp and ws > 1 and plan.distributed.fsdp_load_own_shards:
        # Each rank reads its own rows (pread) into its shards; the adapters are whole until sharded.
        share = sizes["largest_read"] // ws
        return LoadMemory(device, int(sizes["weights"] // ws + sizes["adapter"]), 0, int(share), int(share))
    per_expert = plan.quantize_moe_experts and plan.model.four_bit_base and quant.checkpoint_experts(plan) is not None
    resident = sizes["weights"] + sizes["adapter"]
    if plan.quantize_moe_experts and not per_expert:  # loaded dense, then quantized tensor by tensor
        resident += sizes["experts_dense"] - sizes["experts_4bit"]
    # Not quantized, the mapped shards are no second copy: stored in the training dtype, the weights
    # are their pages; in another dtype, archtune reads them tensor by tensor (models/load.py).
    mapped = 0 if per_expert or not plan.model.four_bit_base else sizes["checkpoint_bytes"]
    if not plan.model.four_bit_base:
        mapped = _fused_while_loading(plan, sizes)
    in_flight = sizes["largest_in_flight"] if plan.model.four_bit_base or sizes["cast_while_loading"] else 0
    return LoadMemory(device, int(resident), int(mapped), int(in_flight), int(sizes["largest_read"]))


def _fused_while_loading(plan: "Plan", sizes: dict) -> int:
    """Bytes of the checkpoint's expert tensors stored one module per expert (Qwen 3.5 MoE's hub
    layout): transformers fuses them into new tensors, and their mapped pages stay resident beside
    those until loading ends (Qwen 3.5 35B-A3B widths, 2 layers, bf16: the load peaked 2.0 GiB beyond
    the weights for 3.0 GiB of such tensors; counting them all errs high)."""
    from archtune.models import quant

    found = quant.checkpoint_experts(plan)
    if found is None:
        return 0
    per_expert = [t for t in found.tensors.values() if not t.fused]
    return sum(weight_bytes(math.prod(t.shape), sizes["read_kind"]) for t in per_expert)


def _tied_embeddings(model) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def layer_classes(plan: "Plan", model) -> set[str]:
    """The decoder layer classes: the Plan's, else the family's, else the model's `_no_split_modules`."""
    classes = set(plan.decoder_layer_classes or ([plan.family.decoder_layer_cls]
                                                         if plan.family.decoder_layer_cls else []))
    if not classes:  # no family knowledge and no wrapping planned: the model's own layer classes
        present = {type(m).__name__ for m in model.modules()}
        classes = {c for c in getattr(model, "_no_split_modules", None) or () if c in present}
    return classes


def _optimizer_bytes(name: str, trainable_params: int, trainable_bytes: int, notes: list[str]) -> int:
    states = OPTIMIZER_STATES.get(name)
    if states is None:
        notes.append(f"optimizer {name}: counted as AdamW (two states per parameter)")
        states = (2, "x")
    count, unit = states
    return int(count * (trainable_bytes if unit == "x" else trainable_params))


# ---------------------------------------------------------------- the estimate

def strategy(plan: "Plan") -> str:
    if plan.world_size == 1:
        return "single"
    name = plan.distributed.strategy
    if plan.distributed.fsdp and plan.distributed.fsdp_offload_params:
        name += "+param_offload"
    return name + ("+activation_offload" if plan.model.activation_offloading else "")


def estimate_memory(plan: "Plan") -> MemoryEstimate:
    """Per-device memory of training as `plan` says (see the module docstring). Raises
    StructureUnavailable when the model cannot be built from its config.json."""
    import torch

    from archtune.plan.structure import meta_model

    notes: list[str] = []
    model = meta_model(plan.model_config, plan.family.auto_class)
    training = plan.training
    if training.bf16:
        model = model.to(torch.bfloat16)
    ws = plan.world_size
    sizes = _parameter_bytes(plan, model)
    fsdp = plan.distributed.fsdp and ws > 1
    shard = ws if fsdp else 1
    offload_params = fsdp and plan.distributed.fsdp_offload_params

    weights = 0 if offload_params else sizes["weights"] // shard
    buffers = sizes["buffers"]
    if plan.preference.reference_model == "frozen_copy":  # preference training of a full fine-tune
        weights += sizes["weights"]
        buffers += sizes["buffers"]
        notes.append("rl_reference_model: frozen_copy: a second, frozen copy of the model is the reference")
    adapter = sizes["adapter"] // shard
    gradients = sizes["trainable_bytes"] // shard
    optimizer = _optimizer_bytes(training.optimizer, sizes["trainable_params"], sizes["trainable_bytes"], notes) // shard
    if offload_params:
        gradients = optimizer = 0
        notes.append("fsdp_offload_params: parameters, gradients and optimizer states live in host memory")

    batch, seq = training.micro_batch_size, plan.data.sequence_len
    saved = measure_activations(model, sizes["layer_classes"], batch, seq)
    if plan.model.activation_offloading:
        activations = saved.outside + max(saved.per_layer, default=0) + saved.layer_input
        notes.append("activation_offloading: each layer's input waits in host memory until backward")
    elif plan.training.gradient_checkpointing or plan.distributed.fsdp_activation_checkpointing:
        activations = saved.outside + len(saved.per_layer) * saved.layer_input + max(saved.per_layer, default=0)
    else:
        activations = saved.outside + sum(saved.per_layer)
    # Backward through a layer materializes the gradients of what it saved: one layer's worth more.
    activations += max(saved.per_layer, default=0)

    text = model.config.get_text_config()
    vocab = int(text.vocab_size)
    cap = getattr(text, "final_logit_softcapping", None)
    logit_bytes = 2 if training.bf16 else 4
    per_element = logit_bytes + 4 * (2 + (1 if cap else 0))  # logits, fp32 copy/log-softmax, gradient, softcap
    tokens = batch * seq
    if plan.model.chunked_cross_entropy:
        chunks = plan.model.chunked_cross_entropy_num_chunks
        logits = math.ceil(tokens / chunks) * vocab * per_element
    else:
        logits = tokens * vocab * per_element

    if ws > 1 and not fsdp:
        buffers += sizes["trainable_bytes"]  # DDP's gradient buckets
    if not plan.adapter.is_lora and _tied_embeddings(model):
        # A trained tied embedding gets two dense gradients (lm_head's and the lookup's), summed:
        # one more of its size at the peak (measured: backward adds 2.0 weights for one tensor).
        embedding = model.get_input_embeddings().weight
        buffers += weight_bytes(embedding.numel(), "bfloat16" if training.bf16 else "float32")
        notes.append("tied embeddings trained: their two gradients are summed (one more embedding's size)")
    if fsdp:
        gathered = 2 * sizes["largest_layer_bytes"]  # the computing layer and the prefetched one
        buffers += gathered + (gathered // 2 if not plan.adapter.kind else 0)  # + one layer's full gradients

    parts = {"weights": int(weights), "adapter": int(adapter), "gradients": int(gradients),
             "optimizer": int(optimizer), "activations": int(activations), "logits": int(logits),
             "buffers": int(buffers)}
    # Unless each FSDP2 rank reads only its own rows, every process loads the whole model first.
    load = load_memory(plan, sizes)
    return MemoryEstimate(parts, ws, strategy(plan), notes, load=load)


# ---------------------------------------------------------------- what would make it fit

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB', '80 GB', '24g', '81920MiB' -> bytes (GB read as GiB: what GPUs are sold as)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"{text!r} is not a memory size (e.g. 80GiB, 24GB, 81920MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _with(plan: "Plan", **changes) -> "Plan":
    """The same config with some keys changed, resolved again (for the "would fit" suggestions)."""
    from archtune.plan.resolver import resolve

    world_size = changes.pop("_world_size", plan.world_size)
    cfg = plan.config.model_copy(update=changes)
    cfg.__pydantic_fields_set__ = plan.config.model_fields_set | set(changes)
    return resolve(cfg, plan.model_config, world_size=world_size)


def fitting_settings(plan: "Plan", budget: int) -> list[str]:
    """Settings (one change each, from the cheapest) under which the estimate fits `budget` bytes."""
    training = plan.training
    micro, accumulation = training.micro_batch_size, training.gradient_accumulation_steps
    offloading = plan.model.activation_offloading
    candidates: list[tuple[str, dict]] = []
    if not training.gradient_checkpointing and not offloading:
        candidates.append(("gradient_checkpointing: true", {"gradient_checkpointing": True}))
    if micro > 1:
        half = max(1, micro // 2)
        candidates.append((f"micro_batch_size: {half} with gradient_accumulation_steps: {accumulation * micro // half}",
                           {"micro_batch_size": half, "gradient_accumulation_steps": accumulation * micro // half}))
    if not plan.model.chunked_cross_entropy:
        candidates.append(("chunked_cross_entropy: true", {"chunked_cross_entropy": True}))
    if not offloading:
        candidates.append(("activation_offloading: true", {"activation_offloading": True, "gradient_checkpointing": True}))
    if not plan.adapter.kind:
        candidates.append(("adapter: lora", {"adapter": "lora"}))
    if not plan.model.four_bit_base:
        candidates.append(("adapter: qlora with load_in_4bit: true", {"adapter": "qlora", "load_in_4bit": True}))
    fits: list[str] = []
    for label, changes in candidates:
        try:
            if estimate_memory(_with(plan, **changes)).peak_bytes <= budget:
                fits.append(label)
        except Exception:  # a combination the plan refuses: not a suggestion
            continue
    for n in (2, 4, 8):
        if n <= plan.world_size:
            continue
        try:
            other = _with(plan, fsdp=["full_shard", "auto_wrap"], _world_size=n)
            if not other.errors and estimate_memory(other).peak_bytes <= budget:
                fits.append(f"FSDP2 over {n} devices (fsdp: [full_shard, auto_wrap], --nproc {n})")
                break
        except Exception:
            continue
    return fits


__all__ = ["BYTES_PER_PARAM", "LoadMemory", "MemoryEstimate", "checkpoint_kind", "load_memory", "PARTS", "estimate_memory", "fitting_settings", "layer_classes",
           "measure_activations", "parse_bytes", "strategy", "weight_bytes"]
