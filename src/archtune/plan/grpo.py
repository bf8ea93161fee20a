"""The Plan's decisions for online RL: `rl: grpo` and the `trl:` block (TRL's GRPOTrainer).

Generic rules: they name no family (the family rules that shape the model run for GRPO as for
SFT: frozen towers, expert LoRA, use_reentrant, DDP's unused parameters). Keys keep Axolotl's
names and meanings: Axolotl passes a `trl:` key to TRL only when it is set, so an unset key takes
TRL 1.16's default, and its reason says so. Every rollout (generation) setting is recorded here
with its reason: `archtune check` prints them.

GRPO in one paragraph, as TRL computes it: each prompt is completed `num_generations` times by
the policy being trained; each completion gets the weighted sum of the reward functions; its
advantage is its reward minus the mean of its prompt's group, divided by the group's spread
(`scale_rewards`); the loss is the clipped policy-gradient objective of PPO on those advantages
(`epsilon`, `epsilon_high`; per token, or per sequence with `importance_sampling_level: sequence`,
GSPO), plus `beta` times the KL to the starting policy, averaged as `loss_type` says.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from archtune.config.axolotl_keys import REFUSED_TRL
from archtune.plan.shared import Rule
from archtune.plan.preference import no_chunked_loss

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import Plan

GRPO = "grpo"
TRAINER = "GRPOTrainer"
# The dataset types the other trainings read (config.schema's built-in formats).
BUILTIN_TYPES = ("alpaca", "chat_template", "completion", "chat_template.default", "passthrough.default",
                 "bradley_terry.chat_template")

# trl: keys with TRL 1.16's GRPOConfig default, when Axolotl leaves them unset (the value TRL then uses).
TRL_DEFAULTS: dict[str, tuple[Any, str]] = {
    "num_generations": (8, "completions per prompt"),
    "max_completion_length": (512, "tokens per completion at most"),
    "temperature": (1.0, "sampling temperature"),
    "top_p": (1.0, "nucleus sampling off"),
    "top_k": (0, "top-k sampling off"),
    "repetition_penalty": (1.0, "no repetition penalty"),
    "loss_type": ("dapo", "token losses averaged over the tokens of the accumulated batch (no length bias)"),
    "num_iterations": (1, "one update per generated batch (on-policy)"),
    "epsilon": (0.2, "the probability ratio clipped to [1 - 0.2, 1 + epsilon_high]"),
    "importance_sampling_level": ("token", "one probability ratio per token (GRPO); sequence is GSPO"),
    "multi_objective_aggregation": ("sum_then_normalize", "several rewards are weighed and summed, then normalized"),
    "mask_truncated_completions": (False, "completions cut at max_completion_length stay in the loss"),
    "log_completions": (False, "no sample of completions printed"),
}

def is_grpo(plan: "Plan") -> bool:
    return plan.config.rl == GRPO


def _trl_set(plan: "Plan", key: str) -> bool:
    return plan.user_set(f"trl.{key}")


def _method(plan: "Plan") -> None:
    cfg = plan.config
    if not is_grpo(plan):
        if any(plan.user_set(k) for k in plan.settings if k.startswith("trl.")):
            plan.warn("trl: these settings have no effect without `rl: grpo`")
        return
    if cfg.reward_model:
        plan.error("reward_model", "reward_model: true and rl: grpo are two different trainings",
                   "keep one: remove `rl` to train a reward model, or `reward_model` for GRPO")
        return
    plan.set("rl_trainer", TRAINER, "auto", "rl: grpo trains with TRL's GRPOTrainer: completions sampled from the "
             "policy being trained, scored by your reward functions, group-relative advantages, clipped objective")
    for key, (default, why) in TRL_DEFAULTS.items():
        if not _trl_set(plan, key):
            plan.set(f"trl.{key}", default, "default", f"TRL's default (GRPOConfig): {why}")
    _beta(plan)
    _scale_rewards(plan)
    if not _trl_set(plan, "epsilon_high"):
        plan.set("trl.epsilon_high", plan.get("trl.epsilon"), "default",
                 "TRL's default: the upper clipping bound equals epsilon (symmetric clipping; DAPO raises it)")
    elif plan.get("trl.epsilon_high") < plan.get("trl.epsilon"):
        plan.warn(f"trl.epsilon_high ({plan.get('trl.epsilon_high')}) is below trl.epsilon "
                  f"({plan.get('trl.epsilon')}): DAPO's clip-higher raises the upper bound")
    if plan.get("trl.importance_sampling_level") == "sequence" and plan.get("trl.loss_type") != "grpo":
        plan.warn(f"trl.importance_sampling_level: sequence (GSPO) with loss_type {plan.get('trl.loss_type')}: the "
                  "loss sums per-token terms, weighting each sequence by its length; GSPO's paper uses loss_type: grpo")
    _reward_functions(plan)
    for key, (default, why) in REFUSED_TRL.items():
        if _trl_set(plan, key) and plan.get(f"trl.{key}") != default:
            plan.error(f"trl.{key}", f"trl.{key} is not supported: {why}", f"remove trl.{key}")
    no_chunked_loss(plan, "rl: grpo", "TRL computes the completions' log-probabilities with its own chunked LM head")
    plan.set("preference_rows", None, "auto", "rl: grpo reads prompts (and the columns your reward functions read), "
             "not answers: completions are generated during training")
    if cfg.adapter:
        plan.set("rl_reference_model", "adapter_disabled" if plan.get("trl.beta") else "none", "auto",
                 f"{cfg.adapter}: the reference is the base model with the adapter disabled (no second copy)"
                 if plan.get("trl.beta") else "trl.beta is 0: no reference model and no KL term")
    else:
        plan.set("rl_reference_model", "frozen_copy" if plan.get("trl.beta") else "none", "auto",
                 "full fine-tune: the reference is a frozen copy of the starting weights (one more model in memory)"
                 if plan.get("trl.beta") else "trl.beta is 0: no reference model and no KL term")


def _beta(plan: "Plan") -> None:
    rl_beta, beta = plan.get("rl_beta"), plan.get("trl.beta")
    if _trl_set(plan, "beta"):
        if rl_beta is not None and rl_beta != beta:
            plan.error("trl.beta", f"trl.beta ({beta}) and rl_beta ({rl_beta}) differ",
                       "keep one of them (they are the same setting)")
        return
    if rl_beta is not None:
        plan.set("trl.beta", rl_beta, "auto", "rl_beta is trl.beta (Axolotl reads either)")
        return
    plan.set("trl.beta", 0.0, "default", "TRL's default (GRPOConfig): no KL term and no reference model; "
             "DeepSeek-R1 used 0.001")


def _scale_rewards(plan: "Plan") -> None:
    value = plan.get("trl.scale_rewards") if _trl_set(plan, "scale_rewards") else None
    if value is None:
        plan.set("trl.scale_rewards", "group", "default", "Axolotl's default (true): advantages divided by the "
                 "reward spread of each prompt's group")
    elif isinstance(value, bool):
        plan.set("trl.scale_rewards", "group" if value else "none", "user",
                 f"scale_rewards: {str(value).lower()} is {'group' if value else 'none'} (TRL's reading)")


def _reward_functions(plan: "Plan") -> None:
    funcs = plan.get("trl.reward_funcs") or []
    if not funcs:
        plan.error("trl.reward_funcs", "rl: grpo needs at least one reward function",
                   "add `trl: {reward_funcs: [rewards.my_reward]}` with a function in rewards.py beside the config")
        return
    from archtune.config.schema import IMPORT_PATH

    for i, path in enumerate(funcs):
        if not IMPORT_PATH.fullmatch(path):
            plan.error(f"trl.reward_funcs.{i}", f"{path!r} is not an import path module.function",
                       "write it as file_name.function_name (e.g. rewards.accuracy for accuracy() in rewards.py)")
    weights = plan.get("trl.reward_weights")
    if weights is not None and len(weights) != len(funcs):
        plan.error("trl.reward_weights", f"{len(weights)} weights for {len(funcs)} reward functions",
                   "give one weight per reward function (or remove reward_weights: all 1.0)")
    elif weights is None:
        plan.set("trl.reward_weights", [1.0] * len(funcs), "default", "TRL's default: every reward weighs 1.0")
    plan.set("rl_user_code_dir", plan.config.source_dir, "auto",
             "your reward functions and transforms are imported from the config's directory first"
             if plan.config.source_dir else "the config was not read from a file: your modules are imported from "
             "the working directory")


def _rollouts(plan: "Plan") -> None:
    """The rollout settings: batches, backend, generation."""
    if not is_grpo(plan) or plan.get("rl_trainer") != TRAINER:
        return
    t = plan.get
    groups = t("trl.num_generations")
    per_step = t("micro_batch_size") * plan.world_size
    steps = t("gradient_accumulation_steps")
    if _trl_set(plan, "generation_batch_size"):
        batch = t("trl.generation_batch_size")
        if batch % per_step:
            plan.error("trl.generation_batch_size", f"{batch} is not a multiple of micro_batch_size x processes "
                       f"({per_step})", f"set it to a multiple of {per_step}")
            return
        steps = batch // per_step
    else:
        batch = per_step * steps
        plan.set("trl.generation_batch_size", batch, "default",
                 f"TRL's default: micro_batch_size x processes x gradient_accumulation_steps ({per_step} x {steps}) "
                 "completions are generated at once, then trained on in micro-batches")
    if batch % groups:
        import math

        fix_steps = groups * per_step // math.gcd(groups, per_step) // per_step
        plan.error("trl.num_generations", f"the generation batch of {batch} completions is not a multiple of "
                   f"num_generations ({groups}): each prompt's group must be complete",
                   f"set gradient_accumulation_steps: {fix_steps} (or micro_batch_size, or num_generations, so that "
                   f"micro_batch_size x processes x gradient_accumulation_steps is a multiple of {groups})")
    plan.set("rl_prompts_per_generation", batch // groups if batch % groups == 0 else None, "auto",
             f"{batch} completions per generation = {batch // max(groups, 1)} prompts x {groups} generations "
             "(micro_batch_size counts completions, as in TRL)")
    plan.set("rl_steps_per_generation", steps, "auto", f"each generated batch is trained on in {steps} micro-batches")
    if t("trl.use_vllm"):
        _vllm(plan)
    else:
        plan.set("rl_rollout_backend", "transformers", "auto",
                 "rollouts: model.generate of the policy being trained (LoRA enabled, KV cache on, the batch's "
                 "prompts left-padded and generated together), on this process's device")
        for key in ("vllm_mode", "vllm_server_host", "vllm_server_port", "vllm_server_timeout"):
            if _trl_set(plan, key):
                plan.warn(f"trl.{key} has no effect without trl.use_vllm: true")
    _seeding(plan)
    plan.set("rl_generation_cache", True, "auto", "rollouts generate with the KV cache on (use_cache is off only "
             "for the training forward when checkpointing)")
    plan.set("rl_generation_dtype", "the training dtype", "auto",
             "rollouts run in the weights' own dtype (bf16/fp16 mixed precision autocasts as in training)")
    if t("sample_packing"):
        plan.error("sample_packing", "rl: grpo cannot pack rows: TRL's GRPOTrainer pads its generated batches "
                   "(no padding-free path)", "set `sample_packing: false`")
    if plan.get("fsdp"):
        plan.error("fsdp", "FSDP is not built for rl: grpo yet (DDP is): generation would need the full weights "
                   "gathered on every step", "remove `fsdp` and train with DDP (--nproc N)")
    if t("remove_unused_columns"):
        plan.error("remove_unused_columns", "rl: grpo hands your reward functions every column of a row",
                   "remove remove_unused_columns (or set it to false)")


# generation_kwargs that change how generate samples beyond temperature / top-k / top-p / min-p:
# the seeded sampler (train/rollouts.py) does not reproduce them.
OWN_SAMPLING_KWARGS = ("do_sample", "num_beams", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h",
                       "penalty_alpha", "watermarking_config")


def _seeding(plan: "Plan") -> None:
    """Where the rollouts' randomness comes from."""
    if plan.get("rl_rollout_backend") != "transformers":
        plan.set("rl_rollout_seeding", "process", "auto", "vLLM samples with its own random state: 2 processes "
                 "sample other completions than one process with the same global batch")
        return
    own = sorted(set(plan.section("trl.generation_kwargs") or {}) & set(OWN_SAMPLING_KWARGS))
    if own:
        plan.set("rl_rollout_seeding", "process", "auto", f"trl.generation_kwargs sets {', '.join(own)}: generate "
                 "samples the batch from the process's random state, so 2 processes sample other completions than "
                 "one process with the same global batch")
        return
    plan.set("rl_rollout_seeding", "completion", "auto", "each completion is sampled from its own seed (seed, "
             "optimizer step, its row in the step's generation batch over all processes): the same completions on "
             "any number of processes, in any batch, and after a resume")


def _vllm(plan: "Plan") -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        plan.error("trl.use_vllm", "vLLM is not installed here, so rollouts cannot run through it (vLLM needs a "
                   "CUDA GPU and `pip install vllm`)",
                   "remove trl.use_vllm: rollouts then run through transformers on this machine")
        return
    import torch

    if not torch.cuda.is_available():
        plan.error("trl.use_vllm", "vLLM generates on a CUDA GPU, and this machine has none",
                   "remove trl.use_vllm: rollouts then run through transformers on the CPU")
        return
    mode = plan.get("trl.vllm_mode") or "colocate"
    plan.set("rl_rollout_backend", f"vllm_{mode}", "user",
             "rollouts through TRL's vLLM " + ("engine in this process, sharing the GPU (colocate)"
                                               if mode == "colocate" else "server (`trl vllm-serve`, server mode)"))


def _data_types(plan: "Plan") -> None:
    """GRPO rows are prompts: a transform of your own (`type: module.function`) or rows that hold a
    `prompt` already (type unset); a transform's path in another training is refused."""
    cfg = plan.config
    for group in ("datasets", "test_datasets"):
        for i, ds in enumerate(getattr(cfg, group) or []):
            key = f"{group}.{i}.type"
            builtin = ds.type in BUILTIN_TYPES
            if is_grpo(plan):
                if builtin and "type" in ds.model_fields_set:
                    plan.error(key, f"{ds.type} rows are not GRPO prompts (rl: grpo)",
                               "name your own transform (`type: rewards.my_transform`, module.function beside the "
                               "config), or remove `type` for rows that already hold a `prompt` column")
            elif not builtin:
                import difflib

                close = difflib.get_close_matches(ds.type, BUILTIN_TYPES, n=1, cutoff=0.6)
                plan.error(key, f"{ds.type!r} is not a data format; a transform of your own (module.function) is "
                           "read only with rl: grpo",
                           f"did you mean `type: {close[0]}`?" if close else f"use one of: {', '.join(BUILTIN_TYPES)}")


GRPO_RULES: tuple[Rule, ...] = (
    Rule("rl_grpo",
         "`rl: grpo` trains on TRL's GRPOTrainer with your reward functions (`trl.reward_funcs`, import paths found "
         "beside the config); unset `trl:` keys take TRL's defaults (beta 0: no reference; with beta, the "
         "adapter-disabled base, or a frozen copy for full fine-tuning); vLLM-only, asynchronous-rollout and "
         "entropy keys are refused.",
         _method),
    Rule("rl_grpo_rollouts",
         "GRPO rollouts: micro_batch_size x processes x gradient_accumulation_steps completions per generation, a "
         "multiple of num_generations (refused otherwise, with the accumulation that fixes it); generated by the "
         "policy through transformers (KV cache on, each completion sampled from its own seed), through vLLM only "
         "where it is installed on a GPU; packing, "
         "FSDP and remove_unused_columns are refused.",
         _rollouts),
    Rule("rl_grpo_data_types",
         "GRPO datasets name a transform of your own (`type: module.function`) or hold a `prompt` column; a "
         "transform's path is refused outside rl: grpo.",
         _data_types),
)

__all__ = ["BUILTIN_TYPES", "GRPO", "GRPO_RULES", "OWN_SAMPLING_KWARGS", "REFUSED_TRL", "TRAINER", "TRL_DEFAULTS", "is_grpo"]
