"""Online RL with `rl: grpo` on TRL's GRPOTrainer, with your own reward functions.

archtune builds the policy exactly as for supervised fine-tuning (`assemble_model`: the family's
rules, frozen towers, LoRA / QLoRA / full, expert LoRA, 4-bit experts) and reads the prompts itself
(data/grpo.py); TRL's GRPOTrainer gets the prepared model, the prompt rows, the reward functions and
a GRPOConfig built from the same Plan. It generates with the policy being trained (model.generate,
LoRA enabled, KV cache on, the batch's prompts together), scores, computes group-relative
advantages and the clipped loss. What the subclass here adds to TRL's trainer, and nothing else:

- each reward function is called through a guard: one that raises, returns the wrong number of
  rewards or something that is not a number ends the run with one error naming its
  `trl.reward_funcs.N` key and the batch, never a traceback;
- rollouts through transformers sample each completion from its own seed (the run's seed, the
  optimizer step, the completion's row in the step's generation batch over all processes;
  train/rollouts.py), so N DDP processes sample the completions one process samples with the
  same global batch, and a resumed run samples what the uninterrupted one did;
- a rollout whose sampling probabilities are not finite (the weights or a prompt's activations
  went inf or nan) stops the run as a non-finite loss does, naming the step and its prompts;
- the wall time of each optimizer step is split into rollouts (generation, reward scoring and
  the log-probabilities of the sampled completions) and updates (the forward and backward passes
  of the loss), logged as `timing/rollout_seconds` and `timing/update_seconds`;
- a full fine-tune with `beta > 0` gets its frozen reference as a copy of the prepared policy (TRL
  would reload it by name, which a model built in memory does not have); with LoRA the reference is
  the base with the adapter disabled;
- evaluation is its own and exact: the held-out prompts are completed greedily (and sampled at the
  training temperature, `num_generations` each), scored by the same reward functions, and the mean
  reward is over every completion (`reward_mean`, `reward_mean_sampled`, `rewards/<name>/mean`).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

from archtune.errors import UserError

TIMING_KEYS = ("timing/rollout_seconds", "timing/update_seconds")


# ---------------------------------------------------------------- reward functions

class RewardFailed(UserError):
    """A reward function raised or returned something GRPO cannot use."""


class GuardedReward:
    """A user reward function, called as TRL calls it, whose failures are one UserError naming its
    key. Keeps the function's name (TRL's metrics are `rewards/<name>/mean`)."""

    def __init__(self, fn: Callable, path: str, key: str):
        self.fn, self.path, self.key = fn, path, key
        self.__name__ = getattr(fn, "__name__", path.rpartition(".")[2])

    def __call__(self, prompts, completions, **kwargs) -> list:
        try:
            out = self.fn(prompts=prompts, completions=completions, **kwargs)
        except UserError:
            raise
        except Exception as exc:
            raise RewardFailed.single(self.key, f"{self.path} raised {type(exc).__name__}: {exc} (on a batch of "
                                      f"{len(completions)} completions)", f"fix {self.path}") from None
        try:
            values = list(out)
        except TypeError:
            raise RewardFailed.single(self.key, f"{self.path} returned a {type(out).__name__}, not a list of rewards",
                                      "return one float per completion") from None
        if len(values) != len(completions):
            raise RewardFailed.single(self.key, f"{self.path} returned {len(values)} rewards for {len(completions)} "
                                      "completions", "return one float (or None) per completion, in order")
        bad = [v for v in values if v is not None and not isinstance(v, (int, float)) and not
               (torch.is_tensor(v) and v.numel() == 1)]
        if bad:
            raise RewardFailed.single(self.key, f"{self.path} returned a {type(bad[0]).__name__} among its rewards",
                                      "return floats (None for a completion the function does not score)")
        return [None if v is None else float(v) for v in values]


def load_reward_functions(plan) -> list[GuardedReward]:
    """The plan's `trl.reward_funcs`, imported (from the config's directory first) and guarded."""
    from archtune.data.user_code import load_function

    out = []
    for i, path in enumerate(plan.grpo.reward_funcs):
        key = f"trl.reward_funcs.{i}"
        out.append(GuardedReward(load_function(path, key, plan.preference.user_code_dir), path, key))
    return out


# ---------------------------------------------------------------- GRPOConfig from the Plan

def grpo_arguments(plan, base_args):
    """TRL's GRPOConfig: `base_args` (archtune's TrainingArguments for this Plan) field by field,
    plus the `trl:` settings the Plan resolved."""
    from transformers import TrainingArguments
    from trl import GRPOConfig

    common = {f.name: getattr(base_args, f.name) for f in fields(TrainingArguments) if f.init}
    g = plan.grpo
    groups = g.num_generations
    # TRL checks its own evaluation batches hold whole groups; archtune evaluates with its own loop.
    common["per_device_eval_batch_size"] = groups
    extra: dict[str, Any] = {
        "beta": g.beta, "num_generations": groups,
        "max_completion_length": g.max_completion_length,
        "generation_batch_size": g.generation_batch_size,
        "temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k,
        "min_p": g.min_p, "repetition_penalty": g.repetition_penalty,
        "generation_kwargs": g.generation_kwargs, "chat_template_kwargs": g.chat_template_kwargs,
        "loss_type": g.loss_type, "scale_rewards": g.scale_rewards,
        "multi_objective_aggregation": g.multi_objective_aggregation,
        "num_iterations": g.num_iterations, "epsilon": g.epsilon,
        "epsilon_high": g.epsilon_high,
        "importance_sampling_level": g.importance_sampling_level,
        "mask_truncated_completions": g.mask_truncated_completions,
        "reward_weights": list(g.reward_weights),
        "log_completions": g.log_completions,
        "num_completions_to_print": g.num_completions_to_print,
    }
    common["remove_unused_columns"] = False  # reward functions read every column
    # TRL counts the prompt and completion tokens of every rollout itself (its batches are rows, not tensors).
    common["include_num_input_tokens_seen"] = "no"
    backend = g.rollout_backend
    if backend and backend.startswith("vllm"):
        extra.update(use_vllm=True, vllm_mode=backend.removeprefix("vllm_"), **g.vllm_server)
    return GRPOConfig(**common, **extra)


# ---------------------------------------------------------------- held-out rewards

@dataclass
class Rollouts:
    """How held-out prompts are completed: the generation settings of the run."""

    max_new_tokens: int
    temperature: float
    num_generations: int
    batch_size: int
    chat_template_kwargs: dict | None = None
    seed: int = 0

    @classmethod
    def of_plan(cls, plan) -> "Rollouts":
        g = plan.grpo
        return cls(g.max_completion_length, g.temperature, g.num_generations,
                   int(plan.training.eval_micro_batch_size), g.chat_template_kwargs, plan.training.seed)


def prompt_ids(tokenizer, prompts: list, chat_template_kwargs: dict | None) -> list[list[int]]:
    """Prompts tokenized as TRL's GRPOTrainer tokenizes them: a conversation rendered with the
    generation prompt, a string through the tokenizer."""
    from trl.data_utils import is_conversational

    if is_conversational({"prompt": prompts[0]}):
        out = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            **(chat_template_kwargs or {}))
        return [list(ids) for ids in out["input_ids"]]
    return [list(ids) for ids in tokenizer(text=prompts)["input_ids"]]


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in ids else []) + ids


def complete(model, tokenizer, prompts: list, rollouts: Rollouts, *, sample: bool, device="cpu"):
    """(completion ids, decoded completions) for `prompts`: greedy, or sampled at the run's
    temperature with each completion's own seed (train/rollouts.py: the same completions in any
    batch size); batched, prompts left-padded, generation stops at any eos id the model declares."""
    from transformers import GenerationConfig

    from archtune.patches.text_only import text_only_extras
    from archtune.train.rollouts import EVALUATION_STREAM, completion_seeds, generate_completions
    from trl.data_utils import is_conversational

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": rollouts.temperature, "top_k": 0, "top_p": 1.0} if sample else \
        {"do_sample": False}
    config = GenerationConfig(max_new_tokens=rollouts.max_new_tokens, eos_token_id=_eos_ids(model, tokenizer),
                              pad_token_id=pad, use_cache=True, **sampling)
    ids_out: list[list[int]] = []
    for start in range(0, len(prompts), rollouts.batch_size):
        chunk = prompt_ids(tokenizer, prompts[start:start + rollouts.batch_size], rollouts.chat_template_kwargs)
        seeds = completion_seeds(rollouts.seed, EVALUATION_STREAM, 0, start, len(chunk)) if sample else None
        ids_out += generate_completions(model, chunk, config, seeds=seeds, device=device, extras=text_only_extras)
    texts = tokenizer.batch_decode(ids_out, skip_special_tokens=True)
    if prompts and is_conversational({"prompt": prompts[0]}):
        return ids_out, [[{"role": "assistant", "content": t}] for t in texts]
    return ids_out, texts


def held_out_rewards(model, tokenizer, rows, rewards: list[GuardedReward], weights: list[float],
                     rollouts: Rollouts, *, device="cpu", sampled: bool = True) -> dict[str, float]:
    """Mean rewards of the policy on the held-out rows: greedy completions (`reward_mean`, one per
    prompt) and, when `sampled`, `num_generations` sampled completions per prompt
    (`reward_mean_sampled`); per function `rewards/<name>/mean` (greedy); `completion_length`
    (greedy, tokens). Means are over completions the functions scored (None is left out)."""
    columns = {k: list(rows[k]) for k in rows.column_names if k != "prompt"}
    prompts = list(rows["prompt"])
    mode = model.training
    model.eval()
    try:
        metrics: dict[str, float] = {"rows": len(prompts)}
        runs = [("", prompts, columns, False)]
        if sampled:
            n = rollouts.num_generations
            runs.append(("_sampled", [p for p in prompts for _ in range(n)],
                         {k: [v for v in vals for _ in range(n)] for k, vals in columns.items()}, True))
        for suffix, ps, cols, sample in runs:
            ids, completions = complete(model, tokenizer, ps, rollouts, sample=sample, device=device)
            table = []
            for fn in rewards:
                values = fn(prompts=ps, completions=completions, completion_ids=ids, **cols)
                table.append([math.nan if v is None else v for v in values])
                if not suffix:
                    metrics[f"rewards/{fn.__name__}/mean"] = _nanmean(table[-1])
            total = [sum(w * v for w, v in zip(weights, col) if not math.isnan(v))
                     if not all(math.isnan(v) for v in col) else math.nan for col in zip(*table)]
            metrics[f"reward_mean{suffix}"] = _nanmean(total)
            metrics[f"completion_length{suffix}"] = sum(map(len, ids)) / max(len(ids), 1)
    finally:
        model.train(mode)
    return metrics


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


# ---------------------------------------------------------------- the trainer

def trainer_class():
    """TRL's GRPOTrainer with archtune's crash safety and the additions above."""
    from trl import GRPOTrainer

    from archtune.train.trainer import CrashSafeTrainer

    class ArchtuneGRPOTrainer(CrashSafeTrainer, GRPOTrainer):
        eval_rows: Any = None
        rollouts: Rollouts | None = None
        seeded_rollouts = False
        step_prompts: list = []

        def __init__(self, *args, reference=None, **kwargs):
            # TRL builds a full fine-tune's reference by reloading the model by name; archtune hands it
            # a copy of the prepared policy instead: TRL is built with beta 0, then given the reference.
            beta = kwargs["args"].beta
            kwargs["args"].beta = 0.0
            super().__init__(*args, **kwargs)
            self.args.beta = self.beta = beta
            self.rollout_seconds = self.update_seconds = 0.0
            self._step_rollout = self._step_update = self._pending_rollout = 0.0
            if reference is not None and beta:
                from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

                if self.args.disable_dropout:
                    disable_dropout_in_model(reference)
                add_fused_lm_head(reference, temperature=self.temperature)
                self.ref_model = self.accelerator.prepare_model(reference, evaluation_mode=True)

        # -- rollout vs update time
        def _generate_and_score_completions(self, inputs):
            from archtune.train.guards import NonFinite
            from archtune.train.rollouts import NonFiniteProbabilities

            start = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            except RuntimeError as exc:
                # Non-finite weights or activations reach sampling before any loss: the seeded sampler
                # (or torch.multinomial) refuses the probabilities. The run stops as for a non-finite
                # loss, naming the step.
                if not isinstance(exc, NonFiniteProbabilities) and "probability tensor contains" not in str(exc):
                    raise
                raise NonFinite(self.state.global_step + 1, "the policy's next-token probabilities are not finite "
                                "(inf or nan) while sampling the rollouts", []) from None
            finally:
                if self.model.training:
                    self._pending_rollout += time.perf_counter() - start

        def training_step(self, model, inputs, num_items_in_batch=None):
            # `inputs` are the generation batch's rows (prompts), not tensors: the non-finite watch sees
            # the loss, and the step's prompts are kept to name them.
            if self._step % self.current_gradient_accumulation_steps == 0:
                self.step_prompts = []
            self.step_prompts += [row.get("prompt") for row in inputs]
            start = time.perf_counter()
            self._pending_rollout = 0.0
            loss = GRPOTrainer.training_step(self, model, inputs, num_items_in_batch)
            if self.nonfinite is not None:
                self.nonfinite.saw_loss(loss, {})
            total = time.perf_counter() - start
            self._step_rollout += self._pending_rollout
            self._step_update += total - self._pending_rollout
            if self._step % self.current_gradient_accumulation_steps == 0:  # TRL counts micro-steps in _step
                self._metrics["train"]["timing/rollout_seconds"].append(self._step_rollout)
                self._metrics["train"]["timing/update_seconds"].append(self._step_update)
                self.rollout_seconds += self._step_rollout
                self.update_seconds += self._step_update
                self._step_rollout = self._step_update = 0.0
            return loss

        # -- rollouts: each completion sampled from its own seed (train/rollouts.py)
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
            if not self.seeded_rollouts or self.use_vllm or images is not None or multimodal_fields:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     *args, **kwargs)
            from trl.models.utils import unwrap_model_for_generation

            from archtune.patches.text_only import text_only_extras
            from archtune.train.rollouts import TRAINING_STREAM, completion_seeds, generate_completions

            # This process's rows are rows [rank * n, (rank + 1) * n) of the step's generation batch
            # (TRL slices the gathered advantages the same way).
            n = len(prompt_ids)
            seeds = completion_seeds(self.args.seed, TRAINING_STREAM, self.state.global_step,
                                     self.accelerator.process_index * n, n)
            with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                             gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                             generation_kwargs=self.generation_kwargs,
                                             gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
                                             ) as model:
                ids = generate_completions(model, prompt_ids, self.generation_config, seeds=seeds,
                                           device=self.accelerator.device, extras=text_only_extras,
                                           eos=self.eos_token_ids)
            return ids, None

        # -- text-only batches of multimodal wrappers get the inputs their forward takes
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, *args, **kwargs):
            from archtune.patches.text_only import text_only_extras

            for k, v in text_only_extras(model, {"input_ids": input_ids, "attention_mask": attention_mask}).items():
                kwargs.setdefault(k, v)
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, *args, **kwargs)

        # -- evaluation: exact held-out rewards
        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
            rows = self.eval_rows if eval_dataset is None else eval_dataset
            if rows is None or self.rollouts is None:
                return {}
            model = self.accelerator.unwrap_model(self.model)
            values = held_out_rewards(model, self.processing_class, rows, self.reward_funcs,
                                      self.reward_weights.tolist(), self.rollouts, device=self.args.device)
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in values.items()}
            from transformers import Trainer

            Trainer.log(self, metrics)  # past TRL's log, which would mix in its training metrics
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return ArchtuneGRPOTrainer


def build_trainer(plan, model, tokenizer, data, rewards, args, callbacks, nonfinite=None):
    cls = trainer_class()
    reference = None
    if plan.preference.reference_model == "frozen_copy":
        reference = copy.deepcopy(model)
        reference.requires_grad_(False)
        reference.eval()
    trainer = cls(model=model, reward_funcs=list(rewards), args=args, train_dataset=data.train,
                  eval_dataset=None, processing_class=tokenizer, callbacks=callbacks, nonfinite=nonfinite,
                  reference=reference)
    trainer.eval_rows = data.eval
    trainer.rollouts = Rollouts.of_plan(plan)
    trainer.seeded_rollouts = plan.grpo.rollout_seeding == "completion"
    return trainer


def step_rows(prompts: list, data, limit: int = 16) -> list[str]:
    """Where the prompts of a step came from (FILE:LINE), for the non-finite stop; a prompt is
    named once (each is repeated num_generations times)."""
    import json

    where = {json.dumps(p, sort_keys=True): s for p, s in zip(data.train["prompt"], data.train_sources)}
    names = list(dict.fromkeys(where.get(json.dumps(p, sort_keys=True)) or "a prompt not found in the training data"
                               for p in prompts))
    return names[:limit] + (["..."] if len(names) > limit else [])


# ---------------------------------------------------------------- the recipe's GRPO branch

def train_grpo(run) -> dict:
    """Prompts, reward functions, model, TRL trainer, held-out rewards before and after, training,
    outputs: the GRPO counterpart of the supervised recipe, through the same lifecycle (`run`: a
    train.lifecycle.RecipeRun: output_dir claim, run record, guards, resume, staged outputs)."""
    from transformers.trainer_callback import ProgressCallback

    from archtune.adapters.lora import count_params
    from archtune.data.grpo import prepare_grpo_data
    from archtune.moe.quant4 import model_bytes
    from archtune.plugins import load_plugins
    from archtune.train import distributed
    from archtune.train.assembly import assemble_model, experts_implementation_in_use
    from archtune.train.callbacks import LossBar
    from archtune.train.lifecycle import training_arguments

    plan, tokenizer = run.plan, run.tokenizer
    rewards = load_reward_functions(plan)  # before anything is written: a missing function is a config error
    with distributed.local_main_first():
        data = prepare_grpo_data(plan, tokenizer, progress=run.main)
    plugins = load_plugins(run.cfg)
    model = assemble_model(plan, tokenizer, "train", console=run.console, plugins=plugins).model
    trainable, total = count_params(model)
    weight_bytes = model_bytes(model, adapters=False)
    run.claim_output_dir(data.stats)
    args = grpo_arguments(plan, training_arguments(plan, has_eval=data.eval is not None))
    trainer = build_trainer(plan, model, tokenizer, data, rewards, args, run.callbacks(plugins),
                            nonfinite=run.guards.watch)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossBar(keys=("reward", "reward_std", "completions/mean_length", "kl",
                                       "clip_ratio/region_mean", *TIMING_KEYS)))
    initial = trainer.evaluate() if data.eval is not None else {}
    result = run.train(trainer, name_rows=lambda batches: step_rows(trainer.step_prompts, data))
    final = trainer.evaluate() if data.eval is not None else {}

    staged = run.stage(model, trainer)
    history = trainer.state.log_history  # train() starts a fresh state: the step-0 evaluation is added back
    if initial:
        history = [{"step": 0, **initial}] + [h for h in history if not (h.get("step") == 0 and "eval_rows" in h)]
    train_logs = [h for h in history if "reward" in h and "loss" in h]
    train_tokens = int(trainer.state.num_input_tokens_seen) or None  # prompt + completion tokens, all processes
    shared = run.summary_fields(trainer, result, None, None, train_tokens, (trainable, total, weight_bytes),
                                "single" if plan.world_size == 1 else "ddp", data.stats)
    summary = {
        "method": "grpo",
        "trainer": plan.preference.trainer,
        "reference_model": plan.preference.reference_model,
        "rollout_backend": plan.grpo.rollout_backend,
        **shared["progress"],
        "reward_mean_first": train_logs[0].get("reward") if train_logs else None,
        "reward_mean_last": train_logs[-1].get("reward") if train_logs else None,
        "train_rewards": [h.get("reward") for h in train_logs],  # the mean reward of each logged step's rollouts
        "rollout_seconds": round(trainer.rollout_seconds, 3),
        "update_seconds": round(trainer.update_seconds, 3),
        "experts_implementation": experts_implementation_in_use(model),
        **shared["memory"],
        **shared["params"],
        **shared["processes"],
        **shared["identity"],
    }
    # Each metric's latest value: with num_iterations > 1 the steps that reuse a generated batch log
    # the clip ratios (the off-policy passes) but no rewards.
    last: dict = {}
    for h in history:
        if "loss" in h:
            last.update(h)
    for key in sorted(k for k in last if k.startswith(("rewards/", "completions/", "clip_ratio/")) or k in
                      ("kl", "entropy", "reward_std", "frac_reward_zero_std")):
        summary[key] = last[key]
    for key, value in final.items():
        summary[key] = value
    for key, value in initial.items():
        summary[f"{key}_initial"] = value
    title = f"{plan.training.base_model} ({plan.family.name}, grpo, {plan.adapter.kind or 'full'})"
    run.publish(staged, summary, plot=lambda path: plot_grpo(history, path, title))
    return summary


def plot_grpo(history: list[dict], path, title: str):
    """loss.png for a GRPO run: the mean reward of the training rollouts (line) and of the held-out
    prompts (points), and the loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    pts = [(h["step"], h["reward"]) for h in history if "reward" in h and "step" in h]
    if pts:
        left.plot(*zip(*pts), label="training rollouts", color="tab:blue", linewidth=1.2)
    for key, color in (("eval_reward_mean", "tab:green"), ("eval_reward_mean_sampled", "tab:orange")):
        evals = [(h["step"], h[key]) for h in history if key in h and "step" in h]
        if evals:
            left.plot(*zip(*evals), label=f"held-out ({'greedy' if key.endswith('mean') else 'sampled'})",
                      color=color, marker="o")
    left.set_xlabel("optimizer step")
    left.set_ylabel("mean reward")
    left.set_title(title, fontsize=9)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    if losses:
        right.plot(*zip(*losses), color="tab:red", linewidth=1.0)
    right.set_xlabel("optimizer step")
    right.set_title("GRPO loss", fontsize=9)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluate_grpo(plan, tokenizer, *, progress: bool = True) -> tuple[dict, str]:
    """`archtune evaluate` for rl: grpo: the mean reward of the trained policy (output_dir's weights,
    else the base model) on the held-out prompts, greedy and sampled."""
    from archtune.data.grpo import prepare_grpo_data
    from archtune.train.assembly import assemble_model

    rewards = load_reward_functions(plan)
    data = prepare_grpo_data(plan, tokenizer, progress=progress)
    if data.eval is None:
        raise UserError.single("test_datasets", "there are no held-out prompts", "set test_datasets, or val_set_size > 0")
    policy = assemble_model(plan, tokenizer, "generate")
    values = held_out_rewards(policy.model, tokenizer, data.eval, rewards, list(plan.grpo.reward_weights),
                              Rollouts.of_plan(plan))
    out = {"reward_mean": values["reward_mean"], "reward_mean_sampled": values["reward_mean_sampled"],
           "eval_rows": values["rows"], **{k: v for k, v in values.items() if k.startswith(("rewards/", "completion_"))}}
    return out, policy.weights


__all__ = ["prompt_ids", "step_rows", "GuardedReward", "RewardFailed", "Rollouts", "TIMING_KEYS", "build_trainer", "complete", "evaluate_grpo",
           "grpo_arguments", "held_out_rewards", "load_reward_functions", "plot_grpo", "train_grpo", "trainer_class"]
