"""The config schema: Axolotl's key names and meanings.

Every field carries a description (it is the documentation). Cross-field rules that do
not depend on the model live here; model-dependent decisions live in families/ and plan/.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic_core import PydanticCustomError


def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{pattern!r} is not a valid regular expression ({e})") from None
    return pattern


# The names transformers' add_special_tokens takes for single tokens.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# An import path of the user's own code (`rewards.my_transform`): dotted Python identifiers.
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _import_path(value: str) -> str:
    if not IMPORT_PATH.fullmatch(value):
        raise PydanticCustomError("import_path", "an import path module.function of your own transform (rl: grpo)")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(_Strict):
    path: str = Field(description="Local file or directory (json, jsonl, parquet, csv), or a hub dataset id.")
    type: Literal["alpaca", "chat_template", "completion", "chat_template.default", "passthrough.default",
                  "bradley_terry.chat_template"] | Annotated[str, AfterValidator(_import_path)] = Field(
        "alpaca", description="Prompt format: alpaca (instruction/input/output), chat_template (messages), completion "
        "(text); with `rl`: chat_template.default (messages + chosen/rejected, or completion/label for KTO) or "
        "passthrough.default (prompt/chosen/rejected strings as written); with `reward_model`: "
        "bradley_terry.chat_template (input/chosen/rejected); with `rl: grpo`: the import path of your own transform "
        "(`rewards.my_transform`: module.function, the module found beside the config), or unset for rows that "
        "already hold a `prompt`.")
    data_files: str | list[str] | None = Field(None, description="Files inside `path` to read (as datasets.load_dataset's data_files).")
    split: str = Field("train", description="Split to read.")
    name: str | None = Field(None, description="Dataset config name (hub datasets).")
    ds_type: Literal["json", "parquet", "csv"] | None = Field(None, description="File type when it cannot be told from the extension.")
    # field mappings
    field_instruction: str = Field("instruction", description="alpaca: column holding the instruction.")
    field_input: str = Field("input", description="alpaca: column holding the optional input.")
    field_output: str = Field("output", description="alpaca: column holding the answer.")
    field_messages: str = Field("messages", description="chat_template: column holding the list of messages.")
    message_property_mappings: dict[str, str] = Field(
        default_factory=lambda: {"role": "role", "content": "content"},
        description="chat_template: keys of a message that hold its role and content.")
    roles_to_train: list[str] = Field(default_factory=lambda: ["assistant"], description="chat_template: roles whose turns get loss.")
    train_on_eos: Literal["all", "turn", "last", "none"] = Field(
        "turn", description="chat_template: which end-of-turn tokens get loss: every turn's, also of turns without "
        "loss (all), each trained turn's (turn), only the last trained turn's (last), none.")
    field: str = Field("text", description="completion: column holding the text.")
    # preference data (rl / reward_model)
    field_prompt: str = Field("prompt", description="passthrough.default: column holding the prompt string.")
    field_system: str = Field("system", description="passthrough.default / bradley_terry.chat_template: optional "
                              "column holding a system prompt.")
    field_chosen: str = Field("chosen", description="Preference data: column holding the preferred answer (a string, "
                              "a message, or a list of messages whose last one is the answer).")
    field_rejected: str = Field("rejected", description="Preference data: column holding the dispreferred answer.")
    field_completion: str = Field("completion", description="KTO: column holding the answer that is judged.")
    field_label: str = Field("label", description="KTO: column holding true (desirable answer) or false.")


class WeightScaleRule(_Strict):
    name_pattern: str = Field(description="Regex (search) over parameter names.")
    threshold: float = Field(description="Outlier when std/median > threshold or < 1/threshold; must be > 1.")

    @field_validator("name_pattern")
    @classmethod
    def _is_regex(cls, v: str) -> str:
        return _check_regex(v)

    @field_validator("threshold")
    @classmethod
    def _gt_one(cls, v: float) -> float:
        if v <= 1:
            raise ValueError("threshold must be > 1 (e.g. 1.3)")
        return v

    dry_run: bool = Field(False, description="Report outliers without rescaling them.")


class FsdpConfig(BaseModel):
    """Axolotl's fsdp_config block (FSDP2 is the supported version)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    fsdp_version: Literal[1, 2] = Field(2, description="1 (legacy FSDP) or 2 (fully_shard).")
    fsdp_auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = Field(
        "TRANSFORMER_BASED_WRAP", description="How modules are grouped into FSDP units.")
    fsdp_transformer_layer_cls_to_wrap: str | None = Field(
        None, description="Layer class wrapped as one unit (default: the family's text decoder layer).")
    fsdp_reshard_after_forward: bool = Field(True, description="Free gathered parameters after forward.")
    fsdp_offload_params: bool = Field(False, description="Keep sharded parameters in CPU memory.")
    fsdp_state_dict_type: Literal["SHARDED_STATE_DICT", "FULL_STATE_DICT"] = Field(
        "SHARDED_STATE_DICT", description="Checkpoint format (sharded avoids a full gather per save).")
    fsdp_cpu_ram_efficient_loading: bool | None = Field(
        None, description="No rank holds the full model while loading: each reads only the shards it keeps "
        "(default on for a local safetensors base that is not quantized; false: every rank loads the whole model).")
    fsdp_activation_checkpointing: bool = Field(False, description="Activation checkpointing inside FSDP units.")


class ExportConfig(_Strict):
    """Axolotl 0.21's `export:` block: what `archtune export CONFIG` writes when no flag says otherwise."""

    format: Literal["gguf", "merged", "adapter"] = Field(
        "gguf", description="gguf (llama.cpp, Ollama, LM Studio), merged (safetensors) or adapter (PEFT's files).")
    outtype: Literal["f32", "f16", "bf16", "q8_0", "auto"] | None = Field(
        None, description="Tensor type of the file (default: f16 for gguf, the model's dtype otherwise).")
    quantize: list[str] | None = Field(
        None, description="GGUF only: more files quantized by llama.cpp's quantizer, e.g. [Q4_K_M, Q5_K_M, Q8_0] "
        "(or, as in Axolotl, one comma-separated string; names are upper-cased).")
    outfile: str | None = Field(None, description="Where the file or directory goes (default: OUTPUT_DIR/export/); "
                                "`{ftype}` in a GGUF file name is replaced by each file's weight type.")

    @field_validator("quantize", mode="before")
    @classmethod
    def _quant_names(cls, v: Any) -> Any:
        # Axolotl's spelling: "Q4_K_M,Q8_0" or lower case, the same types.
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, list) and all(isinstance(q, str) for q in v):
            return list(dict.fromkeys(q.strip().upper() for q in v if q.strip()))
        return v


class TrlConfig(_Strict):
    """Axolotl's `trl:` block for `rl: grpo` (TRL's GRPOConfig names and meanings). Unset keys take
    TRL's defaults (`archtune check` shows each with its reason)."""

    # -- what is trained
    reward_funcs: list[str] | None = Field(
        None, description="Your reward functions as import paths (`rewards.accuracy`: module.function, the module "
        "found beside the config); each gets prompts, completions and the row's other columns, returns one float per "
        "completion.")
    reward_weights: list[float] | None = Field(None, description="One weight per reward function (default: all 1.0).")
    beta: float | None = Field(None, ge=0, description="KL coefficient against the starting policy (default 0.0, "
                               "TRL's: no reference model); same as rl_beta.")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] | None = Field(
        None, description="How token losses are averaged: grpo (per sequence, then over sequences), bnpo (over the "
        "tokens of the local batch), dr_grpo (over a constant, max_completion_length: Dr. GRPO), dapo (over the "
        "tokens of the accumulated batch; TRL's default).")
    scale_rewards: bool | Literal["group", "batch", "none"] | None = Field(
        None, description="Divide advantages by the reward spread of each prompt's group (group, true: the "
        "default), of the whole batch (batch), or not at all (none, false: Dr. GRPO).")
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] | None = Field(
        None, description="Several reward functions: weigh and sum, then normalize (default), or normalize each "
        "then sum (GDPO).")
    num_iterations: int | None = Field(None, gt=0, description="Updates per generated batch (GRPO's mu; default 1).")
    epsilon: float | None = Field(None, gt=0, description="Clipping range of the probability ratio (default 0.2).")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clipping bound, when it differs from epsilon "
                                       "(DAPO's clip-higher, e.g. 0.28).")
    importance_sampling_level: Literal["token", "sequence"] | None = Field(
        None, description="Probability ratios per token (GRPO, the default) or one per sequence (GSPO).")
    mask_truncated_completions: bool | None = Field(
        None, description="Leave completions cut at max_completion_length out of the loss (DAPO).")
    # -- rollouts
    num_generations: int | None = Field(None, ge=2, description="Completions sampled per prompt (default 8).")
    generation_batch_size: int | None = Field(
        None, gt=0, description="Completions generated at once (default micro_batch_size x "
        "gradient_accumulation_steps x processes).")
    max_completion_length: int | None = Field(None, gt=0, description="Most tokens per completion (default 512).")
    temperature: float | None = Field(None, gt=0, description="Sampling temperature (default 1.0).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling (default 1.0: off).")
    top_k: int | None = Field(None, ge=0, description="Top-k sampling (default 0: off).")
    min_p: float | None = Field(None, ge=0, le=1, description="Min-p sampling (default off).")
    repetition_penalty: float | None = Field(None, gt=0, description="Repetition penalty (default 1.0: off).")
    generation_kwargs: dict[str, Any] | None = Field(
        None, description="More transformers GenerationConfig arguments for the rollouts.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extra arguments of the chat template for conversational prompts (e.g. "
        "{enable_thinking: false}).")
    use_vllm: bool | None = Field(None, description="Generate rollouts with vLLM (needs vLLM and a CUDA GPU).")
    vllm_mode: Literal["server", "colocate"] | None = Field(None, description="vLLM beside training (colocate) or "
                                                            "a separate `trl vllm-serve` server (server).")
    vllm_server_host: str | None = Field(None, description="vLLM server host (server mode).")
    vllm_server_port: int | None = Field(None, description="vLLM server port (server mode).")
    vllm_server_timeout: int | None = Field(None, description="Seconds to wait for the vLLM server.")
    # -- what a user sees
    log_completions: bool | None = Field(None, description="Print a sample of prompts, completions and rewards at "
                                         "each logging step.")
    num_completions_to_print: int | None = Field(None, gt=0, description="How many completions log_completions "
                                                 "prints.")
    # -- Axolotl keys archtune refuses when set (the plan says why): async rollouts, replay, vLLM-only knobs
    vllm_guided_decoding_regex: str | None = None
    sync_ref_model: bool | None = None
    ref_model_mixup_alpha: float | None = None
    ref_model_sync_steps: int | None = None
    use_liger_loss: bool | None = None
    entropy_coef: float | None = None
    use_adaptive_entropy: bool | None = None
    entropy_target: float | None = None
    entropy_coef_delta: float | None = None
    entropy_coef_min: float | None = None
    entropy_coef_max: float | None = None
    vllm_importance_sampling_clip_min: float | None = None
    vllm_importance_sampling_clip_max: float | None = None
    log_multimodal: bool | None = None
    vllm_enable_sleep_mode: bool | None = None
    rollout_func: str | None = None
    use_data_producer: bool | None = None
    async_prefetch: bool | None = None
    prefetch_depth: int | None = None
    vllm_sync_interval: int | None = None
    streaming_partial_batch: bool | None = None
    streaming_min_groups: int | None = None
    vllm_importance_sampling_correction: bool | None = None
    vllm_importance_sampling_mode: str | None = None
    vllm_importance_sampling_cap: float | None = None
    off_policy_mask_threshold: float | None = None
    use_bias_correction_kl: bool | None = None
    reward_num_workers: int | None = None
    replay_buffer_size: int | None = None
    replay_recompute_logps: bool | None = None
    reroll_start_fraction: float | None = None
    reroll_max_groups: int | None = None
    skip_zero_advantage_batches: bool | None = None
    vllm_lora_sync: bool | None = None
    reward_processing_classes: Any = None


class Config(_Strict):
    """An archtune training config. Unknown keys are errors (with a did-you-mean hint)."""

    # Axolotl keys accepted without effect here, (dotted key, why), set by config.load; `archtune
    # check` prints them (config/axolotl_keys.py has the table).
    _axolotl_notes: list[tuple[str, str]] = PrivateAttr(default_factory=list)

    @property
    def axolotl_notes(self) -> list[tuple[str, str]]:
        return list(self._axolotl_notes)

    # The directory of the config file (set by config.load; None for a config built in memory): your own
    # modules (`trl.reward_funcs`, a dataset `type: module.function`) are found there.
    _source_dir: str | None = PrivateAttr(default=None)

    @property
    def source_dir(self) -> str | None:
        return self._source_dir

    # ---- model
    base_model: str = Field(description="Local directory, hub id, or tiny:NAME (an embedded tiny random model).")
    base_model_config: str | None = Field(None, description="Where to read config.json from, when not base_model.")
    tokenizer_config: str | None = Field(None, description="Where to read the tokenizer from, when not base_model.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Off by default: safe.")
    model_revision: str | None = Field(None, description="Hub revision of the model.")
    overrides_of_model_config: dict[str, Any] | None = Field(
        None, description="Axolotl's `model_config`: values set on the model's config (top-level keys of config.json) "
        "before the model is built, e.g. {rope_theta: 2000000}; the plan reads the overridden config.")
    overrides_of_model_kwargs: dict[str, Any] | None = Field(
        None, description="Axolotl's `model_kwargs`: extra from_pretrained arguments; arguments archtune sets from "
        "its own keys (dtype, quantization, device placement, attention) are refused with the key to use.")
    tokenizer_type: str | None = Field(None, description="transformers tokenizer class to load with (default "
                                       "AutoTokenizer).")
    attn_implementation: str | None = Field(
        None, description="Attention kernel: eager, sdpa, flash_attention_2, flex_attention, ... (the plan says what "
        "runs on this machine; packing stays exact on each).")
    lora_model_dir: str | None = Field(None, description="Start from this trained LoRA adapter (its directory) "
                                       "instead of a new one.")
    unfrozen_parameters: list[str] | None = Field(
        None, description="Full fine-tune of only the parameters matching these regexes (re.match on the name); "
        "every other weight is frozen.")
    bnb_config_kwargs: dict[str, Any] | None = Field(
        None, description="Extra bitsandbytes BitsAndBytesConfig arguments for load_in_4bit (e.g. "
        "bnb_4bit_use_double_quant, bnb_4bit_quant_type).")
    strict: bool | None = Field(None, description="Overrides may only change keys the config file sets.")
    eot_tokens: list[str] | None = Field(
        None, description="Tokens that end a turn; each must be one token of the tokenizer (checked) and gets loss "
        "when it closes a trained turn.")

    # ---- data
    datasets: list[DatasetConfig] = Field(description="Training data sets.")
    test_datasets: list[DatasetConfig] | None = Field(None, description="Evaluation data sets (else a val_set_size split).")
    val_set_size: float = Field(0.0, ge=0, description="Fraction (<1) or row count (>=1) held out for evaluation, chosen by seed.")
    dataset_prepared_path: str | None = Field(None, description="Preprocessing cache directory (default: last_run_prepared).")
    sequence_len: int = Field(2048, gt=0, description="Maximum tokens per row.")
    excess_length_strategy: Literal["drop", "truncate"] = Field("drop", description="What to do with rows longer than sequence_len.")
    strict_data: bool = Field(False, description="Malformed rows are errors (file:line) instead of dropped and counted.")
    sample_packing: bool = Field(False, description="Pack several rows into each sequence_len row (exact: no attention or state across documents).")
    eval_sample_packing: bool | None = Field(None, description="Pack the evaluation data too (default: as sample_packing).")
    train_on_inputs: bool = Field(False, description="Also train on the prompt (false masks it with -100).")
    chat_template: str | None = Field(
        None, description="tokenizer_default (the tokenizer's own, the default), a name (chatml, llama3, gemma3, gemma4, "
        "qwen3, qwen3_5, ...), or a Jinja template string (Axolotl's `chat_template: jinja` + chat_template_jinja).")
    special_tokens: dict[str, str] | None = Field(None, description="Override special tokens (bos_token, eos_token, pad_token, ...).")

    # ---- images (rows whose messages hold image parts)
    processor_type: str | None = Field(
        None, description="transformers processor class for image rows (e.g. AutoProcessor); default: the model's own.")
    image_size: int | list[int] | None = Field(
        None, description="Resize every image to this size (an int: square; [height, width]) before the processor.")
    image_resize_algorithm: Literal["bilinear", "bicubic", "lanczos", "nearest"] | None = Field(
        None, description="Resampling filter for image_size (default bilinear).")

    # ---- adapter
    adapter: Literal["lora", "qlora"] | None = Field(None, description="'lora', 'qlora' (with load_in_4bit), or unset for full fine-tuning.")
    lora_r: int = Field(8, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(16, gt=0, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    lora_target_modules: list[str] | str | None = Field(None, description="Module names (list) or a regex (string, full match).")
    lora_target_linear: bool = Field(False, description="Target every linear layer.")
    lora_target_parameters: list[str] | None = Field(None, description="Parameter tensors (e.g. MoE experts.gate_up_proj) for LoRA.")
    lora_modules_to_save: list[str] | None = Field(None, description="Modules trained fully and saved with the adapter.")

    # ---- model family knobs (None: the family decides; see `archtune check`)
    freeze_mm_modules: bool | None = Field(
        None, description="Freeze vision/audio towers, embedders and projectors (family default: true for multimodal models).")
    normalize_weight_scales: list[WeightScaleRule] | None = Field(
        None, description="Rules that detect (and unless dry_run rescale) tensors whose std drifted from their peers' median.")
    load_in_4bit: bool = Field(False, description="Quantize the base model to 4 bit (QLoRA).")
    load_in_8bit: bool = Field(False, description="Quantize the base model to 8 bit.")
    quantize_moe_experts: bool | None = Field(
        None, description="Store the MoE expert tensors in 4 bit too (NF4); default: on with load_in_4bit for MoE models.")

    # ---- kernels and plugins
    plugins: list[str] | None = Field(None, description="Plugin import paths (archtune's built-ins and Axolotl's KernelsPlugin alias).")
    allow_external_plugins: bool = Field(
        False, description="Allow plugins outside archtune's built-ins (importing a plugin module runs its code).")
    use_kernels: bool = Field(False, description="Use the kernels plugin's implementations.")
    use_scattermoe: bool = Field(False, description="Use the ScatterMoE experts implementation (with use_kernels).")
    experts_implementation: str | None = Field(
        None, description="transformers experts implementation: eager, grouped_mm, batched_mm, scattermoe, or "
                          "scattermoe_triton (the triton extra; a CUDA GPU, or TRITON_INTERPRET=1 on CPU).")

    # ---- loss
    chunked_cross_entropy: bool | None = Field(
        None, description="Compute lm_head and the loss in chunks of tokens, so the [tokens x vocab] logits never exist "
                          "(default: on for vocabularies of 65,536 tokens or more).")
    chunked_cross_entropy_num_chunks: int | None = Field(
        None, gt=0, description="Chunks of label tokens per forward for the chunked cross-entropy (default 8).")
    cut_cross_entropy: bool | None = Field(
        None, description="Axolotl's Cut Cross Entropy: archtune runs its chunked cross-entropy instead.")
    liger_fused_linear_cross_entropy: bool | None = Field(
        None, description="Axolotl's Liger fused linear cross-entropy: archtune runs its chunked cross-entropy instead.")

    # ---- multi-process
    ddp_find_unused_parameters: bool | None = Field(
        None, description="DDP find_unused_parameters (family default: true for Gemma 3/4 multimodal models).")
    ddp_timeout: int = Field(
        1800, gt=0, description="Seconds a collective (a gradient all-reduce, a barrier) waits for the other "
                                "processes before the run fails; a process that makes no progress this long ends "
                                "the run, with a message naming it and what it was doing.")
    activation_offloading: bool = Field(False, description="Offload checkpointed activations to CPU memory.")
    fsdp: list[str] | None = Field(None, description="FSDP options, e.g. [full_shard, auto_wrap].")
    fsdp_config: FsdpConfig | None = Field(None, description="FSDP settings (see FsdpConfig).")

    # ---- preference and reward training (TRL's trainers; Axolotl's keys and meanings)
    rl: Literal["dpo", "ipo", "orpo", "kto", "simpo", "grpo"] | None = Field(
        None, description="Preference training method: dpo, ipo, orpo, kto or simpo; grpo: online RL with your own "
        "reward functions (the `trl:` block); unset: supervised fine-tuning.")
    trl: TrlConfig | None = Field(None, description="`rl: grpo` settings (Axolotl's `trl:` block, TRL's GRPOConfig "
                                  "names).")
    rl_beta: float | None = Field(None, gt=0, description="The method's beta (TRL's; default 0.1): strength of the "
                                  "KL penalty (DPO, IPO, KTO), SimPO's reward scale, ORPO's odds-ratio weight.")
    dpo_use_weighting: bool | None = Field(None, description="DPO: weight each pair by its likelihood (WPO).")
    dpo_label_smoothing: float | None = Field(None, ge=0, lt=0.5, description="DPO: probability that a pair's "
                                              "labels are flipped (robust DPO); not with IPO.")
    dpo_norm_loss: bool | None = Field(None, description="DPO: length-normalized log-probabilities in the loss.")
    dpo_padding_free: bool | None = Field(None, description="DPO: padding-free batches (refused: TRL has none now).")
    rpo_alpha: float | None = Field(None, ge=0, description="DPO: weight of an added NLL loss on the chosen answers "
                                    "(RPO).")
    dpo_ld_alpha: float | None = Field(
        None, ge=0, le=1, description="DPO: LD-DPO's length desensitization, the weight on the log-probabilities of "
        "the tokens an answer has beyond the shorter answer of its pair (1.0: unweighted, 0.0: ignored; TRL's "
        "ld_alpha).")
    orpo_alpha: float | None = Field(None, gt=0, description="ORPO: weight of the odds-ratio loss (TRL's beta; "
                                     "default 0.1).")
    simpo_gamma: float | None = Field(None, ge=0, description="SimPO: target reward margin (default 0.5).")
    cpo_alpha: float | None = Field(None, ge=0, description="SimPO: weight of the NLL (behaviour cloning) loss on "
                                    "the chosen answers (default 1.0, TRL's; 0 is the SimPO paper's loss).")
    kto_desirable_weight: float | None = Field(None, gt=0, description="KTO: loss weight of desirable answers "
                                               "(default 1.0).")
    kto_undesirable_weight: float | None = Field(None, gt=0, description="KTO: loss weight of undesirable answers "
                                                 "(default 1.0).")
    reward_model: bool | None = Field(None, description="Train a reward model (Bradley-Terry, TRL's RewardTrainer) "
                                      "on bradley_terry.chat_template pairs.")
    num_labels: int | None = Field(None, gt=0, description="Outputs of the reward model's score head (1: one reward "
                                   "per sequence, the only value a pairwise reward model takes).")
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Reward model: weight of a penalty that keeps rewards centred on zero (e.g. 0.01).")

    # ---- training
    micro_batch_size: int = Field(1, gt=0, description="Rows per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro batches per optimizer step.")
    num_epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, description="Stop after this many optimizer steps (overrides num_epochs).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    optimizer: str = Field("adamw_torch", description="transformers optimizer name (adamw_torch, sgd, adafactor, ...).")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name (cosine, linear, constant, ...).")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps.")
    warmup_ratio: float | None = Field(None, ge=0, le=1, description="Warmup as a fraction of the steps.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    bf16: bool | Literal["auto"] = Field(False, description="Train in bfloat16 ('auto': when the hardware supports it).")
    fp16: bool | Literal["auto"] = Field(False, description="Train with fp16 mixed precision ('auto': when bf16 is "
                                         "unavailable on a CUDA GPU).")
    seed: int = Field(42, description="Seed for weights of tiny models, data order and the validation split.")
    full_determinism: bool | None = Field(
        None, description="Seed with transformers' enable_full_determinism (deterministic torch algorithms, CUBLAS "
        "workspace config) instead of set_seed: repeatable on a GPU, and slower.")
    gradient_checkpointing: bool | Literal["offload"] = Field(
        False, description="Recompute activations in backward to save memory; 'offload' also keeps the saved "
        "layer inputs in CPU memory (activation_offloading).")
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(None, description="e.g. {use_reentrant: false}.")

    # ---- outputs and logging
    output_dir: str = Field("./outputs/run", description="Where weights, train_summary.json, loss.png and logs go.")
    export: ExportConfig | None = Field(None, description="Axolotl 0.21's export block (see ExportConfig): `archtune export CONFIG` writes and verifies it.")
    save_steps: int | None = Field(None, description="Checkpoint every N steps (default: only at the end).")
    save_total_limit: int | None = Field(None, description="Keep at most N checkpoints.")
    eval_steps: int | None = Field(None, description="Evaluate every N steps (always before the first and after the last).")
    logging_steps: int = Field(1, gt=0, description="Log the training loss every N steps.")
    resume_from_checkpoint: bool | str | None = Field(
        None, description="true: continue from the last complete checkpoint in output_dir; a checkpoint directory; "
                          "'auto': as auto_resume_from_checkpoints.")
    auto_resume_from_checkpoints: bool = Field(
        False, description="Continue from the last complete checkpoint in output_dir when there is one, else start fresh.")
    overwrite_output_dir: bool = Field(
        False, description="Train into an output_dir that holds a finished run or checkpoints (they are moved aside).")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A step whose loss or gradient norm is NaN/Inf: stop the run (keeping the last good "
                            "checkpoint), or skip the step (no weight changes).")
    use_tensorboard: bool = Field(True, description="Write TensorBoard logs to output_dir/runs.")
    use_wandb: bool | None = Field(None, description="Log to Weights & Biases (default: when wandb_project is set).")
    wandb_project: str | None = Field(None, description="Weights & Biases project (logging to W&B when set).")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(None, description="W&B mode.")
    wandb_entity: str | None = Field(None, description="W&B team or user the run is logged under.")
    wandb_name: str | None = Field(None, description="W&B run name.")
    wandb_run_id: str | None = Field(None, description="W&B run id (resumes that run when it exists).")
    wandb_watch: Literal["false", "gradients", "parameters", "all"] | None = Field(
        None, description="W&B model watching (gradients, parameters, all).")
    wandb_log_model: Literal["false", "checkpoint", "end"] | None = Field(
        None, description="Upload checkpoints (checkpoint) or the final model (end) to W&B.")
    use_mlflow: bool | None = Field(None, description="Log to MLflow (default: when mlflow_tracking_uri or "
                                    "mlflow_experiment_name is set).")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking server or local directory (file:...).")
    mlflow_experiment_name: str | None = Field(None, description="MLflow experiment.")
    mlflow_run_name: str | None = Field(None, description="MLflow run name.")
    hf_mlflow_log_artifacts: bool | None = Field(None, description="Also log checkpoints to MLflow as artifacts.")

    # ---- evaluation and checkpoint schedule, optimizer details (transformers' TrainingArguments meanings)
    save_strategy: Literal["no", "steps", "epoch", "best"] | None = Field(
        None, description="When to checkpoint: no, steps (save_steps), epoch (default: steps when save_steps or "
        "saves_per_epoch is set, else only the final weights).")
    saves_per_epoch: int | None = Field(None, gt=0, description="Checkpoint N times per epoch.")
    eval_strategy: Literal["no", "steps", "epoch"] | None = Field(
        None, description="When to evaluate during training: no, steps (eval_steps), epoch.")
    evals_per_epoch: int | None = Field(None, gt=0, description="Evaluate N times per epoch.")
    eval_batch_size: int | None = Field(None, gt=0, description="Rows per device per evaluation batch (default: "
                                        "micro_batch_size).")
    adam_beta1: float | None = Field(None, ge=0, lt=1, description="Adam beta1 (default 0.9).")
    adam_beta2: float | None = Field(None, ge=0, lt=1, description="Adam beta2 (default 0.999).")
    adam_epsilon: float | None = Field(None, gt=0, description="Adam epsilon (default 1e-8).")
    optim_args: str | dict[str, Any] | None = Field(
        None, description="Extra optimizer arguments: `k=v,k=v` or a mapping (transformers' optim_args).")
    lr_scheduler_kwargs: dict[str, Any] | None = Field(None, description="Extra scheduler arguments.")
    cosine_min_lr_ratio: float | None = Field(
        None, ge=0, le=1, description="Cosine schedule that ends at learning_rate * ratio instead of 0.")
    tf32: bool | None = Field(None, description="Allow TF32 matmuls (NVIDIA Ampere or newer; no effect on CPU).")
    torch_compile: bool | Literal["auto"] | None = Field(
        None, description="Compile the model with torch.compile (on CUDA; an info line elsewhere).")
    torch_compile_backend: str | None = Field(None, description="torch.compile backend (default inductor).")
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune"] | None = Field(
        None, description="torch.compile mode.")
    torch_compile_options: dict[str, Any] | None = Field(None, description="Inductor options for torch.compile.")

    # ---- data loading
    dataloader_num_workers: int | None = Field(None, ge=0, description="Data loader worker processes (default 0).")
    dataloader_pin_memory: bool | None = Field(None, description="Pin batches in memory (default: on with CUDA).")
    dataloader_prefetch_factor: int | None = Field(None, gt=0, description="Batches prefetched per worker "
                                                   "(with dataloader_num_workers > 0).")
    dataloader_drop_last: bool | None = Field(None, description="Drop the last incomplete batch of an epoch.")
    remove_unused_columns: bool | None = Field(
        None, description="Drop dataset columns the model does not take (the prepared data holds only model "
        "inputs, so both values train the same).")
    skip_prepare_dataset: bool | None = Field(
        None, description="Tokenize (images and audio with the processor) in memory for this run, without "
        "writing the preprocessing cache.")
    pad_to_sequence_len: bool | None = Field(None, description="Pad every batch to sequence_len (fixed shapes).")
    pad_to_multiple_of: int | None = Field(None, gt=0, description="Pad every batch to a multiple of N tokens.")

    @field_validator("datasets")
    @classmethod
    def _nonempty(cls, v: list[DatasetConfig]) -> list[DatasetConfig]:
        if not v:
            raise ValueError("at least one dataset is needed")
        return v

    @field_validator("special_tokens")
    @classmethod
    def _special_token_names(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for name, token in (v or {}).items():
            if name not in SPECIAL_TOKEN_NAMES:
                raise ValueError(f"{name!r} is not a special token name (use {', '.join(SPECIAL_TOKEN_NAMES)})")
            if not token:
                raise ValueError(f"{name} is empty: give the token's text, e.g. {name}: '<eos>'")
        return v

    @field_validator("overrides_of_model_kwargs")
    @classmethod
    def _own_load_arguments(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        own = [f"{k} (use {OWN_LOAD_ARGUMENTS[k]})" for k in v or {} if k in OWN_LOAD_ARGUMENTS]
        if own:
            raise ValueError("model_kwargs names from_pretrained arguments archtune sets from its own keys: "
                             + "; ".join(own))
        return v

    @field_validator("lora_target_modules")
    @classmethod
    def _target_regex(cls, v: list[str] | str | None) -> list[str] | str | None:
        # A string is a regex (full match): catch a broken one here, not deep inside PEFT.
        return _check_regex(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _cross_field(self) -> "Config":
        broken = cross_field_problems(self)
        if broken:
            # One error carrying every broken rule; each names its key (config.load maps them).
            raise PydanticCustomError(
                "cross_field", "{summary}",
                {"summary": "; ".join(f"{k}: {m}" for k, m, _ in broken), "problems": broken})
        return self


# from_pretrained arguments archtune sets from its own keys (model_kwargs may not name them): the key to use.
OWN_LOAD_ARGUMENTS: dict[str, str] = {
    "dtype": "bf16 / fp16", "torch_dtype": "bf16 / fp16", "quantization_config": "load_in_4bit and bnb_config_kwargs",
    "load_in_4bit": "load_in_4bit", "load_in_8bit": "load_in_8bit", "device_map": "--nproc / fsdp_config",
    "max_memory": "--nproc / fsdp_config", "attn_implementation": "attn_implementation",
    "experts_implementation": "experts_implementation", "trust_remote_code": "trust_remote_code",
    "revision": "model_revision", "config": "model_config", "output_loading_info": "nothing: archtune reads it",
}


# ---- rules between keys
# A rule is data: the key it is reported on, the keys it reads, when it is broken, the
# message and the fix. Config's model validator checks them all; config.load also checks
# them when other keys failed validation (pydantic skips model validators then), so a user
# sees every problem at once. Add cross-field rules here, not as ad-hoc model validators.

@dataclass(frozen=True)
class CrossFieldRule:
    key: str  # the key the problem is reported on
    reads: tuple[str, ...]  # every key `broken` looks at (the rule is skipped if one is invalid)
    broken: Callable[[Any], bool]  # gets the config (or an object with the same attributes)
    message: str
    fix: str


CROSS_FIELD_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        "bf16", ("bf16", "fp16"),
        lambda c: c.bf16 is True and c.fp16 is True,
        "bf16 and fp16 cannot both be true",
        "choose one: set `fp16: false` (bf16 where the hardware supports it) or `bf16: false`"),
    CrossFieldRule(
        "adapter", ("adapter", "lora_target_modules", "lora_target_linear", "lora_target_parameters"),
        lambda c: c.adapter is None and bool(c.lora_target_modules or c.lora_target_linear or c.lora_target_parameters),
        "lora_* targets are set but adapter is not 'lora'",
        "set `adapter: lora`, or remove the lora_target_* keys to fine-tune all weights"),
    CrossFieldRule(
        "warmup_ratio", ("warmup_steps", "warmup_ratio"),
        lambda c: c.warmup_steps is not None and c.warmup_ratio is not None,
        "warmup_steps and warmup_ratio are both set",
        "keep one of them: remove `warmup_ratio` or `warmup_steps`"),
)


def cross_field_problems(cfg: Any, skip: frozenset[str] | set[str] = frozenset()) -> list[tuple[str, str, str]]:
    """(key, message, fix) for each broken rule; rules reading a key in `skip` are not checked."""
    return [(r.key, r.message, r.fix) for r in CROSS_FIELD_RULES
            if not (set(r.reads) & set(skip)) and r.broken(cfg)]
