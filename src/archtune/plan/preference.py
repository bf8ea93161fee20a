"""The Plan's decisions for preference (`rl`) and reward (`reward_model`) training.

Generic rules: they name no family. Keys keep Axolotl's names and meanings; where Axolotl passes a
key to TRL only when it is set, the default is TRL's and the reason says so.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from archtune.plan.shared import Rule

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import Plan

# TRL's trainer per method (TRL 1.16: ORPO and CPO live in trl.experimental).
TRAINERS = {"dpo": "DPOTrainer", "ipo": "DPOTrainer", "kto": "KTOTrainer", "orpo": "ORPOTrainer",
            "simpo": "CPOTrainer", "reward": "RewardTrainer"}
# Methods that compare the policy with a reference model.
WITH_REFERENCE = ("dpo", "ipo", "kto")
# Keys that belong to one group of methods: set elsewhere they have no effect.
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "dpo_use_weighting": ("dpo", "ipo"), "dpo_label_smoothing": ("dpo",), "dpo_norm_loss": ("dpo",),
    "rpo_alpha": ("dpo",), "dpo_ld_alpha": ("dpo", "ipo"), "orpo_alpha": ("orpo",), "simpo_gamma": ("simpo",), "cpo_alpha": ("simpo",),
    "kto_desirable_weight": ("kto",), "kto_undesirable_weight": ("kto",),
    "center_rewards_coefficient": ("reward",), "num_labels": ("reward",),
}
PAIRED, UNPAIRED, REWARD = "paired", "unpaired", "reward"
# The dataset types each kind of row comes from (data/preference.py reads them).
PREFERENCE_TYPES: dict[str, tuple[str, ...]] = {
    PAIRED: ("chat_template.default", "passthrough.default"),
    UNPAIRED: ("chat_template.default", "passthrough.default"),
    REWARD: ("bradley_terry.chat_template",),
}
NO_PADDING_FREE = ("TRL's preference trainers have no padding-free path (DPOTrainer's padding_free is disabled "
                   "in TRL 1.16, and KTOTrainer, ORPOTrainer, CPOTrainer and RewardTrainer have none), so packed "
                   "pairs cannot be made exact")


def data_kind(cfg) -> str | None:
    """paired / unpaired / reward rows for a preference config, None for supervised fine-tuning."""
    if cfg.reward_model:
        return REWARD
    if cfg.rl == "kto":
        return UNPAIRED
    return PAIRED if cfg.rl and cfg.rl != "grpo" else None


def preference_method(plan: "Plan") -> str | None:
    cfg = plan.config
    if cfg.reward_model:
        return "reward"
    return cfg.rl if cfg.rl != "grpo" else None  # grpo: plan/grpo.py


def _method(plan: "Plan") -> None:
    cfg = plan.config
    if cfg.rl == "grpo":  # online RL: plan/grpo.py decides
        return
    kind = preference_method(plan)
    if cfg.rl and cfg.reward_model:
        plan.error("reward_model", f"reward_model: true and rl: {cfg.rl} are two different trainings",
                   "keep one: remove `rl` to train a reward model, or `reward_model` for preference training")
        return
    for key, methods in METHOD_KEYS.items():
        if getattr(cfg, key) is not None and kind not in methods:
            what = f"rl: {kind}" if kind and kind != "reward" else ("reward_model: true" if kind else "supervised fine-tuning")
            plan.warn(f"{key} has no effect with {what} (it applies to {', '.join(methods)})")
    if kind is None:
        return
    no_chunked_loss(plan, "preference or reward training", "TRL's trainers compute the answers' log-probabilities "
                    "(or the score) themselves (DPO and KTO with their own chunked LM head)")
    plan.set("rl_trainer", TRAINERS[kind], "auto", f"{'reward_model: true' if kind == 'reward' else 'rl: ' + kind} "
             f"trains with TRL's {TRAINERS[kind]}" + (" (loss_type simpo)" if kind == "simpo" else ""))
    if kind == "reward":
        _reward_model(plan)
        return
    _beta(plan, kind)
    if kind in ("dpo", "ipo"):
        loss = ["ipo"] if kind == "ipo" else ["sigmoid_norm" if cfg.dpo_norm_loss else "sigmoid"]
        why = {"ipo": "IPO: DPOTrainer's ipo loss (squared, on length-normalized log-ratios)",
               "sigmoid_norm": "dpo_norm_loss: DPO's sigmoid loss on length-normalized log-ratios",
               "sigmoid": "DPO's sigmoid loss"}[loss[0]]
        if cfg.rpo_alpha:
            loss.append("sft")
            plan.set("rl_loss_weights", [1.0, cfg.rpo_alpha], "auto", "rpo_alpha weighs the added NLL loss (RPO)")
            why += ", plus an NLL loss on the chosen answers (rpo_alpha)"
        plan.set("rl_loss_type", loss, "auto", why)
        if kind == "ipo" and cfg.dpo_label_smoothing:
            plan.error("dpo_label_smoothing", "label smoothing is a DPO option; IPO's loss has none",
                       "remove dpo_label_smoothing, or use rl: dpo")
    if kind == "kto":
        for key in ("kto_desirable_weight", "kto_undesirable_weight"):
            plan.default(key, 1.0, "default", "TRL's default (KTOConfig)")
    if kind == "simpo":
        plan.default("simpo_gamma", 0.5, "default", "TRL's default (CPOConfig)")
        plan.default("cpo_alpha", 1.0, "default", "TRL's default (CPOConfig), which Axolotl keeps; the SimPO paper's "
                     "loss alone is cpo_alpha: 0")
    if kind in WITH_REFERENCE:
        if cfg.adapter:
            plan.set("rl_reference_model", "adapter_disabled", "auto",
                     f"{cfg.adapter}: the reference is the base model with the adapter disabled (no second copy)")
        else:
            plan.set("rl_reference_model", "frozen_copy", "auto",
                     "full fine-tune: the reference is a frozen copy of the starting weights (one more model in memory)")
    else:
        plan.set("rl_reference_model", "none", "auto", f"{kind} compares the policy with no reference model")


def no_chunked_loss(plan: "Plan", training: str, why: str) -> None:
    """chunked_cross_entropy off for a TRL trainer that computes its own log-probabilities (a warning
    when the user asked for it)."""
    if not plan.get("chunked_cross_entropy"):
        return
    if plan.user_set("chunked_cross_entropy"):
        plan.warn(f"chunked_cross_entropy has no effect with {training}: {why}")
    plan.set("chunked_cross_entropy", False, "auto", f"{training}: {why}")


def _beta(plan: "Plan", kind: str) -> None:
    cfg = plan.config
    if plan.get("rl_beta") is not None:
        return
    if kind == "orpo" and cfg.orpo_alpha is not None:
        plan.set("rl_beta", cfg.orpo_alpha, "auto", "ORPO: orpo_alpha is TRL's beta (the odds-ratio loss weight)")
        return
    plan.set("rl_beta", 0.1, "default", f"TRL's default beta ({TRAINERS[kind].replace('Trainer', 'Config')})")


def _reward_model(plan: "Plan") -> None:
    cfg = plan.config
    plan.default("num_labels", 1, "default", "a pairwise (Bradley-Terry) reward model gives one score per sequence")
    if plan.get("num_labels") != 1:
        plan.error("num_labels", f"num_labels is {plan.get('num_labels')}, but TRL's RewardTrainer scores each "
                   "sequence with one number", "set `num_labels: 1` (or remove it)")
    head = sequence_classification_class(plan)
    if head is None:
        plan.error("reward_model", f"transformers has no sequence-classification (score head) class for model_type "
                   f"{plan.model_type!r}, so no reward model can be built from it",
                   "use a base model whose type has one (e.g. Gemma 3, Llama)")
        return
    if head == generic_head_name(plan):
        base = plan.family.sequence_classification_base.rsplit(".", 1)[-1]
        plan.set("reward_head_class", head, "family",
                 f"transformers has no sequence-classification class for {plan.model_type}: archtune builds {head} "
                 f"as transformers builds its siblings' (Gemma 3's, Qwen 3.5's): its generic score head "
                 f"(GenericForSequenceClassification) on {base}, with the same module names as the base model")
    if cfg.load_in_4bit or cfg.load_in_8bit:
        plan.error("reward_model", "a quantized base with a new score head is not built yet",
                   "remove load_in_4bit / load_in_8bit (use adapter: lora) for the reward model")
    plan.set("model_auto_class", "AutoModelForSequenceClassification", "auto",
             f"reward_model: the base model with a one-output score head ({head}), newly initialized")
    plan.set("rl_reference_model", "none", "auto", "a reward model has no reference model")
    if cfg.adapter:
        plan.set("lora_task_type", "SEQ_CLS", "auto", "reward_model: PEFT's sequence-classification model")
        saved = list(plan.get("lora_modules_to_save") or [])
        if "score" not in saved:
            plan.set("lora_modules_to_save", saved + ["score"], "auto",
                     "reward_model with LoRA: the new score head is trained fully and saved with the adapter")


def sequence_classification_class(plan: "Plan") -> str | None:
    """transformers' sequence classification class for the model's type; for a family that declares
    `sequence_classification_base` where transformers has none, the generic head archtune builds
    (models/heads.py); else None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as names

    return names.get(plan.model_type) or generic_head_name(plan)


def generic_head_name(plan: "Plan") -> str | None:
    """The class name of the generic score head built on the family's PreTrainedModel class
    (Gemma4PreTrainedModel -> Gemma4ForSequenceClassification), or None when it declares none."""
    return head_class_name(plan.family.sequence_classification_base)


def head_class_name(base: str) -> str | None:
    """The generic score head's class name for a family's PreTrainedModel path ("" -> None)."""
    return base.rsplit(".", 1)[-1].replace("PreTrainedModel", "ForSequenceClassification") if base else None


# What each kind of row holds (the reason of `preference_rows`).
_ROWS = {PAIRED: "a prompt with a chosen and a rejected answer", UNPAIRED: "a prompt with one answer labelled "
         "desirable or not (pairs are split into two such rows)", REWARD: "a chosen and a rejected conversation"}


def _data_types(plan: "Plan") -> None:
    cfg = plan.config
    if cfg.rl == "grpo":  # prompts, not preference rows: plan/grpo.py
        return
    kind = data_kind(cfg)
    if kind is None:
        plan.set("preference_rows", None, "default", "supervised fine-tuning: the rows are not preference data")
    else:
        what = "reward_model: true" if kind == REWARD else f"rl: {cfg.rl}"
        # A restatement of the user's rl / reward_model (source user), as check shows those keys already.
        plan.set("preference_rows", kind, "user", f"{what} trains on {kind} rows: {_ROWS[kind]}")
    preference_types = {t for types in PREFERENCE_TYPES.values() for t in types}
    for group in ("datasets", "test_datasets"):
        for i, ds in enumerate(getattr(cfg, group) or []):
            key = f"{group}.{i}.type"
            if kind is None and ds.type in preference_types:
                plan.error(key, f"{ds.type} is preference data, but this config trains supervised",
                           "set `rl: dpo` (or ipo, orpo, kto, simpo) for pairs, `reward_model: true` for "
                           "bradley_terry.chat_template, or use type: chat_template for conversations")
            elif kind is not None and ds.type not in PREFERENCE_TYPES[kind]:
                what = "reward_model: true" if kind == "reward" else f"rl: {cfg.rl}"
                plan.error(key, f"{ds.type} rows are not preference data ({what})",
                           f"use type: {' or '.join(PREFERENCE_TYPES[kind])}")


def _packing(plan: "Plan") -> None:
    cfg = plan.config
    if preference_method(plan) is None:
        return
    if cfg.sample_packing:
        plan.error("sample_packing", f"preference training cannot pack rows: {NO_PADDING_FREE}",
                   "set `sample_packing: false`")
    if cfg.dpo_padding_free:
        plan.error("dpo_padding_free", NO_PADDING_FREE, "remove dpo_padding_free")
    if plan.get("fsdp"):
        plan.error("fsdp", "FSDP is not built for preference and reward training yet (DDP is)",
                   "remove `fsdp` and train with DDP (--nproc N)")


PREFERENCE_RULES: tuple[Rule, ...] = (
    Rule("rl_method",
         "`rl: dpo|ipo|kto|orpo|simpo` trains on TRL's DPOTrainer (ipo: loss ipo), KTOTrainer, ORPOTrainer or "
         "CPOTrainer (loss simpo), and `reward_model: true` on RewardTrainer with a one-output score head "
         "(transformers' class for the model type, or its generic head on the base model class a family names "
         "where transformers has none); the reference model is the adapter-disabled base with LoRA and a frozen copy with full fine-tuning.",
         _method),
    Rule("rl_data_types",
         "Preference configs read chat_template.default or passthrough.default rows (`preference_rows`: paired, or "
         "unpaired for KTO), reward models bradley_terry.chat_template rows (reward); preference rows in a "
         "supervised config are refused.",
         _data_types),
    Rule("rl_packing",
         "Preference and reward training refuse `sample_packing` and `dpo_padding_free` (TRL has no exact "
         "padding-free path for pairs) and `fsdp` (not built yet).",
         _packing),
)
