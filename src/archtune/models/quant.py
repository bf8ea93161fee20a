"""QLoRA: a bitsandbytes 4-bit base (NF4 by default), k-bit preparation, LoRA on top.

- Model directories and hub ids load through `from_pretrained(..., quantization_config=
  BitsAndBytesConfig(load_in_4bit=True, ...))`. transformers' bnb quantizer replaces the
  `nn.Linear` layers only: stacked 3D expert tensors (`experts.gate_up_proj`, ...) stay
  unquantized, as do the modules in `llm_int8_skip_modules` (lm_head by default).
- `tiny:NAME` models are built in memory: they are saved to a temporary directory and reloaded
  the same way, so they are quantized exactly like a real checkpoint.
- bitsandbytes' CPU backend runs Linear4bit forward and backward (tests/unit/test_quant.py trains
  on it): QLoRA trains on a CPU machine too.

`archtune merge-lora` on a QLoRA run merges into the weights the adapter was trained against: each
4-bit weight dequantized (the checkpoint's value through 4 bits and back), not the original
checkpoint's, so the merged model computes what the trained one did. Shard by shard
(`four_bit_weights` names the tensors, `through_4bit` rounds one), or in memory (train/assembly.py,
use "merge": loaded in 4 bit, `dequantize`d into plain `nn.Linear` layers, the adapter merged).
"""
from __future__ import annotations

import tempfile
from typing import Any

import torch

from archtune.errors import UserError
from archtune.plan import Plan

# bitsandbytes' 4-bit storage (archtune.moe.quant4 stores 4-bit experts the same way).
BLOCKSIZE = 64  # elements per absmax (bitsandbytes' default for 4 bit)
NESTED_BLOCKSIZE = 256  # absmaxes per fp32 scale (bitsandbytes' double quantization)
# Bytes per parameter of a Linear4bit weight: two weights per byte plus one absmax per block of 64;
# with double quantization that absmax is itself 8 bit (plus an fp32 scale per 256 blocks).
NF4_BYTES_PER_PARAM: dict[str, float] = {
    "nf4": 0.5 + 1 / BLOCKSIZE + 4 / (BLOCKSIZE * NESTED_BLOCKSIZE),
    "nf4-no-double-quant": 0.5 + 4 / BLOCKSIZE,
}


def is_quantized(plan: Plan) -> bool:
    """True when the Plan trains a 4-bit base (`load_in_4bit`, or `adapter: qlora`)."""
    return plan.model.four_bit_base


def compute_dtype(plan: Plan) -> torch.dtype:
    """The dtype 4-bit weights are dequantized to (the run's dtype, as the plan resolved bf16)."""
    from archtune.models.load import torch_dtype

    return torch_dtype(plan)



def bnb_config(plan: Plan):
    """transformers' BitsAndBytesConfig for the Plan: 4-bit NF4, double quantization, compute in
    the run's dtype; lm_head stays in full precision."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError.single("load_in_4bit", "4-bit loading needs bitsandbytes, which is not installed",
                               "pip install bitsandbytes (its CPU backend works without a GPU)") from None
    from transformers import BitsAndBytesConfig

    kwargs = dict(
        load_in_4bit=True,
        bnb_4bit_quant_type=plan.model.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=plan.model.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(plan),
        llm_int8_skip_modules=["lm_head"],
    )
    kwargs.update(plan.model.bnb_config_kwargs)  # Axolotl's bnb_config_kwargs: BitsAndBytesConfig's own names
    try:
        return BitsAndBytesConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError.single("bnb_config_kwargs", f"BitsAndBytesConfig rejects these arguments: {exc}",
                               "use BitsAndBytesConfig's argument names, e.g. bnb_4bit_use_double_quant: true") from None


def checkpoint_experts(plan: Plan, *, dense_too: bool = False):
    """The base checkpoint's expert tensors as a `CheckpointExperts` (models/checkpoint_experts.py),
    to be read one expert at a time; None when they load whole (a hub id, a tiny model, another head
    than the family's, a layout it does not know). `dense_too`: a model without expert tensors gets
    one too (with none), for reading its other tensors slice by slice."""
    from archtune.models.checkpoint_experts import CheckpointExperts, weight_map
    from archtune.models.load import readable_checkpoint

    base = readable_checkpoint(plan)
    if base is None:
        return None
    structure = plan.structure()
    params = {n: structure.parameters[n] for t in plan.expert_param_names for n in structure.parameters_matching(t)}
    if not params:
        files = weight_map(base) if dense_too else None
        return CheckpointExperts(base, files, {}) if files is not None else None
    found = CheckpointExperts.find(base, params, plan.expert_checkpoint_parts)
    return found if isinstance(found, CheckpointExperts) else None


def device_map() -> dict:
    """Where the base loads (from_pretrained's device_map): `load_device()`."""
    return {"": load_device()}


def load_device():
    """Where `load_quantized` puts (and so quantizes) the 4-bit weights: this rank's GPU, else the CPU."""
    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"


def load_quantized(plan: Plan, tokenizer, *, path: str | None = None, experts=None):
    """The base model with its linear layers in bitsandbytes 4 bit (on CPU, or this rank's GPU).

    `experts` (`checkpoint_experts(plan)`): the expert tensors are zero-byte stand-ins of their
    shape, filled in 4 bits from the checkpoint by `quantize_moe_experts`; the rest loads as usual."""
    from archtune.models.load import auto_model_class, check_loading_info, pretrained_kwargs, tiny_name

    base = plan.model.base_model
    name = tiny_name(base) if path is None else None
    kwargs = dict(quantization_config=bnb_config(plan), dtype=compute_dtype(plan), device_map=device_map(),
                  output_loading_info=True)
    if experts is not None and path is None:
        return _load_with_stand_ins(plan, experts, kwargs)
    if name is not None:
        from archtune.models.load import load_model

        full = load_model(plan, tokenizer)
        with tempfile.TemporaryDirectory(prefix="archtune-qlora-") as tmp:
            # Every process writes its own temporary copy: transformers' save_pretrained writes on rank 0
            # only once torch.distributed is initialised (DDP / FSDP2 runs), which would leave this one empty.
            full.should_save_on_this_rank = lambda is_main_process: True
            full.save_pretrained(tmp, safe_serialization=True)
            del full
            model, info = auto_model_class(plan).from_pretrained(tmp, **kwargs)
            check_loading_info(info, base)
        model.config._name_or_path = base  # not the temporary directory (adapter_config names it)
        _keep_training_layout(model)
        return model
    source = str(path or base)
    if path is None:
        kwargs.update(pretrained_kwargs(plan))
    model, info = auto_model_class(plan).from_pretrained(source, trust_remote_code=plan.model.trust_remote_code,
                                                    revision=plan.model.revision, **kwargs)
    check_loading_info(info, source)
    _keep_training_layout(model)
    return model


def _load_with_stand_ins(plan: Plan, experts, kwargs: dict):
    """`from_pretrained` from the checkpoint's tensors (lazy slices) with stand-ins for the experts."""
    from archtune.models.load import load_from_state_dict

    device = next(iter(kwargs["device_map"].values()))
    state, handles = experts.state_dict(torch.device(device), kwargs["dtype"])
    try:
        model = load_from_state_dict(plan, state, kwargs)
    finally:
        del state
        for handle in handles:
            handle.__exit__(None, None, None)
    _keep_training_layout(model)
    return model


def _keep_training_layout(model) -> None:
    """bitsandbytes' CPU backend repacks a Linear4bit's weight for its AVX512-bf16 inference kernel
    on the first no-grad forward (an evaluation), and asserts out_features % 32 == 0 while doing it
    (tiny models fail). Training alternates with evaluation, so keep the one layout that trains."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def four_bit_weights(plan: Plan) -> set[str]:
    """The weight names `load_quantized` stores in 4 bits, found without loading: transformers' own
    bitsandbytes quantizer applied to the model built on the meta device (`lm_head`, the modules it
    keeps in full precision and `llm_int8_skip_modules` stay as they are)."""
    import bitsandbytes as bnb
    from transformers.quantizers import AutoHfQuantizer

    from archtune.plan.structure import meta_model

    model = meta_model(plan.model_config, plan.family.auto_class)
    quantizer = AutoHfQuantizer.from_config(bnb_config(plan), pre_quantized=False)
    quantizer.preprocess_model(model, device_map=device_map(), dtype=compute_dtype(plan))
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def through_4bit(weight: torch.Tensor, plan: Plan) -> torch.Tensor:
    """A linear weight (in the compute dtype) as its 4-bit layer computes with it: quantized as
    `load_quantized` quantizes it (bitsandbytes' Params4bit with the Plan's settings) and
    dequantized as `dequantize` does, on this process's device (where `load_quantized` puts it)."""
    import bitsandbytes.functional as F

    config = bnb_config(plan)
    q, state = F.quantize_4bit(weight.to(load_device()), blocksize=BLOCKSIZE,
                               compress_statistics=config.bnb_4bit_use_double_quant,
                               quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage)
    return F.dequantize_4bit(q, state).to(device="cpu", dtype=weight.dtype)


def quantized_modules(model) -> list[str]:
    """Names of the bitsandbytes 4-bit linear layers of `model`."""
    import bitsandbytes as bnb

    return [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def frozen_embeddings(model, plan: Plan) -> tuple[torch.Tensor, ...]:
    """The input / output embedding weights of a 16-bit run when they stay frozen.

    PEFT's k-bit preparation casts them to fp32 with the norms, which doubles the largest
    unquantized tensors (Gemma 4's 262k x 2816 table: 1.5 GB more) and buys no precision: a lookup
    does no arithmetic, and under bf16/fp16 autocast the output head's matmul runs in 16 bits anyway.
    With `lora_modules_to_save` they are all upcast as before (PEFT's trained copies start from them).
    """
    if compute_dtype(plan) == torch.float32 or plan.adapter.modules_to_save:
        return ()
    out = []
    for get in (model.get_input_embeddings, model.get_output_embeddings):
        module = get()
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype in (torch.float16, torch.bfloat16) \
                and all(weight is not w for w in out):
            out.append(weight)
    return tuple(out)


def prepare_for_training(model, plan: Plan, keep: tuple[torch.Tensor, ...] = ()) -> None:
    """PEFT's k-bit preparation: base frozen, norms and other non-quantized weights in fp32, input
    gradients enabled (for checkpointing through a frozen base). Checkpointing itself is left to
    the Trainer (the Plan's gradient_checkpointing and its non-reentrant kwargs).

    `keep`: parameters left in their dtype, e.g. expert tensors about to be stored in 4 bits
    (`quantize_moe_experts`): PEFT's upcast would first double them (bf16 -> fp32).
    """
    from peft import prepare_model_for_kbit_training

    kept = [(p, p.data) for p in keep]
    for p, _ in kept:  # an empty stand-in during PEFT's upcast (it casts .data of bf16/fp16 params)
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    try:
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    finally:
        for p, data in kept:
            p.data = data
    if plan.training.gradient_checkpointing:
        model.enable_input_require_grads()


def dequantize(model) -> int:
    """Replace every bitsandbytes Linear4bit of `model` (a PEFT model's base too) by an nn.Linear
    holding its dequantized weight, in place. Returns the number of layers replaced."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = F.dequantize_4bit(child.weight.data, child.weight.quant_state)
            dtype = child.compute_dtype or torch.float32
            linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                     device=weight.device, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(weight.to(dtype))
                if child.bias is not None:
                    linear.bias.copy_(child.bias.data.to(dtype))
            linear.requires_grad_(False)
            setattr(module, child_name, linear)
            count += 1
    config = getattr(model, "config", None)
    if config is not None:
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
    # What transformers reads to refuse casting a bitsandbytes model (`.to(dtype)`): a plain model now.
    for attr in ("is_quantized", "is_loaded_in_4bit", "hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr in ("hf_quantizer", "quantization_method") else False)
            except AttributeError:
                pass
    return count
