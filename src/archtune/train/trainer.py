"""A thin transformers.Trainer subclass: token-weighted evaluation, text-only batches for
multimodal wrappers (archtune.patches.text_only), and the crash-safety mixin every archtune
trainer shares (CrashSafeTrainer: checkpoints written under a temporary name and renamed when
complete, train/checkpoints.py; what the non-finite guard needs to see, train/guards.py); nothing
else re-invented."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import Trainer

from archtune.patches.fsdp_accumulation import defer_gradient_reduction
from archtune.patches.text_only import text_only_extras, unwrap_model
from archtune.train import checkpoints
from archtune.train.evaluation import token_weighted_loss
from archtune.train.guards import NonFiniteWatch
from archtune.train.losses import ChunkedCrossEntropy
from archtune.train.progress import COMPUTING, LOADING, SAVING, Progress

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


class CrashSafeTrainer:
    """What every archtune run's trainer adds to transformers' Trainer (or a TRL trainer built on it)
    for crash safety, mixed in before it: checkpoints written under output_dir/.staging and renamed
    when complete (train/checkpoints.py), and each step's losses and gradient norm shown to the
    non-finite guard (train/guards.py) before the optimizer applies the step.

    Each phase of a step is reported to `progress` (train/progress.py: no silent hangs), which
    the run's guards set while training (None: nothing reported).

    `nonfinite`: the run's NonFiniteWatch (None: nothing is watched)."""

    def __init__(self, *args, nonfinite: NonFiniteWatch | None = None, **kwargs):
        self.nonfinite = nonfinite
        self.progress: Progress | None = None
        self._staging = False
        super().__init__(*args, **kwargs)

    def _enter(self, phase: str | None, step: int) -> None:
        if self.progress is not None:
            self.progress.enter(phase, step)

    # ------------------------------------------------------------------ progress of each step

    def get_batch_samples(self, *args, **kwargs):
        self._enter(LOADING, self.state.global_step + 1)
        return super().get_batch_samples(*args, **kwargs)

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        # Logging and evaluation between steps have no deadline of their own (see progress.py).
        self._enter(None, self.state.global_step)
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    # ------------------------------------------------------------------ complete checkpoints only

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return str(checkpoints.staging_dir(Path(run_dir))) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer writes checkpoint-N into output_dir/.staging/; once every rank's files are
        there, rank 0 renames it into output_dir and applies save_total_limit (never deleting the
        newest complete checkpoint). A kill before the rename leaves no checkpoint-N at all."""
        from archtune.train import distributed

        out = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        self._enter(SAVING, self.state.global_step)
        if self.args.should_save:
            checkpoints.clear_staging(out, name)  # what a killed save left
        distributed.barrier()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        distributed.barrier()  # every rank has written its part
        if self.args.should_save:
            checkpoints.publish_checkpoint(checkpoints.staging_dir(out) / name, out)
            checkpoints.rotate(out, self.args.save_total_limit)
        distributed.barrier()
        self._enter(None, self.state.global_step)

    # ------------------------------------------------------------------ non-finite steps

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._enter(COMPUTING, self.state.global_step + 1)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.nonfinite is not None:
            self.nonfinite.saw_loss(loss, inputs)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # The global gradient norm of the step (the Trainer's own, before the optimizer steps).
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.nonfinite is not None:
            self.nonfinite.saw_grad_norm(grad_norm)
        return grad_norm


class ArchtuneTrainer(CrashSafeTrainer, Trainer):
    """`fsdp`: FSDP2 settings (archtune.train.distributed.fsdp_settings) or None. With them the model
    is sharded here, right after the Trainer is built, and the Trainer treats it as a model that
    owns its placement and gradient reduction (no DDP wrap; FSDP2 reduce-scatters). Checkpoints
    are then sharded (torch.distributed.checkpoint: model, optimizer) and resumable; the final
    `save_model` gathers the full weights once and rank 0 writes them as safetensors.
    `own_shards`: the model's base weights are stand-ins that each rank fills with its own rows
    after sharding (models/own_shards.py).
    """

    def __init__(self, *args, fsdp: dict | None = None, own_shards=None, **kwargs):
        self.own_shards = own_shards
        super().__init__(*args, **kwargs)
        self.sharded = fsdp is not None
        if self.sharded:
            from archtune.train.distributed import shard_model

            shard_model(self.model, fsdp, own_shards)
            self.model_wrapped = self.model
            # transformers' path for models sharded before training: no accelerate DDP/FSDP wrap.
            self.is_distributed_loading_by_transformers = True

    def _move_model_to_device(self, model, device) -> None:
        # A model built from stand-ins is on its device already; moving it would copy each
        # stand-in into a full tensor (what loading only this rank's shards avoids).
        if self.own_shards is None:
            super()._move_model_to_device(model, device)

    def _defer_fsdp_gradient_reduction(self):
        # The Trainer enters this on all but the last micro-batch of a model sharded before
        # training; its own version reads a config only transformers' loader sets.
        return defer_gradient_reduction(self.model)

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
        # The chunked loss (train/losses.py) needs the labels before lm_head runs; the model then
        # normalizes its sum in its own loss hook, as it would the stock loss.
        chunked = ChunkedCrossEntropy.of(model)
        labels = inputs.get("labels") if self.label_smoother is None and self.compute_loss_func is None else None
        with chunked.labels(labels) if chunked is not None else contextlib.nullcontext():
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
