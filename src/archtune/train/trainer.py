"""A thin transformers.Trainer subclass: token-weighted evaluation and text-only batches for
multimodal wrappers, nothing else re-invented.

Text-only training of a multimodal wrapper (Gemma 3/4, Qwen 3.5 MoE, ...): the Trainer hands
`compute_loss` / `prediction_step` the *wrapped* model (DistributedDataParallel, FSDP, a PEFT
model). Anything that reads the model's config or forward signature must look through those
wrappers first: `DistributedDataParallel` has no `.config`, and its `forward(*inputs, **kwargs)`
hides the real signature. `text_only_extras` does that and supplies the "no multimodal token
here" inputs a wrapper's forward takes (all zeros), so a model that requires them in training
mode (transformers' Molmo2 in 5.24; Gemma 3 in transformers 5.0-5.x) gets them, and one that
does not computes exactly the same logits with them.

No family is named here: what a model takes is read from the model itself.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from archtune.train.evaluation import token_weighted_loss

# Forward inputs that mark which tokens are image / video / audio placeholders; 0 = text.
# Supplied as zeros_like(input_ids) for a text-only batch of a multimodal model whose forward
# takes them. (Gemma 3: token_type_ids; Gemma 4, Qwen 3.5, Molmo2: mm_token_type_ids.)
TEXT_ONLY_ZERO_INPUTS: tuple[str, ...] = ("mm_token_type_ids", "token_type_ids")
# Batch keys that carry multimodal data: a batch with any of them is not text-only.
MULTIMODAL_BATCH_KEYS: tuple[str, ...] = (
    "pixel_values", "pixel_values_videos", "input_features", "image_grid_thw", "video_grid_thw",
    "mm_encoder_outputs",
)
# Config attributes of a multimodal wrapper's encoders.
_MM_CONFIG_ATTRS: tuple[str, ...] = ("vision_config", "audio_config")


def unwrap_model(model: Any) -> Any:
    """The model inside DDP / FSDP / DataParallel / DeepSpeed / torch.compile and PEFT wrappers.

    accelerate's `extract_model_from_parallel` (what `Accelerator.unwrap_model` calls) removes the
    distributed containers; a PEFT model's `get_base_model()` then gives the transformers model.
    FSDP2 (`fully_shard`) keeps the module's own class, so it needs no unwrapping.
    """
    from accelerate.utils import extract_model_from_parallel

    for _ in range(8):  # wrappers nest at most a few deep; a bound, not a guess
        inner = extract_model_from_parallel(model)
        get_base = getattr(inner, "get_base_model", None)  # PeftModel (transformers models have none)
        if callable(get_base):
            inner = get_base()
        if inner is model:
            return model
        model = inner
    return model


def is_multimodal_config(config: Any) -> bool:
    """True when a model config declares a vision or audio encoder (a multimodal wrapper)."""
    return any(getattr(config, attr, None) is not None for attr in _MM_CONFIG_ATTRS)


def _forward_parameters(model: Any) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # a builtin or C forward: nothing to read
        return set()


def text_only_extras(model: Any, batch: dict) -> dict[str, torch.Tensor]:
    """Inputs a multimodal wrapper needs for a text-only batch, to merge into the batch.

    `model` may be wrapped (DDP, FSDP, PEFT): its config and forward signature are read through
    `unwrap_model`. Returns {} for a text-only model, a batch that carries multimodal data, a batch
    without input_ids, or inputs the batch already has. Otherwise every name of
    TEXT_ONLY_ZERO_INPUTS the model's forward takes maps to zeros_like(input_ids) (0 = text token).
    """
    input_ids = batch.get("input_ids")
    if not torch.is_tensor(input_ids):
        return {}
    if any(batch.get(key) is not None for key in MULTIMODAL_BATCH_KEYS):
        return {}
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    if config is None or not is_multimodal_config(config):
        return {}
    params = _forward_parameters(base)
    return {name: torch.zeros_like(input_ids) for name in TEXT_ONLY_ZERO_INPUTS
            if name in params and batch.get(name) is None}


# Sharded (FSDP2) checkpoints: torch.distributed.checkpoint directories inside checkpoint-N/.
SHARDED_MODEL_DIR = "model_dcp"
SHARDED_OPTIMIZER_DIR = "optimizer_dcp"
SCHEDULER_FILE = "scheduler.pt"


def _drop_tied_copies(state: dict, model) -> dict:
    """A gathered state dict holds tied weights (lm_head <- embed_tokens) as separate copies; drop
    the tied targets that equal their source, as save_pretrained does for the unsharded model."""
    tied = getattr(model, "_tied_weights_keys", None)
    if not isinstance(tied, dict):
        return state
    out = dict(state)
    for target, source in tied.items():
        for key in [k for k in state if k == target or k.endswith("." + target)]:
            src = key[: len(key) - len(target)] + source
            if src in state and state[src].shape == state[key].shape and torch.equal(state[src], state[key]):
                del out[key]
    return out


class ArchtuneTrainer(Trainer):
    """`fsdp`: FSDP2 settings (archtune.train.distributed.fsdp_settings) or None. With them the model
    is sharded here, right after the Trainer is built, and the Trainer treats it as a model that
    owns its placement and gradient reduction (no DDP wrap; FSDP2 reduce-scatters). Checkpoints
    are then sharded (torch.distributed.checkpoint: model, optimizer) and resumable; the final
    `save_model` gathers the full weights once and rank 0 writes them as safetensors.
    """

    def __init__(self, *args, fsdp: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sharded = fsdp is not None
        if self.sharded:
            from archtune.train.distributed import shard_model

            shard_model(self.model, fsdp)
            self.model_wrapped = self.model
            # transformers' path for models sharded before training: no accelerate DDP/FSDP wrap.
            self.is_distributed_loading_by_transformers = True

    # ------------------------------------------------------------------ sharded checkpoints

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.sharded:
            return super().save_model(output_dir, _internal_call=_internal_call)
        import os

        from archtune.train import distributed

        output_dir = output_dir or self.args.output_dir
        if _internal_call:  # a checkpoint: each rank writes its shards
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            distributed.save_sharded({"model": get_model_state_dict(self.model)}, Path(output_dir) / SHARDED_MODEL_DIR)
            return
        state = distributed.full_state_dict(self.model)  # collective; the full dict on rank 0 only
        if distributed.is_main():
            os.makedirs(output_dir, exist_ok=True)
            state = _drop_tied_copies(state, unwrap_model(self.model))
            self.model.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
        distributed.barrier()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.sharded:
            return super()._save_optimizer_and_scheduler(output_dir)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        from archtune.train import distributed

        optim = get_optimizer_state_dict(self.model, self.optimizer)
        distributed.save_sharded({"optimizer": optim}, Path(output_dir) / SHARDED_OPTIMIZER_DIR)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self.sharded:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        from archtune.train import distributed

        state = {"model": get_model_state_dict(self.model)}
        distributed.load_sharded(state, Path(resume_from_checkpoint) / SHARDED_MODEL_DIR)
        set_model_state_dict(self.model, state["model"])

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self.sharded or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        from archtune.train import distributed

        state = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        distributed.load_sharded(state, Path(checkpoint) / SHARDED_OPTIMIZER_DIR)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_FILE, weights_only=True))

    # ------------------------------------------------------------------ text-only batches

    def _with_text_only_extras(self, model, inputs: dict) -> dict:
        extras = text_only_extras(model, inputs)
        return {**inputs, **extras} if extras else inputs

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        inputs = self._with_text_only_extras(model, inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        inputs = self._with_text_only_extras(model, inputs)
        if ignore_keys is None:
            # Read through the wrappers (the Trainer itself only looks at self.model).
            config = getattr(unwrap_model(model), "config", None)
            ignore_keys = list(getattr(config, "keys_to_ignore_at_inference", ["cache", "past_key_values"]))
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        result = token_weighted_loss(self.model, dataset, self.data_collator,
                                     self.args.per_device_eval_batch_size, self.args.device)
        metrics = {f"{metric_key_prefix}_loss": result["eval_loss"],
                   f"{metric_key_prefix}_tokens": result["eval_tokens"]}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
