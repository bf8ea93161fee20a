"""The lifecycle every training recipe follows, supervised (train/recipe.py) or preference
(train/preference.py), one step per method of `RecipeRun`, in this order:

1. `RecipeRun.start`: everything that can refuse the run before anything is written: the resume
   checkpoint, an output_dir that holds another run's weights; the plan's info lines and warnings
   are printed. The recipe then prepares its data and assembles its model (still nothing written).
2. `claim_output_dir`: rank 0 sets an earlier run's outputs aside and writes the run record.
3. `callbacks`: the training-loop clock, TensorBoard, the crash-safety guards' and the plugins'.
4. `train`: trainer.train() under the guards (resume, a non-finite step or a signal ends it with
   one message, DDP's unused-parameter failure named as a setting).
5. `stage`: the final weights written once under output_dir/.staging (the cache back on: the saved
   config is for inference).
6. `summary_fields` (the fields every train_summary.json holds), then `publish`: the tokenizer and the
   plot into the staged outputs, renamed into place, the summary last (its presence marks a finished run).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from archtune.config.schema import Config
from archtune.errors import UserError
from archtune.plan import Plan
from archtune.plan.train_settings import LOGGER_KEYS
from archtune.train import checkpoints, distributed
from archtune.train.assembly import set_use_cache
from archtune.train.callbacks import TrainClock
from archtune.train.guards import RunGuards
from archtune.train.outputs import (identity_fields, params_fields, peak_rss_mb, processes_fields, progress_fields,
                                    set_aside_previous_weights, write_summary)
from archtune.train.run_record import refuse_reuse, restart_resume, resume_checkpoint, write_run_record


@dataclass
class RecipeRun:
    cfg: Config
    plan: Plan
    tokenizer: Any
    console: Any = None
    resume: Path | None = None  # the checkpoint this run resumes from
    restarted: bool = False  # a torchrun restart of the run that claimed output_dir
    clock: TrainClock = field(default_factory=TrainClock)
    guards: RunGuards = field(init=False)

    def __post_init__(self) -> None:
        # Ranks other than 0 have no console and stay silent (rank 0 speaks for all).
        say = (lambda text: self.say(text)) if self.console is not None or not distributed.is_main() else None
        self.guards = RunGuards(self.plan.training.on_nonfinite, say=say, timeout=self.plan.training.ddp_timeout)

    @property
    def out(self) -> Path:
        return Path(self.plan.training.output_dir)

    @property
    def main(self) -> bool:
        return distributed.is_main()

    @classmethod
    def start(cls, cfg: Config, plan: Plan, tokenizer, console=None) -> "RecipeRun":
        """The run, once nothing about output_dir refuses it (resume, reuse); prints the plan's notes."""
        out = Path(plan.training.output_dir)
        # torchrun restarted the workers of the run that claimed output_dir (--max-restarts):
        # it continues from its last complete checkpoint, or starts over in its own output_dir.
        refused = None
        try:
            restarted, resume = restart_resume(out, distributed.run_id(), distributed.attempt())
            if not restarted:
                resume = resume_checkpoint(plan.training, out)
                refuse_reuse(plan.training, out, resume)
        except UserError as exc:
            if not distributed.is_distributed():
                raise
            refused, restarted, resume = exc, False, None
        same_start_on_every_rank(out, resume, refused)
        run = cls(cfg, plan, tokenizer, console, resume, restarted=restarted)
        if restarted:
            run.say(f"torchrun restart {distributed.attempt()} of this run: "
                    + (f"continuing from {resume.name}" if resume else "no checkpoint yet, starting over"))
        for line in plan.info:
            run.say(f"[blue]info:[/] {line}")
        for warning in plan.warnings:
            run.say(f"[yellow]warning:[/] {warning}")
        return run

    def claim_output_dir(self, data_stats: dict) -> None:
        """Rank 0, after every check passed: set an earlier run's outputs aside (a fresh start) and
        write the run record (the config as written, the plan, the data cache key); then every rank waits."""
        if self.main:
            out = self.out
            out.mkdir(parents=True, exist_ok=True)
            if self.resume is None and not self.restarted and (moved := set_aside_previous_weights(
                    out, checkpoints=self.plan.training.overwrite_output_dir)):
                self.say(f"an earlier run's outputs in {out} were moved to {moved}")
            cache_dir = data_stats.get("cache_dir")
            write_run_record(out, config=self.cfg.model_dump(mode="json", exclude_unset=True), plan=self.plan.to_json(),
                             cache_key=Path(cache_dir).name if cache_dir else None, world_size=self.plan.world_size,
                             resumed_from=self.resume,
                             launch={"run_id": distributed.run_id(), "restart": distributed.attempt()})
        distributed.barrier()

    def callbacks(self, plugins: list) -> list:
        """The Trainer's callbacks: the clock, TensorBoard (rank 0), the guards', the plugins'."""
        from archtune.plugins import run_hook

        callbacks: list = [self.clock]
        if self.plan.training.use_tensorboard and self.main:
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback

            callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(self.out / "runs"))))
        return callbacks + self.guards.callbacks() + run_hook(plugins, "callbacks", self.plan)

    def train(self, trainer, name_rows: Callable[[list], list[str]]):
        """trainer.train() under the run's guards, resumed from `resume`; `name_rows(batches)` names
        where a non-finite step's rows came from (FILE:LINE). Skipped steps are reported."""
        if self.resume is not None:
            self.say(f"resuming from {self.resume.name} (in {self.out})")
        try:
            result = self.guards.train(trainer, self.resume, self.out, name_rows)
        except RuntimeError as exc:
            raise ddp_error(exc, self.plan) from exc
        if (warning := self.guards.skipped_warning()) is not None:
            self.say(f"[yellow]warning:[/] {warning}")
        return result

    def stage(self, model, trainer) -> Path:
        """The final weights, written once (FSDP: shards gathered once) under output_dir/.staging."""
        set_use_cache(model, True)  # the saved config is for inference: the cache was off only for training
        staged = checkpoints.clear_staging(self.out, "final") if self.main else checkpoints.staging_dir(self.out) / "final"
        distributed.barrier()
        trainer.save_model(str(staged))
        return staged

    def summary_fields(self, trainer, result, eval_initial, eval_final, train_tokens: int | None,
                       params: tuple[int, int, int], strategy: str, data_stats: dict) -> dict[str, dict]:
        """The train_summary.json fields every recipe writes, by group: "progress" (steps, losses,
        tokens, time), "memory" (peak RSS), "params" ((trainable, total, model bytes)), "processes",
        "identity" (model, adapter, data, skipped steps, resume)."""
        history = trainer.state.log_history
        train_losses = [h["loss"] for h in history if "loss" in h]
        return {
            "progress": progress_fields(trainer.state.global_step, train_losses, result.training_loss, eval_initial,
                                        eval_final, train_tokens, self.clock.seconds),
            "memory": {"peak_rss_mb": peak_rss_mb()},
            "params": params_fields(*params),
            "processes": processes_fields(self.plan, strategy),
            "identity": identity_fields(self.plan, data_stats, self.guards.watch.skipped, self.resume),
        }

    def publish(self, staged: Path, summary: dict, plot: Callable[[Path], Any]) -> None:
        """Rank 0: the tokenizer and the plot (`plot(path)`) into the staged outputs, renamed into
        output_dir, then the summary, last: its presence marks a finished run."""
        if self.main:
            self.tokenizer.save_pretrained(str(staged))
            plot(staged / "loss.png")
            checkpoints.publish_outputs(staged, self.out)
            write_summary(self.out / checkpoints.SUMMARY, summary)

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)


def same_start_on_every_rank(out: Path, resume: Path | None, refused: UserError | None) -> None:
    """Every rank starts from the same checkpoint (or none), or all stop with the same UserError
    (a collective; nothing on one process). Each rank reads output_dir on its own node, and only
    global rank 0 writes checkpoints: on nodes without a shared file system the others find none,
    and ranks resuming from different steps would train different runs, then wait on each other."""
    if not distributed.is_distributed():
        return
    seen = distributed.gather((distributed.node_rank(), resume.name if resume else None,
                               str(refused) if refused is not None else None))
    refusals = [(r, text) for r, (_, _, text) in enumerate(seen) if text]
    if refusals:
        if refused is not None:
            raise refused
        r, text = refusals[0]
        raise UserError.single("output_dir", f"rank {r} (node {seen[r][0]}) refused to start: {text}",
                               "see that rank's message")
    if len({name for _, name, _ in seen}) > 1:
        starts = "; ".join(f"rank {r} (node {node}) from {name or 'none'}" for r, (node, name, _) in enumerate(seen))
        raise UserError.single(
            "output_dir", f"the ranks would resume from different checkpoints of {out}: {starts}. Only global rank 0 "
            "writes checkpoints, into output_dir on its own node",
            "give every node the same output_dir on a shared file system, or copy global rank 0's last checkpoint-N "
            "into output_dir on every node, then resume (resume_from_checkpoint: true)")


def ddp_error(exc: RuntimeError, plan: Plan) -> Exception:
    """DDP's unused-parameter failure as a user error naming the setting (other errors unchanged)."""
    text = str(exc)
    if "Expected to have finished reduction" not in text:
        return exc
    first = text.strip().splitlines()[0]
    return UserError.single("ddp_find_unused_parameters",
                            f"DDP failed: {first} (ddp_find_unused_parameters is "
                            f"{plan.distributed.ddp_find_unused_parameters}; some trainable parameters get no gradient)",
                            "remove the ddp_find_unused_parameters override (the family sets it), or set it to true")


# ---------------------------------------------------------------- TrainingArguments, from the plan

def training_arguments(plan: Plan, has_eval: bool, steps_per_epoch: int | None = None):
    """transformers TrainingArguments from the Plan (`plan.training`). `steps_per_epoch` (optimizer
    steps) turns saves_per_epoch / evals_per_epoch into step intervals."""
    from transformers import TrainingArguments

    t = plan.training
    logger_environment(plan)
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
        full_determinism=t.full_determinism,
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


# W&B's and MLflow's callbacks read each setting from the environment variable of its name in
# capitals; hf_mlflow_log_artifacts is a flag, written as "true"/"false" below.
LOGGER_ENVIRONMENT = {key: key.upper() for key in LOGGER_KEYS if key != "hf_mlflow_log_artifacts"}


def logger_environment(plan: Plan) -> None:
    """transformers' WandbCallback / MLflowCallback read their settings from the environment."""
    loggers = plan.training.loggers
    for key, env in LOGGER_ENVIRONMENT.items():
        if loggers.get(key) is not None:
            os.environ[env] = str(loggers[key])
    if loggers.get("wandb_run_id"):
        os.environ.setdefault("WANDB_RESUME", "allow")
    if loggers.get("hf_mlflow_log_artifacts") is not None:
        os.environ["HF_MLFLOW_LOG_ARTIFACTS"] = str(bool(loggers["hf_mlflow_log_artifacts"])).lower()


__all__ = ["LOGGER_ENVIRONMENT", "RecipeRun", "ddp_error", "same_start_on_every_rank", "logger_environment", "training_arguments"]
