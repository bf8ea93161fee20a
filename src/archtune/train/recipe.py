"""The training recipe, read top to bottom: plan, data, model, adapters, Trainer, save."""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.trainer_callback import ProgressCallback

from archtune.adapters.freeze import freeze_multimodal
from archtune.adapters.lora import apply_lora, count_params
from archtune.config.schema import Config
from archtune.data import PreparedData, prepare_data
from archtune.data.collate import DataCollator
from archtune.models.load import apply_weight_scale_rules, load_model, load_tokenizer, read_model_config
from archtune.errors import UserError
from archtune.plan import Plan, resolve
from archtune.train.callbacks import LossBar, TrainClock
from archtune.train.outputs import plot_losses, write_summary
from archtune.train.trainer import ArchtuneTrainer


@dataclass
class Setup:
    plan: Plan
    tokenizer: object


def plan_for(cfg: Config, world_size: int = 1) -> Setup:
    """Tokenizer + resolved Plan (raises the Plan's errors as one UserError)."""
    tokenizer = load_tokenizer(cfg)
    plan = resolve(cfg, read_model_config(cfg), world_size=world_size)
    plan.raise_errors()
    return Setup(plan, tokenizer)


def build_model(cfg: Config, plan: Plan, tokenizer, console=None):
    """Base model, multimodal towers frozen (freeze_mm_modules), then the Plan's adapters (LoRA) or
    every other weight trainable (full fine-tune)."""
    model = load_model(cfg, plan, tokenizer)
    apply_weight_scale_rules(model, plan, console)  # base weights, before adapters (normalize_weight_scales)
    freeze_multimodal(model, plan)
    if plan.get("adapter") == "lora":
        model = apply_lora(model, plan)
    _set_use_cache(model, bool(plan.get("use_cache")))
    prepare_packing(model, plan)
    return model


def prepare_packing(model, plan: Plan) -> None:
    """Packed rows: the family's packing patches (e.g. DeltaNet state reset per document),
    per-document attention, no KV cache. A family that cannot be made exact is refused."""
    from archtune.data import eval_packing
    from archtune.families.linear_attention import PackingUnsupported, prepare_model_for_packing

    if not (plan.config.sample_packing or eval_packing(plan.config)):
        return
    try:
        prepare_model_for_packing(model, plan.family.patches)
    except PackingUnsupported as exc:
        raise UserError.single("sample_packing", f"packing cannot be made exact for this model: {exc}",
                               "set sample_packing: false") from None


def _set_use_cache(model, value: bool) -> None:
    """The Plan's use_cache on the model config and its nested text config (multimodal wrappers)."""
    config = model.config
    for c in (config, getattr(config, "text_config", None)):
        if c is not None and hasattr(c, "use_cache"):
            c.use_cache = value


# Settings `archtune check` accepts and plans, whose training path is not built yet.
_NOT_YET_TRAINABLE = {
    "load_in_4bit": "4-bit QLoRA training",
    "load_in_8bit": "8-bit training",
    "fsdp": "FSDP training",
    "activation_offloading": "activation offloading",
}


def _refuse_not_yet_trainable(plan: Plan) -> None:
    for key, what in _NOT_YET_TRAINABLE.items():
        if plan.get(key):
            raise UserError.single(key, f"{what} is planned by `archtune check` but not trainable in this release",
                                   f"remove `{key}` to train, or use `archtune check` to validate the plan")
    if plan.get("experts_implementation") == "scattermoe":
        raise UserError.single("experts_implementation", "the scattermoe experts implementation is not available in this release",
                               "remove experts_implementation / use_scattermoe (transformers' grouped_mm is used)")
    if plan.get("adapter") == "qlora":
        raise UserError.single("adapter", "QLoRA training is not available in this release", "use `adapter: lora`")


def training_arguments(plan: Plan, has_eval: bool):
    from transformers import TrainingArguments

    cfg = plan.config
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else (cfg.warmup_ratio or 0.0)
    report_to = ["wandb"] if cfg.wandb_project and cfg.wandb_mode != "disabled" else []
    if cfg.wandb_project:
        os.environ.setdefault("WANDB_PROJECT", cfg.wandb_project)
        if cfg.wandb_mode:
            os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps if cfg.max_steps else -1,
        learning_rate=cfg.learning_rate,
        optim=cfg.optimizer,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.bf16 is True,
        fp16=cfg.fp16,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if (cfg.eval_steps and has_eval) else "no",
        eval_steps=cfg.eval_steps,
        activation_checkpointing=bool(plan.get("gradient_checkpointing")),
        activation_checkpointing_kwargs=plan.section("gradient_checkpointing_kwargs") or None,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        report_to=report_to,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=plan.get("ddp_find_unused_parameters"),
    )


def _callbacks(cfg: Config, clock: TrainClock) -> list:
    callbacks = [clock]
    if cfg.use_tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(Path(cfg.output_dir) / "runs"))))
    return callbacks


def train(cfg: Config, *, console=None) -> dict:
    """Run a fine-tune; returns the train summary (also written to output_dir)."""
    setup = plan_for(cfg)
    plan, tokenizer = setup.plan, setup.tokenizer
    _refuse_not_yet_trainable(plan)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for warning in plan.warnings:
        _say(console, f"[yellow]warning:[/] {warning}")

    data: PreparedData = prepare_data(cfg, tokenizer)
    model = build_model(cfg, plan, tokenizer, console=console)
    trainable, total = count_params(model)

    clock = TrainClock()
    trainer = ArchtuneTrainer(
        model=model,
        args=training_arguments(plan, has_eval=data.eval is not None),
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=DataCollator(tokenizer),
        processing_class=tokenizer,
        callbacks=_callbacks(cfg, clock),
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossBar())
    eval_initial = trainer.evaluate()["eval_loss"] if data.eval is not None else None
    resume = cfg.resume_from_checkpoint
    if resume == "auto":
        resume = True
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        # Nothing lost: keep what was trained so far, then stop.
        trainer.save_model(str(out / "interrupted"))
        _say(console, f"[red]interrupted[/]: weights so far saved to {out / 'interrupted'}")
        raise
    eval_final = trainer.evaluate()["eval_loss"] if data.eval is not None else None

    _set_use_cache(model, True)  # the saved config is for inference: the cache was off only for training
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    train_tokens = int(trainer.state.num_input_tokens_seen)
    summary = {
        "steps": int(trainer.state.global_step),
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "train_loss_mean": float(result.training_loss),
        "eval_loss_initial": eval_initial,
        "eval_loss_final": eval_final,
        "train_tokens": train_tokens,
        "train_seconds": round(clock.seconds, 3),
        "tokens_per_second": train_tokens / clock.seconds if clock.seconds > 0 else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "trainable_params": trainable,
        "total_params": total,
        "world_size": plan.world_size,
        "family": plan.family.name,
        "model_type": plan.model_type,
        "adapter": plan.get("adapter"),
        "data": data.stats,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_summary(out / "train_summary.json", summary)
    plot_losses(history, out / "loss.png", f"{cfg.base_model} ({plan.family.name}, {plan.get('adapter') or 'full'})")
    return summary


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text)
