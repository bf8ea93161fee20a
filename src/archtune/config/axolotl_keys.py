"""The Axolotl key table: every key of Axolotl's config schema, in exactly one of three classes.

1. honored: a field of archtune's schema (config/schema.py), with Axolotl's meaning; its
   field description is the reason. Nothing is listed here for them.
2. accepted without effect here (NO_EFFECT): the key is read and ignored, and `archtune check`
   prints one info line with the reason below when the config sets it to a value that asks
   for something (true, a number, a name). These are switches for speed, memory, hardware or
   services that change nothing in what is trained.
3. refused (REFUSED): honoring the key would train something other than what archtune trains
   (another objective, other weights, other data); the reason says what archtune does instead.
   Refused only when set to a value that asks for something (`rl: null` is fine).

The list of Axolotl's keys is a data file generated from its schema (axolotl_schema_keys.json,
written by scripts/axolotl_schema_keys.py from the released wheel, with its version and sha256);
tests/unit/test_axolotl_keys.py fails when a key there has no class here or has two.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any, Callable

CLASS_HONORED = "honored"
CLASS_NO_EFFECT = "accepted without effect"
CLASS_REFUSED = "refused"


def _table(*groups: tuple[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for keys, reason in groups:
        for key in keys.split():
            if key in out:
                raise ValueError(f"axolotl_keys.py: {key} is listed twice")
            out[key] = reason
    return out


_CUDA_KERNEL = ("a CUDA/Triton kernel switch: archtune computes the same thing with PyTorch and transformers "
                "(same result, without the kernel's speed or memory saving)")
_LOGGER = "{} logging is not wired into archtune; training logs go to TensorBoard (use_tensorboard), wandb_* or mlflow_*"
_PREPROCESS = "archtune's preprocessing runs in one process and caches by content; this tuning knob has nothing to tune"

# ---------------------------------------------------------------- class 2: accepted, no effect here
NO_EFFECT: dict[str, str] = _table(
    ("lora_mlp_kernel lora_qkv_kernel lora_o_kernel lora_embedding_kernel",
     "Axolotl's fused LoRA Triton kernels (CUDA only): archtune runs LoRA through PEFT, same result"),
    ("flash_attn_cross_entropy flash_attn_fuse_mlp flash_optimum fused_attn_kernel flash_attn_d512 "
     "large_head_attention gemma4_hybrid_attn_impl sdpa_varlen flex_attn_compile_kwargs heads_k_stride "
     "moe_grouped_backend expert_backend use_sonicmoe use_dsv4_kernels fa_varlen_kwargs_in_collator "
     "use_glm_dsa_kernels dsv4_fp8_lora_kernel dsv4_shared_mlp_lora_kernel dsv4_bf16_all dsv4_fp4_grouped_mode "
     "dense_mixer batch_flattening autotune_cache_path autotune_profiles autotune_neighborhood liger_kernel_impl",
     _CUDA_KERNEL),
    ("moe_bnb_fast moe_dequant_chunk_size",
     "which CUDA kernel path Axolotl runs its 4-bit experts through (one fused scatter launch, or chunks of "
     "experts dequantized for grouped_mm): archtune's 4-bit experts (quantize_moe_experts) are dequantized one "
     "expert at a time by scattermoe, the same values with its own memory and speed"),
    ("ple_cpu_offload",
     "Axolotl keeps the parameters a model lists in transformers' `_no_placement_params` in host RAM; none of "
     "archtune's families has any (Gemma 4's per-layer embeddings are not listed, so Axolotl keeps them on the "
     "GPU too), and archtune places the whole model on one device per process: the same weights train, and "
     "only where a table sits in memory would differ"),
    ("cut_cross_entropy_accum_c_fp32 cut_cross_entropy_c_grad_chunk_size",
     "settings of Cut Cross Entropy's Triton kernel: archtune runs its chunked cross-entropy instead "
     "(cut_cross_entropy), whose lm_head gradient follows the training precision"),
    ("torch_compile_regional",
     "regional compilation only shortens torch.compile's start-up: archtune compiles the model whole "
     "(torch_compile), which computes the same values"),
    ("sync_profiler_steps sync_profiler_start_step",
     "the host-device synchronization profiler is not wired in; training is unchanged"),
    ("logging_nan_inf_filter",
     "archtune checks every step's loss for NaN/Inf itself (on_nonfinite: stop or skip), so a non-finite loss "
     "is never averaged away in the logs"),
    ("eval_on_start",
     "archtune always evaluates before the first step when there is evaluation data (eval_loss_initial in "
     "train_summary.json); evaluation changes no weights"),
    ("coreweave", "archtune does not upload weights to a serving endpoint; they stay in output_dir"),
    ("lora_fp32_gradients",
     "archtune's LoRA weights are already float32 under bf16/fp16 training (PEFT's autocast_adapter_dtype), so "
     "their gradients accumulate in float32; the frozen base weights keep their dtype"),
    ("liger_rope liger_rms_norm liger_rms_norm_gated liger_layer_norm liger_swiglu liger_glu_activation "
     "liger_cross_entropy liger_use_token_scaling",
     "Liger's Triton kernels (GPU only) are not used: transformers' own modules and loss compute the same values"),
    ("tiled_mlp tiled_mlp_num_shards tiled_mlp_use_original_mlp",
     "ALST tiled MLP (a memory saving) is not implemented: the MLP runs untiled, same result"),
    ("dataset_processes dataset_num_proc dataset_keep_in_memory num_dataset_shards_to_save preprocess_iterable "
     "sample_packing_mp_start_method sample_packing_group_size sample_packing_bin_size sample_packing_eff_est "
     "multipack_real_batches streaming_multipack_buffer_size pretrain_multipack_buffer_size", _PREPROCESS),
    ("use_comet comet_api_key comet_workspace comet_project_name comet_experiment_key comet_mode comet_online "
     "comet_experiment_config", _LOGGER.format("Comet")),
    ("use_trackio trackio_project_name trackio_run_name trackio_space_id", _LOGGER.format("Trackio")),
    ("use_swanlab swanlab_project swanlab_experiment_name swanlab_description swanlab_mode swanlab_workspace "
     "swanlab_api_key swanlab_log_model swanlab_web_host swanlab_api_host swanlab_lark_webhook_url "
     "swanlab_lark_secret swanlab_log_completions swanlab_completion_log_interval swanlab_completion_max_buffer",
     _LOGGER.format("SwanLab")),
    ("use_otel_metrics otel_metrics_host otel_metrics_port", _LOGGER.format("OpenTelemetry")),
    ("gradio_title gradio_share gradio_server_name gradio_server_port gradio_max_new_tokens gradio_temperature",
     "archtune has no Gradio app; use `archtune generate CONFIG --prompt TEXT`"),
    ("use_ray ray_num_workers ray_run_name resources_per_worker",
     "Ray launching is not supported; launch with `archtune train --nproc N` (torchrun)"),
    ("lm_eval_tasks lm_eval_batch_size lm_eval_post_train lm_eval_model do_bench_eval bench_dataset bench_split "
     "do_causal_lm_eval eval_causal_lm_metrics generate_samples num_generation_samples generation_max_new_tokens "
     "generation_temperature generation_top_k generation_top_p generation_do_sample generation_prompt_ratio "
     "eval_table_size eval_max_new_tokens",
     "extra evaluations (benchmarks, generation metrics, sample tables) are not run; evaluation is the "
     "token-weighted loss (`archtune evaluate`)"),
    ("profiler_steps profiler_steps_start", "the PyTorch profiler is not wired in; training is unchanged"),
    ("gc_steps gc_collect_steps torch_empty_cache_steps",
     "archtune does not schedule garbage collection or cache clearing; memory use may differ, results do not"),
    ("include_tokens_per_second include_tkps",
     "tokens per second are always measured and written to train_summary.json (tokens_per_second)"),
    ("loss_watchdog_threshold loss_watchdog_patience",
     "no loss watchdog: archtune's loss sanity checks report suspicious losses instead"),
    ("dynamic_checkpoint", "file/signal-triggered checkpoints are not supported; save_steps and Ctrl-C (weights "
     "saved to output_dir/interrupted) are"),
    ("device_map max_memory gpu_memory_limit low_cpu_mem_usage lora_on_cpu experimental_skip_move_to_device device",
     "archtune places the model itself (one device per process, or FSDP shards)"),
    ("ddp ddp_bucket_cap_mb ddp_broadcast_buffers",
     "DDP tuning knobs are left at PyTorch's defaults; gradients are the same"),
    ("local_rank world_size",
     "set by the launcher: `archtune train --nproc N` (or torchrun) decides the ranks"),
    ("tokenizer_legacy tokenizer_save_jinja_files tokenizer_use_fast",
     "the tokenizer loads as transformers' AutoTokenizer decides (fast tokenizers); tokenization is unchanged"),
    ("hf_use_auth_token", "hub access uses the standard HF_TOKEN environment variable or `hf auth login`"),
    ("push_dataset_to_hub hub_model_id hub_strategy hub_revision",
     "archtune does not upload to the hub; the weights stay in output_dir"),
    ("is_llama_derived_model is_mistral_derived_model is_falcon_derived_model is_qwen_derived_model "
     "is_preprocess axolotl_config_path total_num_tokens total_supervised_tokens",
     "an Axolotl-internal flag: archtune reads the model family from config.json"),
    ("save_safetensors", "weights are always saved as safetensors"),
    ("merge_method", "`archtune merge-lora` has one merge method (PEFT's merge_and_unload)"),
    ("qlora_sharded_model_loading",
     "model loading is archtune's own (FSDP2 shards after loading); the weights trained are the same"),
    ("gptq", "GPTQ checkpoints load through transformers' own quantizer when the model says so"),
    ("trainer_cls", "archtune runs its own Trainer (a transformers Trainer subclass)"),
    ("accelerator_config", "accelerate is configured by archtune from the plan"),
    ("deepspeed", "DeepSpeed is not used: archtune runs data parallel (DDP) over `archtune train --nproc N`; "
     "ZeRO's sharding saves memory and trains the same weights: to shard, set `fsdp_config: {fsdp_version: 2}`"),
    ("deepcompile", "DeepSpeed is not used (see `deepspeed`)"),
    ("torchdistx_path", "only needed for the adamw_anyprecision optimizer, which archtune does not offer"),
    ("expert_parallel_backend expert_parallel_num_nvl_bytes expert_parallel_num_rdma_bytes "
     "expert_parallel_fallback_on_unsupported expert_parallel_dispatch_chunks expert_parallel_save_dispatch",
     "expert parallelism is not supported (see expert_parallel_size); these tune it"),
    ("dsv4_fp8_nonexpert_mode gemma4_fp8_nonexpert gemma4_nf4_nonexpert nonexpert_quantization "
     "nvfp4_merge_aware nvfp4_merge_aware_start_step",
     "kernels-plugin quantization modes for CUDA GPUs; archtune's quantization is load_in_4bit (bitsandbytes)"),
    ("tokenizer_use_mistral_common", "Mistral's tokenizer library is not used; the model's tokenizer.json is"),
    ("role_boundaries processor_kwargs",
     "not read: image rows use the processor's own defaults and archtune's role masking"),
    ("shuffle_before_merging_datasets shuffle_merged_datasets",
     "datasets are merged and then shuffled by the Trainer's sampler under `seed`"),
    ("embeddings_skip_upcast", "archtune does not upcast the embeddings for PEFT, so there is nothing to skip"),
    ("fsdp_final_state_dict_type", "the final weights are always gathered and saved whole (safetensors)"),
    ("merge_lora", "merging is its own command: `archtune merge-lora CONFIG`"),
    ("model_type type_of_model",
     "archtune loads the family's own model class (e.g. Gemma3ForConditionalGeneration for a multimodal "
     "checkpoint; the same language-model weights train); only causal language-model classes are accepted"),
)

# ---------------------------------------------------------------- class 3: refused (would train something else)
REFUSED: dict[str, str] = _table(
    ("vllm", "the settings of a separate vLLM server (`vllm:` block): archtune's GRPO rollouts run through "
     "transformers, or through TRL's vLLM client with trl.use_vllm where vLLM is installed"),
    ("dpo_beta "
     "dpo_loss_type dpo_loss_weights dpo_use_liger_kernel "
     "dpo_use_logits_to_keep dpo_generate_during_eval precompute_ref_log_probs "
     "max_prompt_len process_reward_model ebft "
     "nemo_gym_enabled nemo_gym_dir nemo_gym_auto_clone nemo_gym_config_paths nemo_gym_head_port "
     "nemo_gym_server_timeout nemo_gym_verify_timeout nemo_gym_run_timeout nemo_gym_datasets nemo_gym_auto_start "
     "nemo_gym_model_name nemo_gym_multi_turn nemo_gym_max_turns hatchery",
     "an RL or preference setting archtune does not run (process reward models, EBFT, NeMo Gym, ...); the "
     "preference and online RL training it offers is set with `rl` (dpo ... grpo) and the `trl:` block"),
    ("kd_trainer kd_ce_alpha kd_alpha kd_temperature kd_beta kd_normalize_topk kd_online_server_base_url "
     "kd_online_topk kd_online_server kd_online_timeout kd_temperature_min",
     "knowledge distillation is not supported: archtune trains on the data's tokens (cross-entropy)"),
    ("diffusion diffusion_lm diffusion_decision",
     "diffusion language-model training is not supported: archtune trains causal next-token loss"),
    ("sequence_parallel_degree context_parallel_size context_parallel ring_attn_func tensor_parallel_size "
     "expert_parallel_size expert_parallel_token_capacity dp_shard_size dp_replicate_size",
     "this parallelism is not supported: archtune runs data parallel (DDP) or FSDP2 over `--nproc N` processes, "
     "each holding whole sequences (a size of 1 is accepted: it splits nothing)"),
    ("relora relora_prune_ratio relora_prune_method relora_cpu_offload jagged_restart_steps "
     "jagged_restart_warmup_steps jagged_restart_anneal_steps",
     "ReLoRA / jagged restarts are not supported: archtune trains one LoRA adapter with one schedule"),
    ("lisa_n_layers lisa_step_interval lisa_layers_attribute",
     "LISA (training random layer subsets) is not supported: archtune trains the adapter or every unfrozen weight"),
    ("spectrum_top_fraction spectrum_model_name",
     "Spectrum layer selection is not supported: use unfrozen_parameters to pick the weights to train"),
    ("mora", "MoRA adapters are not supported: use `adapter: lora`"),
    ("llmcompressor", "LLM Compressor sparsity training is not supported: archtune trains dense weights"),
    ("qat", "quantization-aware training is not supported: archtune trains in the model's precision"),
    ("quantization", "post-training quantization is not run: the trained weights are saved unquantized"),
    ("fp8 fp8_enable_fsdp_float8_all_gather fp8_config",
     "FP8 training is not supported: archtune trains in fp32/bf16/fp16 (bf16/fp16 keys)"),
    ("use_onebitllms", "1.58-bit training is not supported"),
    ("model_quantization_config model_quantization_config_kwargs",
     "quantizing with another config (e.g. FP8) is not supported: use `load_in_4bit: true` (bitsandbytes NF4)"),
    ("use_eaft eaft_alpha eaft_k", "EAFT (entropy-weighted loss) is not supported: the loss is plain cross-entropy"),
    ("use_dft", "DFT (each token's loss weighted by its own probability) is not supported: the loss is plain "
     "cross-entropy"),
    ("mixlora_num_experts mixlora_top_k mixlora_router_aux_loss_coef mixlora_router_init_range mixlora_jitter_noise "
     "mixlora_expert_lora_r mixlora_expert_lora_alpha mixlora_expert_lora_dropout",
     "MixLoRA (LoRA experts behind a router) is not supported: use `adapter: lora`"),
    ("nf4_backend", "torchao's NF4 tensors are not used: archtune's 4-bit weights are bitsandbytes' NF4 "
     "(`nf4_backend: bitsandbytes`, Axolotl's default, is accepted)"),
    ("grokfast_alpha grokfast_lamb", "Grokfast gradient filtering is not supported: gradients are used as computed"),
    ("scaling_softmax scaling_softmax_factor scaling_softmax_bias",
     "scalable-softmax attention changes the model: archtune trains the model's own attention"),
    ("use_pose pose_split_on_token_ids pose_max_context_len pose_num_chunks",
     "PoSE position skipping is not supported: positions are the tokens' real positions"),
    ("llama4_linearized_experts", "a Llama 4 experts rewrite: archtune trains the model's own expert tensors"),
    ("loraplus_lr_ratio loraplus_lr_embedding",
     "LoRA+ (separate learning rates for LoRA B) is not supported: one learning rate for every adapter weight"),
    ("cosine_constant_lr_ratio lr_div_factor lr_quadratic_warmup",
     "Axolotl's own schedule shapes are not offered: use lr_scheduler (cosine, linear, ...) with warmup_steps "
     "and cosine_min_lr_ratio"),
    ("lr_groups embedding_lr embedding_lr_scale",
     "per-group learning rates are not supported: one learning_rate for every trained weight"),
    ("optim_target_modules", "optimizer-specific module selection (GaLore, ...) is not supported"),
    ("dion_lr dion_momentum dion_rank_fraction dion_rank_multiple_of qgalore_rank qgalore_update_proj_gap "
     "qgalore_scale qgalore_proj_type qgalore_proj_quant qgalore_proj_bits qgalore_proj_group_size "
     "qgalore_cos_threshold qgalore_gamma_proj qgalore_queue_size adam_beta3 adam_epsilon2",
     "settings of optimizers archtune does not offer (Dion, Q-GaLore, CAME): choose another optimizer"),
    ("neftune_noise_alpha noisy_embedding_alpha",
     "NEFTune (noise on the embeddings) is not supported: embeddings are trained without noise"),
    ("peft peft_layers_to_transform peft_layers_pattern peft_trainable_token_indices peft_ensure_weight_tying "
     "peft_layer_replication peft_init_lora_weights peft_use_dora peft_use_rslora lora_fan_in_fan_out "
     "lora_rank_pattern lora_alpha_pattern peft_autocast_adapter_dtype",
     "this LoRA variant is not supported: archtune trains plain LoRA (lora_r, lora_alpha, lora_dropout, targets)"),
    ("fix_untrained_tokens tokens added_tokens_overrides resize_token_embeddings_to_32x mean_resizing_embeddings "
     "shrink_embeddings",
     "changing the vocabulary or embedding rows is not supported: the model's embeddings are trained as they are"),
    ("reinit_weights", "training from random weights is refused: archtune fine-tunes the model's weights "
     "(`archtune init-tiny` writes a random tiny model)"),
    ("pretraining_dataset pretraining_sample_concatenation pretrain_multipack_attn streaming",
     "streaming pretraining data is not supported: put text rows in `datasets` with `type: completion`"),
    ("curriculum_sampling sample_packing_sequentially",
     "data order is the Trainer's shuffled sampler under `seed`; sequential order is not supported"),
    ("group_by_length", "length-grouped batches are not supported: rows are batched in shuffled order"),
    ("balance_labels label_balance_window_optim_steps",
     "batches balanced by supervised tokens are not built: rows are batched in shuffled order under `seed`"),
    ("dataset_exact_deduplication", "deduplication is not run: every row of the data is trained on"),
    ("dataset_shard_num dataset_shard_idx", "training on one shard of the data is not supported: all rows are used"),
    ("eval_sequence_len", "evaluation uses sequence_len; a separate evaluation length is not supported"),
    ("min_sample_len", "rows are kept whatever their length (empty rows are dropped)"),
    ("batch_size", "use micro_batch_size and gradient_accumulation_steps (batch_size = their product per process)"),
    ("auto_find_batch_size", "the batch size is micro_batch_size; it is never changed behind your back"),
    ("selective_checkpointing layer_offloading",
     "use gradient_checkpointing (or activation_offloading) instead: these checkpointing variants are not built"),
    ("fp32_norms fp32_norm_classes", "norm layers train in the model's dtype; fp32 norms under FSDP are not built"),
    ("bfloat16 float16 float32",
     "full-precision-cast loading is not supported: use bf16/fp16 (mixed precision) or neither (fp32)"),
    ("xformers_attention sage_attention",
     "this attention kernel is not available: use attn_implementation: sdpa (exact, packing included)"),
    ("s2_attention flash_attn_rms_norm max_packed_sequence_len rope_scaling",
     "removed from Axolotl; refused there too"),
    ("cls_model_config", "the config class comes from config.json's model_type (transformers' AutoConfig)"),
    ("default_system_message", "a default system message changes the prompts: put it in the data's messages"),
    ("early_stopping_patience load_best_model_at_end metric_for_best_model greater_is_better",
     "training always runs to max_steps/num_epochs and saves the final weights (no early stopping or best-model "
     "restore)"),
    ("save_first_step", "checkpoints are written every save_steps and at the end"),
    ("save_only_model", "checkpoints hold the optimizer state too, so they resume exactly"),
    ("chat_template_kwargs", "template arguments (e.g. enable_thinking) are not passed: the template runs with its "
                             "defaults"),
)

# Keys of one `datasets` entry.
DATASET_NO_EFFECT: dict[str, str] = _table(
    ("shards shards_idx preprocess_shards", "training on one shard of a dataset is not supported: all rows are used"),
    ("trust_remote_code", "dataset loading scripts are never run (safe by default); data files are read directly"),
    ("revision", "hub datasets load at their default revision"),
)
DATASET_REFUSED: dict[str, str] = _table(
    ("input_transform conversation input_format field_human field_model",
     "legacy sharegpt/conversation formats: use `type: chat_template` with field_messages and "
     "message_property_mappings"),
    ("field_tools field_thinking template_thinking_key split_thinking logprobs_field temperature",
     "tools, thinking and logprob fields are not passed to the chat template"),
    ("message_field_role message_field_content",
     "use message_property_mappings: {role: ROLE_KEY, content: CONTENT_KEY}"),
    ("message_field_training message_field_training_detail roles drop_system_message chat_template_jinja "
     "chat_template", "per-dataset template and per-message training flags are not supported: the top-level "
     "chat_template and roles_to_train decide what gets loss"),
    ("step_separator max_completion_length train_on_last_step_only "
     "text_column skip length sequence_length min_input_id max_input_id seed min_turns max_turns min_turn_length "
     "input_fraction",
     "fields of preference, reward, pretraining or synthetic datasets, which archtune does not train on"),
    ("train_on_eot", "which end-of-turn tokens get loss is train_on_eos (turn, last, none)"),
    ("weight", "subsampling a dataset for mixing is not supported: every row of every dataset is trained on "
     "(write the subset to its own file)"),
)

# Keys of `fsdp_config` (Axolotl's unprefixed spelling; `fsdp_`-prefixed is the older one, both are read).
FSDP_NO_EFFECT: dict[str, str] = _table(
    # FSDP1 keys older Axolotl configs carry (Axolotl 0.21's schema no longer has these two).
    ("use_orig_params", "FSDP2 (fully_shard) keeps the original parameters; there is nothing to flatten"),
    ("sync_module_states", "every process loads the same weights, so there is nothing to synchronize"),
    ("cpu_offload_pin_memory", "offloaded parameters use PyTorch's default memory"),
    ("mixed_precision_policy", "the precision follows bf16/fp16"),
    ("final_state_dict_type", "the final weights are always gathered and saved whole (safetensors)"),
    ("min_num_params", "only TRANSFORMER_BASED_WRAP is built (one FSDP unit per decoder layer)"),
    # FSDP1 keys older Axolotl/accelerate configs carry; Axolotl's schema drops them silently.
    ("sharding_strategy", "FSDP2 shards parameters, gradients and optimizer state (FULL_SHARD)"),
    ("backward_prefetch forward_prefetch limit_all_gathers", "an FSDP1 prefetch knob; FSDP2 prefetches by itself"),
)
# Keys a table lists that are not in Axolotl's current schema (older spellings it ignores).
LEGACY_KEYS: dict[str, frozenset[str]] = {
    # Axolotl's GRPO trainer reads it, but its TRLConfig does not declare it.
    "trl": frozenset({"reward_processing_classes"}),
    "fsdp_config": frozenset({"sharding_strategy", "backward_prefetch", "forward_prefetch", "limit_all_gathers",
                              "use_orig_params", "sync_module_states"}),
}
FSDP_REFUSED: dict[str, str] = _table()

# Axolotl keys honored by being translated into archtune's own fields (config/axolotl.py), key -> how.
HONORED_ALIASES: dict[str, str] = {
    "fsdp_version": "the version in fsdp_config (an fsdp_config turns FSDP on, as in Axolotl)",
    "flash_attention": "attn_implementation: flash_attention_2",
    "sdp_attention": "attn_implementation: sdpa",
    "flex_attention": "attn_implementation: flex_attention",
    "eager_attention": "attn_implementation: eager",
    "revision_of_model": "model_revision",
    "auto_resume_from_checkpoints": "resume_from_checkpoint: auto",
    "evaluation_strategy": "eval_strategy",
    "model_config": "overrides_of_model_config",
    "model_kwargs": "overrides_of_model_kwargs",
    "chat_template_jinja": "chat_template (the template text, with `chat_template: jinja` or alone)",
}
# Values of class-2 keys that would train something else: key -> (accepted values, regex fullmatch; why not others).
VALUE_REFUSALS: dict[str, tuple[str, str]] = {
    "model_type": (r"\w*(ForCausalLM|ForConditionalGeneration|ForImageTextToText)",
                   "archtune trains causal language models (next-token loss); a classification or other head would "
                   "be a different model (a one-output score head is trained with `reward_model: true`)"),
}
VALUE_REFUSALS["type_of_model"] = VALUE_REFUSALS["model_type"]
# Values accepted besides VALUE_REFUSALS' own when another key is set: key -> (that key, regex fullmatch).
# A reward model is a sequence classifier: Axolotl's reward configs name its class.
VALUES_ACCEPTED_WITH: dict[str, tuple[str, str]] = {
    "model_type": ("reward_model", r"\w*ForSequenceClassification"),
}
VALUES_ACCEPTED_WITH["type_of_model"] = VALUES_ACCEPTED_WITH["model_type"]
# Keys of the `trl:` block (rl: grpo) refused when set to something other than Axolotl's default: key ->
# (that default, what archtune does instead). The plan reports them (plan/grpo.py), because a refused
# key set to its default asks for nothing; every other Axolotl trl key is a TrlConfig field (honored).
REFUSED_TRL: dict[str, tuple[Any, str]] = {
    **{k: (None, "vLLM's own settings; rollouts run through transformers here") for k in (
        "vllm_guided_decoding_regex", "vllm_enable_sleep_mode", "vllm_importance_sampling_correction",
        "vllm_importance_sampling_mode", "vllm_importance_sampling_cap", "vllm_importance_sampling_clip_min",
        "vllm_importance_sampling_clip_max")},
    **{k: (d, "Axolotl's asynchronous rollout producer (background generation, replay buffer, re-rolls, reward "
              "workers) is not built: rollouts are generated, scored and trained on in turn") for k, d in (
        ("use_data_producer", False), ("async_prefetch", False), ("prefetch_depth", None),
        ("vllm_sync_interval", None), ("streaming_partial_batch", None), ("streaming_min_groups", None),
        ("reward_num_workers", 1), ("replay_buffer_size", 0), ("replay_recompute_logps", True),
        ("reroll_start_fraction", 1.0), ("reroll_max_groups", 1), ("skip_zero_advantage_batches", True),
        ("vllm_lora_sync", False), ("off_policy_mask_threshold", None), ("use_bias_correction_kl", None))},
    **{k: (d, "a reference model updated during training is not built: the reference is the starting policy")
       for k, d in (("sync_ref_model", False), ("ref_model_mixup_alpha", 0.9), ("ref_model_sync_steps", 64))},
    **{k: (None, "entropy regularization is not built: the loss is GRPO's clipped objective and its KL term")
       for k in ("entropy_coef", "use_adaptive_entropy", "entropy_target", "entropy_coef_delta", "entropy_coef_min",
                 "entropy_coef_max")},
    "use_liger_loss": (None, "Liger's fused GRPO loss is a CUDA kernel: TRL computes the same loss in chunks"),
    "rollout_func": (None, "custom rollout functions are not built: the policy generates each completion"),
    "log_multimodal": (None, "GRPO here trains on text prompts"),
    "reward_processing_classes": (None, "reward models as reward functions are not built: rewards are your "
                                  "Python functions"),
}
TRL_REFUSED: dict[str, str] = {key: why for key, (_, why) in REFUSED_TRL.items()}
TRL_NO_EFFECT: dict[str, str] = _table()

EXPORT_NO_EFFECT: dict[str, str] = _table(
    ("llama_cpp_dir", "archtune writes GGUF itself and quantizes through llama-cpp-python, so it needs no llama.cpp "
     "checkout and reads no file from there"),
)
EXPORT_REFUSED: dict[str, str] = _table()

# special_tokens: the tokenizer's special-token attributes archtune sets.
SPECIAL_TOKENS_HONORED: frozenset[str] = frozenset({"bos_token", "eos_token", "pad_token", "unk_token"})

SPECIAL_TOKENS_NO_EFFECT: dict[str, str] = _table()
SPECIAL_TOKENS_REFUSED: dict[str, str] = _table(
    ("additional_special_tokens", "adding tokens is not supported: the model's embeddings are trained as they are"),
)


# ---------------------------------------------------------------- the data file

@lru_cache(maxsize=None)
def schema_keys() -> dict[str, Any]:
    """Axolotl's key names (axolotl_schema_keys.json): version, commit, and the key lists."""
    text = resources.files("archtune.config").joinpath("axolotl_schema_keys.json").read_text(encoding="utf-8")
    return json.loads(text)


def axolotl_version() -> str:
    keys = schema_keys()
    return f"{keys['version']} ({keys['wheel']})" if "wheel" in keys else f"{keys['version']} ({keys['commit'][:10]})"


AXOLOTL_KEYS: frozenset[str] = frozenset(schema_keys()["config"])
AXOLOTL_DATASET_KEYS: frozenset[str] = frozenset(schema_keys()["datasets"])
AXOLOTL_FSDP_KEYS: frozenset[str] = frozenset(schema_keys()["fsdp_config"])
AXOLOTL_SPECIAL_TOKENS_KEYS: frozenset[str] = frozenset(schema_keys()["special_tokens"])
AXOLOTL_TRL_KEYS: frozenset[str] = frozenset(schema_keys()["trl"])
AXOLOTL_EXPORT_KEYS: frozenset[str] = frozenset(schema_keys()["export"])

# section -> (Axolotl's keys there, class 2 table, class 3 table)
SECTIONS: dict[str, tuple[frozenset[str], dict[str, str], dict[str, str]]] = {
    "config": (AXOLOTL_KEYS, NO_EFFECT, REFUSED),
    "datasets": (AXOLOTL_DATASET_KEYS, DATASET_NO_EFFECT, DATASET_REFUSED),
    "fsdp_config": (AXOLOTL_FSDP_KEYS, FSDP_NO_EFFECT, FSDP_REFUSED),
    "special_tokens": (AXOLOTL_SPECIAL_TOKENS_KEYS, SPECIAL_TOKENS_NO_EFFECT, SPECIAL_TOKENS_REFUSED),
    "trl": (AXOLOTL_TRL_KEYS, TRL_NO_EFFECT, TRL_REFUSED),
    "export": (AXOLOTL_EXPORT_KEYS, EXPORT_NO_EFFECT, EXPORT_REFUSED),
}


def honored_keys(section: str) -> set[str]:
    """The keys of a section that archtune's schema reads (class 1), in Axolotl's spelling."""
    from archtune.config.schema import Config, DatasetConfig, ExportConfig, FsdpConfig, TrlConfig

    if section == "config":
        return set(Config.model_fields) | set(HONORED_ALIASES)
    if section == "datasets":
        return set(DatasetConfig.model_fields)
    if section == "fsdp_config":
        fields = set(FsdpConfig.model_fields)
        return fields | {f[len("fsdp_"):] for f in fields if f != "fsdp_version"} | {"version"}
    if section == "trl":
        # TrlConfig declares the refused keys too, so that the plan can name them.
        return set(TrlConfig.model_fields) - set(REFUSED_TRL)
    if section == "export":
        return set(ExportConfig.model_fields)
    return set(SPECIAL_TOKENS_HONORED)


def key_classes(section: str) -> dict[str, list[str]]:
    """Every Axolotl key of `section` -> the classes it is in (exactly one when the table is right)."""
    keys, no_effect, refused = SECTIONS[section]
    honored = honored_keys(section)
    return {k: [c for c, table in ((CLASS_HONORED, honored), (CLASS_NO_EFFECT, no_effect), (CLASS_REFUSED, refused))
                if k in table]
            for k in sorted(keys)}


def class_counts() -> dict[str, dict[str, int]]:
    """section -> {class: number of Axolotl keys}."""
    out: dict[str, dict[str, int]] = {}
    for section in SECTIONS:
        counts = {CLASS_HONORED: 0, CLASS_NO_EFFECT: 0, CLASS_REFUSED: 0}
        for classes in key_classes(section).values():
            for c in classes:
                counts[c] += 1
        out[section] = counts
    return out


def _splits_nothing(value: Any) -> bool:
    return type(value) is int and value == 1


# Values of class-2/3 keys that ask for nothing besides null, false, 0 and empty: key -> test.
# A parallel size of 1 splits nothing, so a config that writes it out trains as without it.
ASKS_FOR_NOTHING: dict[str, Callable[[Any], bool]] = {
    **{key: _splits_nothing for key in ("sequence_parallel_degree", "context_parallel_size", "tensor_parallel_size",
                                       "expert_parallel_size", "dp_shard_size", "dp_replicate_size")},
    "context_parallel": lambda v: isinstance(v, dict) and all(v.get(k) is None or _splits_nothing(v.get(k))
                                                              for k in ("size", "ulysses_size", "ring_size")),
    # Axolotl's default NF4 backend is the one archtune uses.
    "nf4_backend": lambda v: v == "bitsandbytes",
}


def asks_for_something(value: Any, key: str | None = None) -> bool:
    """A value that turns something on or names something: not null, false, 0 or empty, nor a value the
    key's ASKS_FOR_NOTHING test accepts."""
    if key in ASKS_FOR_NOTHING and ASKS_FOR_NOTHING[key](value):
        return False
    return value not in (None, False, 0, "", [], {}) and value != "none"


# Values of supported keys that Axolotl accepts but archtune does not (yet), with the fix.
# Keyed by the last segment of the key (`type` covers `datasets.N.type`).
UNSUPPORTED_VALUE_HINTS: dict[str, dict[str, str]] = {
    "adapter": {
        "llama-adapter": "use `adapter: lora`",
        "ia3": "use `adapter: lora`",
    },
    "type": {
        "bradley_terry.chat_template": "this is a reward-model dataset (reward_model: true), and reward modelling is "
                                       "not SFT: training it as `chat_template` would learn the chosen text instead "
                                       "of a reward; archtune does not train reward models",
        "sharegpt": "use `type: chat_template` (Axolotl's replacement for sharegpt); map the fields "
                    "with `field_messages` and `message_property_mappings`",
        "input_output": "use `type: completion` on the whole text, or `type: chat_template`",
        "pretrain": "use `type: completion`",
        "alpaca_chat": "use `type: alpaca`",
        "alpaca_w_system": "use `type: alpaca`",
        "oasst": "use `type: chat_template`",
    },
}
