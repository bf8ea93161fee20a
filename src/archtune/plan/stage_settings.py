"""What the model, adapter, distributed and preference stages read from the plan: one typed,
frozen view each (`plan.model`, `plan.adapter`, `plan.distributed`, `plan.preference`,
`plan.grpo`, `plan.export`), beside `plan.data` and `plan.training`.

Each field is a plan entry (as written, a default, or what a rule derived), so `archtune check
--json` shows every value a stage uses, with its reason; no stage looks a setting up by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from archtune.plan.shared import FSDP_LOADING_KEY

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import Plan

LORA_ADAPTERS = ("lora", "qlora")


@dataclass(frozen=True)
class ModelSettings:
    base_model: str
    base_model_config: str | None  # where config.json is read from, when not base_model
    tokenizer_config: str | None  # where the tokenizer and processor are read from, when not base_model
    processor_type: str | None  # the processor class; None: AutoProcessor
    trust_remote_code: bool
    revision: str | None  # model_revision
    four_bit_base: bool  # load_in_4bit or adapter: qlora: the base's linear layers in 4 bits
    bnb_4bit_quant_type: str  # "nf4" unless set
    bnb_4bit_use_double_quant: bool
    bnb_config_kwargs: dict  # BitsAndBytesConfig's own names, as Axolotl passes them
    auto_class: str | None  # model_auto_class: a reward model's sequence-classification class; None: the family's
    num_labels: int | None
    reward_head_class: str | None  # the score head archtune builds where transformers has none
    attn_implementation: str | None
    attn_implementation_user_set: bool  # a default leaves the checkpoint's own choice in place
    experts_implementation: str | None
    document_attention: bool  # packed rows: attention per document
    normalize_weight_scales: tuple  # the weight-scale repair rules ({name_pattern, threshold, ...})
    model_config_overrides: dict  # overrides_of_model_config
    model_kwargs_overrides: dict  # overrides_of_model_kwargs
    unfrozen_parameters: tuple[str, ...]  # full fine-tune of these parameters only (regexes); empty: all
    mm_trainable_modules: tuple[str, ...]  # tower modules that train although the towers are frozen
    activation_offloading: bool
    chunked_cross_entropy: bool
    chunked_cross_entropy_num_chunks: int


@dataclass(frozen=True)
class AdapterSettings:
    kind: str | None  # "lora" | "qlora" | None (a full fine-tune)
    r: int | None
    alpha: int | None
    dropout: float
    target_modules: Any  # a list of names, "all-linear", or a regex (PEFT's target_modules)
    target_parameters: tuple[str, ...]  # expert tensors adapted with PEFT's target_parameters
    modules_to_save: tuple[str, ...]
    model_dir: str | None  # lora_model_dir: an adapter to start from
    task_type: str  # PEFT's task type: CAUSAL_LM, or SEQ_CLS for a reward model

    @property
    def is_lora(self) -> bool:
        return self.kind in LORA_ADAPTERS


@dataclass(frozen=True)
class DistributedSettings:
    fsdp: bool  # FSDP2 (fully_shard) over the decoder layers
    fsdp_offload_params: bool
    fsdp_activation_checkpointing: bool
    fsdp_reshard_after_forward: bool | None  # None: FSDP2's own default
    ddp_find_unused_parameters: bool | None
    fsdp_load_own_shards: bool = False  # each rank reads only the slices of the checkpoint it keeps

    @property
    def strategy(self) -> str:
        return "fsdp2" if self.fsdp else "ddp"


@dataclass(frozen=True)
class PreferenceSettings:
    method: str | None  # rl as decided (dpo, ipo, kto, orpo, simpo, grpo, ...), "reward" for a reward model; None: SFT
    trainer: str | None  # TRL's trainer class name; None: supervised training
    reference_model: str | None  # "adapter_disabled" | "frozen_copy" | "none" | None
    beta: float | None
    loss_type: tuple[str, ...]
    loss_weights: Any
    label_smoothing: float
    use_weighting: bool
    ld_alpha: float | None  # LD-DPO's weight on the longer answer's extra tokens; None: unweighted
    kto_desirable_weight: float | None
    kto_undesirable_weight: float | None
    simpo_gamma: float | None
    cpo_alpha: float | None
    center_rewards_coefficient: float | None
    user_code_dir: str | None  # where your reward functions and transforms are imported from

    @property
    def grpo(self) -> bool:
        return self.trainer == "GRPOTrainer"


@dataclass(frozen=True)
class GrpoSettings:
    """The `trl:` block of `rl: grpo`, as GRPOConfig takes it, and the rollout backend."""
    beta: float
    num_generations: int
    max_completion_length: int
    generation_batch_size: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float | None
    repetition_penalty: float
    generation_kwargs: dict | None
    chat_template_kwargs: dict | None
    loss_type: str
    scale_rewards: Any
    multi_objective_aggregation: str | None
    num_iterations: int
    epsilon: float
    epsilon_high: float
    importance_sampling_level: str
    mask_truncated_completions: bool
    reward_funcs: tuple[str, ...]
    reward_weights: tuple[float, ...]
    log_completions: bool
    num_completions_to_print: int | None
    rollout_backend: str | None
    rollout_seeding: str | None  # "completion": each completion's own seed; "process": the process's RNG
    vllm_server: dict  # vllm_server_host / _port / _timeout as set


@dataclass(frozen=True)
class ExportDefaults:
    """Axolotl's `export:` block: what `archtune export` does when its options are not given."""
    format: str | None
    outtype: str | None
    quantize: tuple[str, ...]
    outfile: str | None


def _tuple(value) -> tuple:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _written(plan: "Plan", key: str, default: Any) -> Any:
    """A key no rule decides: the plan's entry, else the config as written, else `default`."""
    value = plan.get(key)
    if value is None:
        value = getattr(plan.config, key, None)
    return default if value is None else value


def model_settings(plan: "Plan") -> ModelSettings:
    g = plan.get
    return ModelSettings(
        base_model=str(plan.decided("base_model")),
        base_model_config=g("base_model_config") or None,
        tokenizer_config=g("tokenizer_config") or None,
        processor_type=g("processor_type") or None,
        trust_remote_code=bool(g("trust_remote_code")),
        revision=g("model_revision"),
        four_bit_base=bool(g("load_in_4bit")) or g("adapter") == "qlora",
        bnb_4bit_quant_type=str(_written(plan, "bnb_4bit_quant_type", "nf4")),
        bnb_4bit_use_double_quant=bool(_written(plan, "bnb_4bit_use_double_quant", True)),
        bnb_config_kwargs=dict(plan.section("bnb_config_kwargs") or {}),
        auto_class=g("model_auto_class") or None,
        num_labels=g("num_labels"),
        reward_head_class=g("reward_head_class"),
        attn_implementation=g("attn_implementation"),
        attn_implementation_user_set=plan.source("attn_implementation") not in (None, "default"),
        experts_implementation=g("experts_implementation"),
        document_attention=bool(g("document_attention")),
        normalize_weight_scales=_tuple(g("normalize_weight_scales")),
        model_config_overrides=dict(plan.section("overrides_of_model_config") or {}),
        model_kwargs_overrides=dict(plan.section("overrides_of_model_kwargs") or {}),
        unfrozen_parameters=_tuple(g("unfrozen_parameters")),
        mm_trainable_modules=_tuple(g("mm_trainable_modules")),
        activation_offloading=bool(g("activation_offloading")),
        chunked_cross_entropy=bool(g("chunked_cross_entropy")),
        chunked_cross_entropy_num_chunks=int(g("chunked_cross_entropy_num_chunks") or 1),
    )


def adapter_settings(plan: "Plan") -> AdapterSettings:
    g = plan.get
    return AdapterSettings(
        kind=g("adapter") or None,
        r=g("lora_r"),
        alpha=g("lora_alpha"),
        dropout=float(g("lora_dropout") or 0.0),
        target_modules=g("lora_target_modules"),
        target_parameters=_tuple(g("lora_target_parameters")),
        modules_to_save=_tuple(g("lora_modules_to_save")),
        model_dir=g("lora_model_dir") or None,
        task_type=g("lora_task_type") or "CAUSAL_LM",
    )


def distributed_settings(plan: "Plan") -> DistributedSettings:
    g = plan.get
    return DistributedSettings(
        fsdp=bool(g("fsdp")),
        fsdp_offload_params=bool(g("fsdp_config.fsdp_offload_params")),
        fsdp_activation_checkpointing=bool(g("fsdp_config.fsdp_activation_checkpointing")),
        fsdp_reshard_after_forward=g("fsdp_config.fsdp_reshard_after_forward"),
        ddp_find_unused_parameters=g("ddp_find_unused_parameters"),
        fsdp_load_own_shards=bool(g("fsdp")) and bool(g(FSDP_LOADING_KEY)),
    )


def preference_settings(plan: "Plan") -> PreferenceSettings:
    g = plan.get
    return PreferenceSettings(
        method="reward" if g("reward_model") else (str(g("rl")) if g("rl") else None),
        trainer=g("rl_trainer") or None,
        reference_model=g("rl_reference_model"),
        beta=g("rl_beta"),
        loss_type=_tuple(g("rl_loss_type")),
        loss_weights=g("rl_loss_weights"),
        label_smoothing=float(g("dpo_label_smoothing") or 0.0),
        use_weighting=bool(g("dpo_use_weighting")),
        ld_alpha=g("dpo_ld_alpha"),
        kto_desirable_weight=g("kto_desirable_weight"),
        kto_undesirable_weight=g("kto_undesirable_weight"),
        simpo_gamma=g("simpo_gamma"),
        cpo_alpha=g("cpo_alpha"),
        center_rewards_coefficient=g("center_rewards_coefficient"),
        user_code_dir=g("rl_user_code_dir"),
    )


def grpo_settings(plan: "Plan") -> GrpoSettings:
    t = plan.decided  # every trl key GRPOConfig takes is decided for rl: grpo (plan/grpo.py)
    return GrpoSettings(
        beta=float(t("trl.beta")),
        num_generations=int(t("trl.num_generations")),
        max_completion_length=int(t("trl.max_completion_length")),
        generation_batch_size=int(t("trl.generation_batch_size")),
        temperature=float(t("trl.temperature")),
        top_p=float(t("trl.top_p")),
        top_k=int(t("trl.top_k")),
        min_p=t("trl.min_p"),
        repetition_penalty=float(t("trl.repetition_penalty")),
        # dicts: a set one is held key by key (trl.generation_kwargs.top_k), an unset one as None
        generation_kwargs=plan.section("trl.generation_kwargs"),
        chat_template_kwargs=plan.section("trl.chat_template_kwargs"),
        loss_type=t("trl.loss_type"),
        scale_rewards=t("trl.scale_rewards"),
        multi_objective_aggregation=t("trl.multi_objective_aggregation"),
        num_iterations=int(t("trl.num_iterations")),
        epsilon=float(t("trl.epsilon")),
        epsilon_high=float(t("trl.epsilon_high")),
        importance_sampling_level=t("trl.importance_sampling_level"),
        mask_truncated_completions=bool(t("trl.mask_truncated_completions")),
        reward_funcs=_tuple(t("trl.reward_funcs")),
        reward_weights=tuple(float(w) for w in _tuple(t("trl.reward_weights"))),
        log_completions=bool(t("trl.log_completions")),
        num_completions_to_print=t("trl.num_completions_to_print"),
        rollout_backend=plan.get("rl_rollout_backend"),
        rollout_seeding=plan.get("rl_rollout_seeding"),
        vllm_server={key: plan.get(f"trl.{key}") for key in ("vllm_server_host", "vllm_server_port", "vllm_server_timeout")
                     if plan.get(f"trl.{key}") is not None},
    )


def export_defaults(plan: "Plan") -> ExportDefaults:
    g = plan.get
    return ExportDefaults(format=g("export.format"), outtype=g("export.outtype"),
                          quantize=_tuple(g("export.quantize")), outfile=g("export.outfile"))


__all__ = ["AdapterSettings", "DistributedSettings", "ExportDefaults", "GrpoSettings", "LORA_ADAPTERS",
           "ModelSettings", "PreferenceSettings", "adapter_settings", "distributed_settings", "export_defaults",
           "grpo_settings", "model_settings", "preference_settings"]
