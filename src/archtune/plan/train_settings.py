"""What the training recipe reads from the plan: one typed, frozen view (`plan.training`).

train/ builds transformers' TrainingArguments and the batch collator's padding from here and from
nothing else: each field is a plan entry, as written in the config (value, source user or
default) or derived by the rules below (`eval_micro_batch_size`, `warmup`, `pad_to_length`,
`dataloader_pin_memory_resolved`, `run_name`), so `archtune check --json` shows every value a run
uses, with its reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from archtune.plan.shared import Rule
from archtune.plan.training_rules import cuda_available

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import Plan

# The logger settings W&B's and MLflow's callbacks take from the environment.
LOGGER_KEYS = ("wandb_project", "wandb_mode", "wandb_entity", "wandb_run_id", "wandb_watch", "wandb_log_model",
               "mlflow_tracking_uri", "mlflow_experiment_name", "mlflow_run_name", "hf_mlflow_log_artifacts")

# transformers' TrainingArguments.save_steps default, which it needs even when saves are not by steps.
TRAINER_SAVE_STEPS = 500


@dataclass(frozen=True)
class TrainSettings:
    base_model: str  # as written (the loss plot's title)
    output_dir: str
    overwrite_output_dir: bool  # a finished run's outputs there are set aside, not refused
    resume_from_checkpoint: bool | str | None  # True, "auto", a checkpoint path, or None
    auto_resume_from_checkpoints: bool
    on_nonfinite: str  # "stop" | "skip": what a step with a non-finite loss or gradient does
    # batches
    micro_batch_size: int
    eval_micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int  # rows per optimizer step over all processes
    pad_to_multiple_of: int | None  # the collator rounds each batch's width up to a multiple of this
    pad_to_length: int | None  # every batch at least this wide (pad_to_sequence_len); None: the longest row
    # length of the run
    num_epochs: float
    max_steps: int  # -1: no limit (the epochs decide)
    # optimizer and schedule
    learning_rate: float
    optimizer: str
    optim_args: str | None  # "k=v,k=v", as transformers reads it
    adam_beta1: float | None  # None: the optimizer's own
    adam_beta2: float | None
    adam_epsilon: float | None
    weight_decay: float
    max_grad_norm: float
    lr_scheduler: str
    lr_scheduler_kwargs: dict
    warmup: int | float  # optimizer steps (int), or a fraction of the run (float < 1)
    # precision and compilation
    bf16: bool
    fp16: bool
    tf32: bool | None  # None: torch's own matmul setting
    torch_compile: bool
    torch_compile_backend: str | None
    torch_compile_mode: str | None
    gradient_checkpointing: bool
    gradient_checkpointing_kwargs: dict | None
    seed: int
    full_determinism: bool  # transformers' enable_full_determinism instead of set_seed
    # logging, saving, evaluation
    logging_steps: int
    report_to: tuple[str, ...]
    loggers: dict  # LOGGER_KEYS as decided (W&B and MLflow read them from the environment)
    run_name: str | None
    use_tensorboard: bool
    save_strategy: str | None  # None: from save_steps / saves_per_epoch (`save_interval`)
    save_steps: int | None
    saves_per_epoch: int | None
    save_total_limit: int | None
    eval_strategy: str | None
    eval_steps: int | None
    evals_per_epoch: int | None
    # data loading
    dataloader_num_workers: int
    dataloader_pin_memory: bool
    dataloader_prefetch_factor: int | None
    dataloader_drop_last: bool
    remove_unused_columns: bool
    ddp_find_unused_parameters: bool | None
    ddp_timeout: int  # seconds a collective waits for the other processes (and a stalled process is given)

    def save_interval(self, steps_per_epoch: int | None) -> tuple[str, int]:
        """(save_strategy, save_steps) for transformers, `steps_per_epoch` optimizer steps per epoch."""
        strategy, steps = _interval(self.save_strategy, self.save_steps, self.saves_per_epoch, steps_per_epoch)
        return strategy, steps or TRAINER_SAVE_STEPS

    def eval_interval(self, steps_per_epoch: int | None) -> tuple[str, int | None]:
        """(eval_strategy, eval_steps) for transformers, `steps_per_epoch` optimizer steps per epoch."""
        return _interval(self.eval_strategy, self.eval_steps, self.evals_per_epoch, steps_per_epoch)


def _interval(strategy: str | None, steps: int | None, per_epoch: int | None,
              steps_per_epoch: int | None) -> tuple[str, int | None]:
    """(strategy, steps) for saving or evaluating: an explicit strategy wins; N per epoch becomes
    every steps_per_epoch // N steps (at least 1); steps alone means `steps`."""
    if per_epoch and steps_per_epoch:
        steps = max(1, steps_per_epoch // per_epoch)
    if strategy is not None:
        return strategy, steps
    return ("steps", steps) if steps else ("no", None)


def _optim_args(value) -> str | None:
    """Axolotl's optim_args as transformers reads them: a mapping becomes "k=v,k=v"."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return value


def train_settings(plan: "Plan") -> TrainSettings:
    d = plan.decided
    return TrainSettings(
        base_model=str(d("base_model")),
        output_dir=str(d("output_dir")),
        overwrite_output_dir=bool(d("overwrite_output_dir")),
        resume_from_checkpoint=d("resume_from_checkpoint"),
        auto_resume_from_checkpoints=bool(d("auto_resume_from_checkpoints")),
        on_nonfinite=str(d("on_nonfinite")),
        micro_batch_size=int(d("micro_batch_size")),
        eval_micro_batch_size=int(d("eval_micro_batch_size")),
        gradient_accumulation_steps=int(d("gradient_accumulation_steps")),
        global_batch_size=int(d("global_batch_size")),
        pad_to_multiple_of=d("pad_to_multiple_of"),
        pad_to_length=d("pad_to_length"),
        num_epochs=d("num_epochs"),
        max_steps=d("max_steps") or -1,
        learning_rate=d("learning_rate"),
        optimizer=str(d("optimizer")),
        optim_args=_optim_args(plan.section("optim_args")),
        adam_beta1=d("adam_beta1"),
        adam_beta2=d("adam_beta2"),
        adam_epsilon=d("adam_epsilon"),
        weight_decay=d("weight_decay"),
        max_grad_norm=d("max_grad_norm"),
        lr_scheduler=str(d("lr_scheduler")),
        lr_scheduler_kwargs=plan.section("lr_scheduler_kwargs") or {},
        warmup=d("warmup"),
        bf16=d("bf16") is True,
        fp16=d("fp16") is True,
        tf32=True if d("tf32") else None,
        torch_compile=bool(d("torch_compile")),
        torch_compile_backend=d("torch_compile_backend"),
        torch_compile_mode=d("torch_compile_mode"),
        gradient_checkpointing=bool(d("gradient_checkpointing")),
        gradient_checkpointing_kwargs=plan.section("gradient_checkpointing_kwargs") or None,
        seed=int(d("seed")),
        full_determinism=bool(d("full_determinism")),
        logging_steps=d("logging_steps"),
        report_to=tuple(plan.get("report_to") or ()),
        loggers={key: d(key) for key in LOGGER_KEYS},
        run_name=d("run_name"),
        use_tensorboard=bool(d("use_tensorboard")),
        save_strategy=d("save_strategy"),
        save_steps=d("save_steps"),
        saves_per_epoch=d("saves_per_epoch"),
        save_total_limit=d("save_total_limit"),
        eval_strategy=d("eval_strategy"),
        eval_steps=d("eval_steps"),
        evals_per_epoch=d("evals_per_epoch"),
        dataloader_num_workers=d("dataloader_num_workers") or 0,
        dataloader_pin_memory=bool(d("dataloader_pin_memory_resolved")),
        dataloader_prefetch_factor=d("dataloader_prefetch_factor"),
        dataloader_drop_last=bool(d("dataloader_drop_last")),
        remove_unused_columns=bool(d("remove_unused_columns")),
        ddp_find_unused_parameters=plan.get("ddp_find_unused_parameters"),
        ddp_timeout=int(d("ddp_timeout")),
    )


# ---------------------------------------------------------------- derived entries
# Each restates keys the user may write, so its source is "user" when one of them was written and
# "default" otherwise.

def _source(plan: "Plan", *keys: str) -> str:
    return "user" if any(plan.user_set(k) for k in keys) else "default"


def _eval_micro_batch_size(plan: "Plan") -> None:
    given = plan.get("eval_batch_size")
    if given:
        plan.set("eval_micro_batch_size", given, "user", f"eval_batch_size: evaluation batches hold {given} rows")
        return
    size = plan.get("micro_batch_size")
    plan.set("eval_micro_batch_size", size, _source(plan, "micro_batch_size"),
             f"eval_batch_size is not set: evaluation batches hold micro_batch_size ({size}) rows")


def _global_batch_size(plan: "Plan") -> None:
    size, steps, world = plan.get("micro_batch_size"), plan.get("gradient_accumulation_steps"), plan.world_size
    plan.set("global_batch_size", size * steps * world, _source(plan, "micro_batch_size", "gradient_accumulation_steps"),
             f"micro_batch_size x gradient_accumulation_steps x processes ({size} x {steps} x {world}) rows per "
             "optimizer step: the per-device batch stays as written, so more processes train on more rows per step")


def _warmup(plan: "Plan") -> None:
    steps, ratio = plan.get("warmup_steps"), plan.get("warmup_ratio")
    if steps is not None:
        value, why = steps, f"warmup_steps: the learning rate rises over the first {steps} optimizer steps"
    elif ratio:
        value, why = ratio, f"warmup_ratio: the learning rate rises over the first {ratio} of the optimizer steps"
    else:
        value, why = 0.0, "neither warmup_steps nor warmup_ratio is set: no warmup"
    plan.set("warmup", value, _source(plan, "warmup_steps", "warmup_ratio"), why)


def _pad_to_length(plan: "Plan") -> None:
    if plan.get("pad_to_sequence_len"):
        length = plan.get("sequence_len")
        plan.set("pad_to_length", length, "user", f"pad_to_sequence_len: every batch is padded to sequence_len "
                 f"({length}) tokens, so every step has the same shape")
    else:
        plan.set("pad_to_length", None, _source(plan, "pad_to_sequence_len"),
                 "batches are padded to their longest row (pad_to_sequence_len is off)")


def _pin_memory(plan: "Plan") -> None:
    given = plan.get("dataloader_pin_memory")
    if given is not None:
        plan.set("dataloader_pin_memory_resolved", bool(given), "user", f"dataloader_pin_memory: {bool(given)}")
        return
    on = cuda_available()
    plan.set("dataloader_pin_memory_resolved", on, "default",
             "batches are copied to a CUDA GPU from pinned memory" if on
             else "no CUDA GPU: batches stay in CPU memory, so pinning buys nothing")


def _run_name(plan: "Plan") -> None:
    wandb, mlflow = plan.get("wandb_name"), plan.get("mlflow_run_name")
    name = wandb or mlflow
    why = ("wandb_name" if wandb else "mlflow_run_name") if name else \
        "neither wandb_name nor mlflow_run_name is set: the loggers name the run"
    plan.set("run_name", name, _source(plan, "wandb_name", "mlflow_run_name"), why)


TRAIN_SETTINGS_RULES: tuple[Rule, ...] = (
    Rule("eval_micro_batch_size", "Evaluation batches hold `eval_batch_size` rows, micro_batch_size when it is not "
         "set.", _eval_micro_batch_size),
    Rule("global_batch_size", "An optimizer step trains on micro_batch_size x gradient_accumulation_steps rows on "
         "every process: the global batch grows with the world size (Axolotl's `batch_size` is refused).",
         _global_batch_size),
    Rule("warmup", "The learning-rate warmup is `warmup_steps` optimizer steps, else `warmup_ratio` of the run, else "
         "none.", _warmup),
    Rule("pad_to_length", "`pad_to_sequence_len` pads every batch to sequence_len tokens (fixed shapes); otherwise "
         "batches are as wide as their longest row, rounded up to `pad_to_multiple_of`.", _pad_to_length),
    Rule("dataloader_pin_memory", "Batches come from pinned memory when a CUDA GPU is there to copy them to, unless "
         "`dataloader_pin_memory` says otherwise.", _pin_memory),
    Rule("run_name", "The loggers' run name is `wandb_name`, else `mlflow_run_name`.", _run_name),
)


__all__ = ["TrainSettings", "TRAIN_SETTINGS_RULES", "TRAINER_SAVE_STEPS", "train_settings"]
