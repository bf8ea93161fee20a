"""The one model assembly: every command builds its model here, from the Plan, in one order.

`archtune train` (supervised and preference), `check --probe`, `evaluate`, `generate` and
`merge-lora` all call `assemble_model(plan, tokenizer, use)`. They differ only in `use`: which
weights (the base model, or what the run left in output_dir) and which of the steps that only
training or only the loss needs apply (the `USES` table). The steps themselves, and their order,
are the same for all, so an adapter is evaluated and merged on the base it was trained on:

 1. plugins' pre_model_load; the weights: the base (4-bit for QLoRA) or a full fine-tune's
    output_dir; plugins' post_model_load
 2. the Plan's attention and experts implementation
 3. `normalize_weight_scales` on the base weights (a full fine-tune's output was saved rescaled)
 4. multimodal towers frozen; merge-lora only: the 4-bit base dequantized (4-bit experts through
    4 bits and back), so the adapter merges into the weights training computed with
 5. k-bit preparation of a 4-bit base (norms in fp32), for training and for inference alike,
    so both compute in the same dtypes
 6. adapters: new (or `lora_model_dir`) and trainable, or `unfrozen_parameters`, for training;
    the trained adapter in output_dir for the other commands; plugins' post_adapters
 7. 4-bit experts (`quantize_moe_experts`), after the adapters (see `quantize_moe_experts`); from a
    local safetensors checkpoint read one expert at a time (step 1 loaded zero-byte stand-ins)
 8. training: the Plan's use_cache; training and evaluation: packing patches, chunked loss;
    training: activation offloading last

Under FSDP2 with `fsdp_config.fsdp_cpu_ram_efficient_loading` (`sharded_later`), step 1 builds the
base from zero-byte stand-ins (models/own_shards.py) and every step runs on them; the Trainer
shards the model and each rank then reads only its own rows of the checkpoint (`Assembled.own_shards`).

Why here, in train/: step 8 needs train/'s chunked loss and activation offloading, and
diagnostics/ and cli/ (later in the flow) call it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from archtune.adapters.freeze import freeze_multimodal, unfreeze_only
from archtune.adapters.lora import apply_lora, load_adapter
from archtune.errors import UserError
from archtune.models import quant
from archtune.models.load import apply_weight_scale_rules, load_model, set_attn_implementation, trained_weights_kind
from archtune.plan import Plan
from archtune.plugins import load_plugins, run_hook
from archtune.train import distributed

Use = Literal["train", "evaluate", "generate", "merge", "reference"]


@dataclass(frozen=True)
class Purpose:
    """What a command builds the model for."""

    trained_weights: bool  # output_dir's adapter or full weights when there are any (else the base)
    trains: bool  # trainable adapters, the Plan's use_cache, activation offloading
    computes_loss: bool  # the packing patches and the chunked loss the Plan asks for
    merges: bool = False  # the adapter merged into a plain (dequantized) model


USES: dict[str, Purpose] = {
    "train": Purpose(trained_weights=False, trains=True, computes_loss=True),  # also `check --probe`
    "evaluate": Purpose(trained_weights=True, trains=False, computes_loss=True),
    "generate": Purpose(trained_weights=True, trains=False, computes_loss=False),  # keeps the KV cache
    "merge": Purpose(trained_weights=True, trains=False, computes_loss=False, merges=True),
    "reference": Purpose(trained_weights=False, trains=False, computes_loss=True),  # a preference run's base
}


@dataclass
class Assembled:
    model: object
    weights: str  # "base", "adapter" (output_dir's adapter on the base) or "full" (output_dir's weights)
    own_shards: object = None  # an OwnShards: the base weights are stand-ins, read after sharding


def assemble_model(plan: Plan, tokenizer, use: Use = "train", *, console=None, plugins=None,
                   sharded_later: bool = False) -> Assembled:
    """The model `use` needs, built from the Plan in the module's one order (see its docstring).

    `console` shows the weight-scale table; `plugins` (loaded from the config when None) are the
    run's plugins, whose hooks run at their points. "merge" returns the merged plain model and
    refuses an output_dir without an adapter. `sharded_later`: the caller shards the model with
    FSDP2 and fills its shards from `own_shards` when that is set (the Plan's loading decision).
    """
    purpose = USES[use]
    output_dir = plan.training.output_dir
    weights = (trained_weights_kind(output_dir) if purpose.trained_weights else None) or "base"
    if purpose.merges and weights != "adapter":
        raise UserError.single("output_dir", f"{output_dir} holds no LoRA adapter (adapter_config.json)",
                               "train with adapter: lora first, or point output_dir at the run")
    plugins = load_plugins(plan.config) if plugins is None else plugins  # plugins alone read the raw config
    run_hook(plugins, "pre_model_load", plan.config, plan)
    quantized = weights != "full" and quant.is_quantized(plan)
    four_bit_experts = plan.quantize_moe_experts and weights != "full"
    # 4-bit experts read from the checkpoint one expert at a time, after the adapters (step 7): until
    # then they are zero-byte stand-ins, so nothing before may read them (plugins' hooks, weight-scale rules).
    checkpoint = (quant.checkpoint_experts(plan) if quantized and four_bit_experts and not purpose.merges
                  and not plugins and not plan.model.normalize_weight_scales else None)
    own = _own_shards_checkpoint(plan, console) if sharded_later and weights == "base" and purpose.trains else None
    try:
        model, own_shards = _assemble(plan, tokenizer, purpose, weights, quantized, four_bit_experts, checkpoint,
                                      console, plugins, own)
    finally:
        if checkpoint is not None:
            checkpoint.close()
    return Assembled(model, weights, own_shards)


def _own_shards_checkpoint(plan: Plan, console):
    """The checkpoint each FSDP2 rank reads its own rows from, when the Plan loads that way."""
    if not plan.distributed.fsdp_load_own_shards:
        return None
    found = quant.checkpoint_experts(plan, dense_too=True)
    if found is None and console is not None:
        console.print("[yellow]warning:[/] fsdp_config.fsdp_cpu_ram_efficient_loading: this checkpoint's expert "
                      "tensors are in a layout archtune cannot read by rows; every rank loads the whole model")
    return found


def _assemble(plan: Plan, tokenizer, purpose: Purpose, weights: str, quantized: bool, four_bit_experts: bool,
              checkpoint, console, plugins, own=None):
    """Steps 1-8 of the module docstring; (the model, its OwnShards when `own` built it from stand-ins)."""
    from archtune.models.own_shards import load_without_weights

    output_dir = plan.training.output_dir
    own_shards = None
    if weights == "full":
        model = load_model(plan, tokenizer, path=output_dir)
    elif own is not None:
        model, own_shards = load_without_weights(plan, own)
    else:
        model = quant.load_quantized(plan, tokenizer, experts=checkpoint) if quantized else load_model(plan, tokenizer)
    run_hook(plugins, "post_model_load", model, plan)
    set_attn_implementation(model, plan)
    set_experts_implementation(model, plan)
    if weights != "full":  # a full fine-tune saved its weights already rescaled
        apply_weight_scale_rules(model, plan, console)
    freeze_multimodal(model, plan)
    if quantized and purpose.merges:
        dequantize_base(model, plan, experts=four_bit_experts)
    elif quantized:
        experts = quant4_targets(model, plan) if four_bit_experts else ()
        quant.prepare_for_training(model, plan, keep=experts + quant.frozen_embeddings(model, plan))
    model = attach_adapters(model, plan, weights, purpose)
    run_hook(plugins, "post_adapters", model, plan)
    if purpose.merges:
        return model.merge_and_unload(), None
    if four_bit_experts:
        quantize_moe_experts(model, plan, checkpoint)
    if purpose.trains:
        set_use_cache(model, plan.use_cache)
    if purpose.computes_loss:
        prepare_packing(model, plan)
        prepare_loss(model, plan)
    if purpose.trains and plan.model.activation_offloading:
        apply_activation_offloading(model, plan)
    return model, own_shards


@dataclass(frozen=True)
class MergeReport:
    path: str  # the merged model's directory (loads with transformers alone)
    merged: int  # adapted tensors that received their LoRA delta
    adapted: int  # tensors the adapter changes (one per LoRA A matrix: a linear module's, or an expert tensor's)
    expert: int  # of the merged ones, 3D expert tensors
    streamed: bool  # shard by shard (adapters/merge.py) rather than through the whole model in memory
    why_in_memory: str | None  # when not streamed: what the shard-by-shard merge cannot do here
    stream: object | None = None  # when streamed: the `adapters.merge.StreamPlan` it followed

    def sentence(self) -> str:
        """What export prints too: "merged 120 of 120 adapted tensors, 8 of them expert tensors"."""
        return f"merged {self.merged} of {self.adapted} adapted tensors, {self.expert} of them expert tensors"


class FourBitValues:
    """A 4-bit base's tensors as training computed with them (`adapters.merge.BaseValues`): the
    linear weights the bitsandbytes quantizer stores in 4 bits, and with `quantize_moe_experts` the
    family's expert tensors, each through 4 bits and back exactly as the in-memory merge
    (`dequantize_base`) gives them."""

    def __init__(self, plan: Plan, experts: set[str]):
        self.plan, self.experts = plan, experts
        self.linears = quant.four_bit_weights(plan)

    def rounded(self) -> set[str]:
        return self.linears | self.experts

    def weight(self, name, tensor):
        return quant.through_4bit(tensor, self.plan) if name in self.linears else tensor

    def expert(self, name, tensor):
        from archtune.moe import quant4

        if name not in self.experts:
            return tensor
        device = quant.load_device()
        return quant4.expert_through_4bit(tensor.to(device), tensor.dtype).to("cpu")


def merge_adapter(plan: Plan, tokenizer, out, *, console=None, dtype=None) -> MergeReport:
    """output_dir's LoRA adapter merged into the base and written to `out` (config, weights; not
    the tokenizer). Shard by shard whenever `stream_plan_for` can (LoRA on linears and 3D expert
    tensors, a 4-bit base's tensors through 4 bits and back), holding a few shards at a time;
    otherwise through `assemble_model(plan, tokenizer, "merge")` and save_pretrained. Both give
    the same tensors. `dtype` (default: the run's): the merged tensors' dtype, W + delta computed
    in it from the base values the run loaded (a float32 merge of a bf16 run keeps deltas below
    bf16's resolution)."""
    from archtune.adapters import merge as shard_merge
    from archtune.models.load import torch_dtype

    dtype = dtype or torch_dtype(plan)
    stream, values = stream_plan_for(plan)
    if not isinstance(stream, str):
        base = plan.model.base_model
        result = shard_merge.merge_lora_shards(stream, out, dtype=dtype, values=values, base_dtype=torch_dtype(plan))
        shard_merge.write_merged_config(base, out, dtype=dtype)
        return MergeReport(str(out), result.merged, len(stream.targets), result.expert, True, None, stream)
    merged = assemble_model(plan, tokenizer, "merge", console=console).model
    adapted, expert = adapter_counts(plan)
    merged.to(dtype).save_pretrained(str(out))
    return MergeReport(str(out), adapted, adapted, expert, False, stream)


def adapter_counts(plan: Plan) -> tuple[int, int]:
    """(tensors output_dir's adapter changes, of them 3D expert tensors): one per LoRA A matrix."""
    from pathlib import Path

    from safetensors import safe_open

    from archtune.adapters import merge as shard_merge

    adapter = Path(plan.training.output_dir)
    with safe_open(str(adapter / shard_merge.ADAPTER_WEIGHTS), framework="pt") as f:
        count = sum(1 for k in f.keys() if ".lora_A." in k)
    targets = shard_merge.lora_targets(adapter, _skeleton(plan))
    return count, 0 if isinstance(targets, str) else sum(1 for t in targets.values() if t.experts)


def _skeleton(plan: Plan):
    from archtune.plan.structure import meta_model

    return meta_model(plan.model_config, plan.family.auto_class)


def stream_plan_for(plan: Plan):
    """(`adapters.merge.StreamPlan`, the base values it merges into), or (why `merge_adapter`
    merges this run in memory, None): the base tensors the adapter trained on differ from the
    checkpoint's in a way the stream does not reproduce (weight-scale rules, plugins' hooks), the
    base is not a local safetensors directory, or the adapter holds more than LoRA on linears
    and expert tensors."""
    from pathlib import Path

    from archtune.adapters import merge as shard_merge
    from archtune.models.load import trained_weights_kind
    from archtune.plan.structure import StructureUnavailable

    output_dir = plan.training.output_dir
    if trained_weights_kind(output_dir) != "adapter":
        return f"{output_dir} holds no LoRA adapter", None
    if plan.model.normalize_weight_scales:
        return "normalize_weight_scales rescales base tensors", None
    if load_plugins(plan.config):
        return "plugins may change the model at load", None
    base = plan.model.base_model
    if not Path(str(base)).is_dir():
        return f"{base} is not a local checkpoint directory", None
    try:
        skeleton = _skeleton(plan)
    except StructureUnavailable as exc:
        return f"the model does not build on the meta device ({exc})", None
    values, experts = shard_merge.BaseValues(), ()
    if quant.is_quantized(plan):
        from archtune.moe import quant4

        if plan.quantize_moe_experts:
            experts = tuple(full for _, _, full in quant4.expert_tensors(skeleton, plan.expert_param_names))
        values = FourBitValues(plan, set(experts))
    stream = shard_merge.stream_plan(base, output_dir, skeleton, plan.expert_checkpoint_parts, experts)
    return (stream, None) if isinstance(stream, str) else (stream, values)


def attach_adapters(model, plan: Plan, weights: str, purpose: Purpose):
    """Training: the Plan's LoRA (new, or `lora_model_dir`'s, trainable) or `unfrozen_parameters`
    (else every weight but the towers trains); otherwise output_dir's adapter, if that is what it holds."""
    if purpose.trains:
        if plan.adapter.is_lora:
            return apply_lora(model, plan)
        if plan.model.unfrozen_parameters:
            unfreeze_only(model, list(plan.model.unfrozen_parameters))
        return model
    if weights == "adapter":
        return load_adapter(model, plan.training.output_dir)
    return model


def dequantize_base(model, plan: Plan, *, experts: bool) -> None:
    """merge-lora on a 4-bit base: its linears as plain tensors of the values the 4-bit layers
    computed with, and (4-bit experts) the experts through 4 bits and back, as training saw them;
    before the adapter, so PEFT merges into real tensors."""
    from archtune.moe import quant4

    quant.dequantize(model)
    if experts:
        quant4.quantize_experts(model, plan.expert_param_names, dtype=quant.compute_dtype(plan))
        quant4.dequantize_experts(model)


def quant4_targets(model, plan: Plan) -> tuple:
    """The expert tensors `quantize_moe_experts` will store in 4 bits (the family's expert names)."""
    from archtune.moe import quant4

    return tuple(getattr(m, leaf) for m, leaf, _ in quant4.expert_tensors(model, plan.expert_param_names))


def quantize_moe_experts(model, plan: Plan, checkpoint=None) -> list[str]:
    """The family's expert tensors stored in 4 bits (archtune.moe.quant4), after the adapters;
    `checkpoint` (quant.checkpoint_experts): read from it one expert at a time (the model holds stand-ins).

    After, not before: PEFT nests the wrappers of a module's expert LoRAs in another order when the
    tensors are already parametrized, which would change the adapter's key names; quantized here,
    the saved adapter loads onto the unquantized base and is then quantized the same way."""
    from archtune.moe import quant4

    names = quant4.quantize_experts(model, plan.expert_param_names, dtype=quant.compute_dtype(plan),
                                    checkpoint=checkpoint)
    quant4.adapt_peft(model)  # after the kernels plugin's post_adapters: its PEFT override must not replace this one
    return names


def set_experts_implementation(model, plan: Plan) -> None:
    """The Plan's experts implementation (transformers' eager / grouped_mm / batched_mm, or
    archtune's scattermoe, registered by importing archtune.moe)."""
    name = plan.model.experts_implementation
    if not name or not hasattr(model, "set_experts_implementation"):
        return
    import archtune.moe  # noqa: F401  (registers "scattermoe")

    model.set_experts_implementation(name)


def experts_implementation_in_use(model) -> str | None:
    """What the model's (text) config says its experts run with."""
    config = model.config
    text = getattr(config, "text_config", None) or config
    return getattr(text, "_experts_implementation", None)


def set_use_cache(model, value: bool) -> None:
    """use_cache on the model config and its nested text config (multimodal wrappers)."""
    config = model.config
    for c in (config, getattr(config, "text_config", None)):
        if c is not None and hasattr(c, "use_cache"):
            c.use_cache = value


def prepare_packing(model, plan: Plan) -> None:
    """Packed rows: the family's packing patches (e.g. DeltaNet state reset per document),
    per-document attention, no KV cache. The plan has refused packing that no patch makes exact
    (plan/packing.py); the loaded model is checked again only for what the plan could not see
    (a model it could not build on the meta device)."""
    from archtune.patches.packing import PackingUnsupported, prepare_model_for_packing

    if not plan.packs:
        return
    try:
        prepare_model_for_packing(model, plan.packing_patches,
                                  document_attention=plan.model.document_attention)
    except PackingUnsupported as exc:
        raise UserError.single("sample_packing", f"packing cannot be made exact for this model: {exc}",
                               "set sample_packing: false") from None


def prepare_loss(model, plan: Plan) -> None:
    """`chunked_cross_entropy`: lm_head and the loss in chunks (train/losses.py), for training and
    evaluation. After the adapters: a LoRA on lm_head is part of what each chunk runs."""
    if not plan.model.chunked_cross_entropy:
        return
    from archtune.train.losses import ChunkedCrossEntropy

    ChunkedCrossEntropy.install(model, num_chunks=plan.model.chunked_cross_entropy_num_chunks)


def apply_activation_offloading(model, plan: Plan) -> None:
    """`activation_offloading: true`: each decoder layer checkpointed (non-reentrant), its saved
    inputs kept in CPU memory until backward (the Plan has turned use_cache off)."""
    layers = list(plan.decoder_layer_classes)  # the plan refuses offloading when there are none
    if distributed.apply_activation_offloading(model, layers) == 0:
        raise UserError.single("activation_offloading", f"no module of this model is a {', '.join(layers)}",
                               "set fsdp_config.fsdp_transformer_layer_cls_to_wrap to its decoder layer class")


__all__ = ["USES", "Assembled", "MergeReport", "Purpose", "Use", "apply_activation_offloading", "assemble_model",
           "experts_implementation_in_use", "merge_adapter", "prepare_loss", "prepare_packing", "quantize_moe_experts",
           "set_experts_implementation", "set_use_cache", "stream_plan_for"]
