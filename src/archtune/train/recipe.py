"""The training recipe, read top to bottom: plan, data, model, adapters, Trainer, save."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.trainer_callback import ProgressCallback

from archtune.adapters.lora import count_params
from archtune.config.schema import Config
from archtune.data import PreparedData, prepare_data
from archtune.data.collate import DataCollator
from archtune.models.load import load_tokenizer, resolve_plan, set_chat_template
from archtune.errors import UserError
from archtune.plan import Plan
from archtune.train import distributed
from archtune.moe.quant4 import model_bytes
from archtune.moe.routing_stats import RoutingStats
from archtune.plugins import load_plugins, run_hook
from archtune.train.callbacks import LossBar, TrainClock
from archtune.train import checkpoints
from archtune.train.assembly import assemble_model, experts_implementation_in_use, set_use_cache
from archtune.train.guards import RunGuards, batch_rows
from archtune.train.outputs import (identity_fields, params_fields, peak_rss_mb, plot_losses, processes_fields,
                                    progress_fields, set_aside_previous_weights, write_summary)
from archtune.train.run_record import refuse_reuse, resume_checkpoint, write_run_record
from archtune.train.trainer import ArchtuneTrainer


@dataclass
class Setup:
    plan: Plan
    tokenizer: object
    _media: object = None

    @property
    def media(self):
        """How this run reads rows with images (data.MediaSetup); the processor is loaded once."""
        if self._media is None:
            self._media = media_setup(self.plan)
        return self._media


def plan_for(cfg: Config, world_size: int = 1) -> Setup:
    """Tokenizer + the Plan `archtune check` resolves (raises the Plan's errors as one UserError)."""
    tokenizer = load_tokenizer(cfg)
    plan = resolve_plan(cfg, world_size=world_size)
    plan.raise_errors()
    return Setup(plan, set_chat_template(tokenizer, plan))


# Why packed rows never hold images or audio (the packer keeps token ids and labels only; exact
# packing would also need each document's media inputs and image attention kept per document).
PACKING_IMAGES_REFUSED = ("packed rows keep token ids and labels only, and per-document image and audio inputs "
                          "are not built for packed batches")


def media_setup(plan: Plan):
    """The model's processor for rows with images (data.MediaSetup), or why such rows are refused."""
    from archtune.data import MediaSetup
    from archtune.data.media import ImageSettings, MediaProcessor
    from archtune.models.load import load_processor

    processor, refusal = load_processor(plan)
    if processor is None:
        return MediaSetup(refusal=refusal, packing_refusal=PACKING_IMAGES_REFUSED)
    media = MediaProcessor(processor, ImageSettings(plan.data.image_size, plan.data.image_resize_algorithm),
                           modalities=plan.family.modalities_of(plan.model_config))
    return MediaSetup(processor=media, packing_refusal=PACKING_IMAGES_REFUSED)


def data_collator(setup: Setup) -> DataCollator:
    """Batches as the plan pads them: to the longest row, a multiple of pad_to_multiple_of, or
    sequence_len (pad_to_sequence_len: `pad_to_length`). Padding carries label -100, so the loss is the same."""
    return DataCollator(setup.tokenizer, drop_attention_mask=setup.plan.drop_attention_mask, media=setup.media.processor,
                        **padding(setup.plan))


def padding(plan: Plan) -> dict:
    """The collator's padding keys, as the plan decided them."""
    return {"pad_to_multiple_of": plan.training.pad_to_multiple_of, "pad_to_length": plan.training.pad_to_length}


def training_arguments(plan: Plan, has_eval: bool, steps_per_epoch: int | None = None):
    """transformers TrainingArguments from the Plan (`plan.training`). `steps_per_epoch` (optimizer
    steps) turns saves_per_epoch / evals_per_epoch into step intervals."""
    from transformers import TrainingArguments

    t = plan.training
    _logger_environment(plan)
    save_strategy, save_steps = t.save_interval(steps_per_epoch)
    eval_strategy, eval_steps = t.eval_interval(steps_per_epoch)
    optional = {k: v for k, v in {
        "adam_beta1": t.adam_beta1, "adam_beta2": t.adam_beta2, "adam_epsilon": t.adam_epsilon,
        "optim_args": t.optim_args, "dataloader_prefetch_factor": t.dataloader_prefetch_factor,
        "torch_compile_backend": t.torch_compile_backend, "torch_compile_mode": t.torch_compile_mode,
    }.items() if v is not None}
    return TrainingArguments(
        output_dir=t.output_dir,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.eval_micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        optim=t.optimizer,
        lr_scheduler_type=t.lr_scheduler,
        lr_scheduler_kwargs=t.lr_scheduler_kwargs,
        warmup_steps=t.warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=t.bf16,
        fp16=t.fp16,
        tf32=t.tf32,
        torch_compile=t.torch_compile,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy=save_strategy,
        save_steps=save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy=eval_strategy if has_eval else "no",
        eval_steps=eval_steps,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs=t.gradient_checkpointing_kwargs,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=t.remove_unused_columns,
        report_to=list(t.report_to),
        run_name=t.run_name,
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=t.dataloader_pin_memory,
        dataloader_drop_last=t.dataloader_drop_last,
        ddp_find_unused_parameters=t.ddp_find_unused_parameters,
        ddp_timeout=t.ddp_timeout,
        # Without a GPU, accelerate runs several processes only as "MULTI_CPU" (gloo), which use_cpu selects.
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=distributed.backend() if distributed.is_distributed() else None,
        **optional,
    )


_WANDB_ENV = {"wandb_project": "WANDB_PROJECT", "wandb_mode": "WANDB_MODE", "wandb_entity": "WANDB_ENTITY",
              "wandb_run_id": "WANDB_RUN_ID", "wandb_watch": "WANDB_WATCH", "wandb_log_model": "WANDB_LOG_MODEL",
              "mlflow_tracking_uri": "MLFLOW_TRACKING_URI", "mlflow_experiment_name": "MLFLOW_EXPERIMENT_NAME",
              "mlflow_run_name": "MLFLOW_RUN_NAME"}


def _logger_environment(plan: Plan) -> None:
    """transformers' WandbCallback / MLflowCallback read their settings from the environment."""
    for key, env in _WANDB_ENV.items():
        value = plan.decided(key)
        if value is not None:
            os.environ[env] = str(value)
    if plan.decided("wandb_run_id"):
        os.environ.setdefault("WANDB_RESUME", "allow")
    if plan.decided("hf_mlflow_log_artifacts") is not None:
        os.environ["HF_MLFLOW_LOG_ARTIFACTS"] = str(bool(plan.decided("hf_mlflow_log_artifacts"))).lower()


def _callbacks(plan: Plan, clock: TrainClock) -> list:
    callbacks = [clock]
    if plan.training.use_tensorboard and distributed.is_main():
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(Path(plan.training.output_dir) / "runs"))))
    return callbacks


def run_guards(plan: Plan, console) -> RunGuards:
    """The crash-safety guards of a run (train/guards.py), supervised or preference."""
    return RunGuards(plan.training.on_nonfinite, say=(lambda text: _say(console, text)) if console is not None else None)


def run_training(trainer, guards: RunGuards, plan: Plan, resume, console, name_rows):
    """trainer.train() under the run's guards, supervised or preference: resumed from `resume`, a
    non-finite step or a signal ends it with one message (RunStopped), DDP's unused-parameter
    failure becomes a user error naming the setting, skipped steps are reported."""
    out = Path(plan.training.output_dir)
    if resume is not None:
        _say(console, f"resuming from {resume.name} (in {out})")
    try:
        result = guards.train(trainer, resume, out, name_rows)
    except RuntimeError as exc:
        raise _ddp_error(exc, plan) from exc
    if (warning := guards.skipped_warning()) is not None:
        _say(console, f"[yellow]warning:[/] {warning}")
    return result


def train(cfg: Config, *, console=None) -> dict:
    """Run a fine-tune; returns the train summary (also written to output_dir).

    Under torchrun (WORLD_SIZE > 1) this process is one rank: the Plan is resolved for the real
    world size, the process joins the process group (gloo on CPU, NCCL on GPUs; collectives wait
    ddp_timeout), each node's first process preprocesses first, and only rank 0 prints and writes
    outputs. The process group is destroyed before returning.
    """
    setup = plan_for(cfg, world_size=distributed.world_size())
    created = distributed.init(timeout_seconds=setup.plan.training.ddp_timeout)
    ok = False
    try:
        summary = _train(cfg, setup, console if distributed.is_main() else None)
        ok = True
        return summary
    finally:
        if created:
            distributed.shutdown(synchronize=ok)


def _train(cfg: Config, setup: Setup, console) -> dict:
    # 1. Everything is checked before output_dir is touched: config, plan, resume, data, model.
    plan, tokenizer = setup.plan, setup.tokenizer
    main = distributed.is_main()
    out = Path(plan.training.output_dir)
    resume = resume_checkpoint(plan.training, out)
    refuse_reuse(plan.training, out, resume)
    for line in plan.info:
        _say(console, f"[blue]info:[/] {line}")
    for warning in plan.warnings:
        _say(console, f"[yellow]warning:[/] {warning}")
    if plan.get("rl_trainer"):  # rl / reward_model: TRL's preference trainers (train/preference.py)
        from archtune.train.preference import train_preference

        return train_preference(cfg, plan, tokenizer, console, resume)

    # Each node's first process tokenizes into that node's cache, the node's other processes read it.
    with distributed.local_main_first():
        data: PreparedData = prepare_data(plan, tokenizer, progress=main, media=setup.media)
    distributed.same_on_every_rank(data_identity(data), "datasets", "training data",
                                   "give every node the same data files (and tokenizer) as node 0")
    plugins = load_plugins(cfg)
    rss_before_model_mb = _rss_mb()  # what the process holds before the model: the baseline of its training memory
    model = assemble_model(plan, tokenizer, "train", console=console, plugins=plugins).model
    trainable, total = count_params(model)
    weight_bytes = model_bytes(model, adapters=False)  # the loaded model, before any sharding
    routing = RoutingStats.attach(model)  # MoE models: per-layer expert load (no experts: no hooks)

    # 2. Only now: output_dir is claimed (an earlier run set aside) and the run record written.
    if main:
        _claim_output_dir(cfg, plan, out, resume, data, console)
    distributed.barrier()

    clock = TrainClock()
    guards = run_guards(plan, console)
    trainer = ArchtuneTrainer(
        model=model,
        args=training_arguments(plan, has_eval=data.eval is not None, steps_per_epoch=_steps_per_epoch(plan, data.train)),
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data_collator(setup),
        processing_class=tokenizer,
        callbacks=_callbacks(plan, clock) + guards.callbacks() + run_hook(plugins, "callbacks", plan),
        fsdp=distributed.fsdp_settings(plan),
        nonfinite=guards.watch,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossBar())
    if routing.layers:
        routing.install(trainer)
    eval_initial = trainer.evaluate()["eval_loss"] if data.eval is not None else None
    pad_id = getattr(trainer.data_collator, "pad_token_id", None)
    result = run_training(trainer, guards, plan, resume, console,
                          name_rows=lambda batches: batch_rows(batches, data.train, pad_id))
    eval_final = trainer.evaluate()["eval_loss"] if data.eval is not None else None

    # 3. Final outputs: written under output_dir/.staging, renamed into place, the summary last.
    set_use_cache(model, True)  # the saved config is for inference: the cache was off only for training
    staged = checkpoints.clear_staging(out, "final") if main else checkpoints.staging_dir(out) / "final"
    distributed.barrier()
    trainer.save_model(str(staged))  # written once, on rank 0 (FSDP: shards gathered once, here)
    history = trainer.state.log_history  # train() starts a fresh state: the step-0 evaluation is added back
    if eval_initial is not None:
        history = [{"step": 0, "eval_loss": eval_initial}] + [h for h in history if h.get("step") != 0 or "eval_loss" not in h]
    train_losses = [h["loss"] for h in history if "loss" in h]
    train_tokens = int(trainer.state.num_input_tokens_seen)  # summed over all processes by the Trainer
    summary = {
        **progress_fields(trainer.state.global_step, train_losses, result.training_loss, eval_initial, eval_final,
                          train_tokens, clock.seconds),
        "experts_load": routing.summary() if routing.layers else None,
        "experts_implementation": experts_implementation_in_use(model) if routing.layers else None,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_model_mb": round(rss_before_model_mb, 1),
        **params_fields(trainable, total, weight_bytes),
        "quantize_moe_experts": bool(plan.quantize_moe_experts),
        **processes_fields(plan, _strategy(plan)),
        "chunked_cross_entropy": _chunked_loss_installed(trainer.model),
        "sharded_params": distributed.sharded_parameters(trainer.model),
        **identity_fields(plan, data.stats, guards.watch.skipped, resume),
    }
    if main:
        tokenizer.save_pretrained(str(staged))
        plot_losses(history, staged / "loss.png", f"{plan.training.base_model} ({plan.family.name}, {plan.get('adapter') or 'full'})")
        checkpoints.publish_outputs(staged, out)
        write_summary(out / checkpoints.SUMMARY, summary)  # last: its presence marks a finished run
    return summary


def data_identity(data: PreparedData) -> str:
    """What must be equal on every node: the cache key (file contents, tokenizer, the keys that
    shape tokens) and the rows and tokens prepared."""
    stats = data.stats
    return (f"cache key {Path(str(stats.get('cache_dir'))).name[:12]}, {stats.get('train_rows')} rows, "
            f"{stats.get('train_tokens')} tokens")


def _claim_output_dir(cfg: Config, plan: Plan, out: Path, resume, data: PreparedData, console) -> None:
    """Rank 0, after every check passed: set an earlier run's outputs aside (a fresh start) and
    write the run record."""
    out.mkdir(parents=True, exist_ok=True)
    if resume is None and (moved := set_aside_previous_weights(out, checkpoints=plan.training.overwrite_output_dir)):
        _say(console, f"an earlier run's outputs in {out} were moved to {moved}")
    cache_dir = data.stats.get("cache_dir")
    write_run_record(out, config=cfg.model_dump(mode="json", exclude_unset=True), plan=plan.to_json(),
                     cache_key=Path(cache_dir).name if cache_dir else None, world_size=plan.world_size,
                     resumed_from=resume)


def _rss_mb() -> float:
    """This process's resident memory now (MiB); 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _chunked_loss_installed(model) -> bool:
    from archtune.train.losses import ChunkedCrossEntropy

    return ChunkedCrossEntropy.of(model) is not None


def _steps_per_epoch(plan: Plan, train_rows) -> int:
    """Optimizer steps in one epoch over the (packed) training rows, over all processes."""
    t = plan.training
    per_step = t.micro_batch_size * t.gradient_accumulation_steps * distributed.world_size()
    return max(1, -(-len(train_rows) // per_step))


def _strategy(plan: Plan) -> str:
    if plan.world_size == 1:
        return "single"
    name = "fsdp2" if plan.get("fsdp") else "ddp"
    return name + ("+offload" if plan.get("activation_offloading") else "")


def _ddp_error(exc: RuntimeError, plan: Plan) -> Exception:
    """DDP's unused-parameter failure as a user error naming the setting (other errors unchanged)."""
    text = str(exc)
    if "Expected to have finished reduction" not in text:
        return exc
    first = text.strip().splitlines()[0]
    return UserError.single("ddp_find_unused_parameters",
                            f"DDP failed: {first} (ddp_find_unused_parameters is "
                            f"{plan.get('ddp_find_unused_parameters')}; some trainable parameters get no gradient)",
                            "remove the ddp_find_unused_parameters override (the family sets it), or set it to true")


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text)
