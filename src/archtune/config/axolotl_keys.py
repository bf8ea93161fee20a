"""Axolotl config keys, so that a key archtune does not support yet is named as such.

The lists hold real keys of Axolotl's config (`src/axolotl/utils/schemas/`, its plugins'
args and a few widely used older keys), read for the names only. Keys that are also
fields of archtune's schema are accepted: config.load computes "unsupported" as
`AXOLOTL_KEYS - Config fields`, so adding a field to the schema is all it takes to
support one. Keeping a supported key here is harmless.
"""
from __future__ import annotations

AXOLOTL_KEYS: frozenset[str] = frozenset({
    # ---- model and tokenizer
    "base_model", "base_model_config", "base_model_ignore_patterns", "cls_model_config",
    "revision_of_model", "model_revision", "tokenizer_config", "tokenizer_type", "tokenizer_use_fast",
    "tokenizer_legacy", "tokenizer_use_mistral_common", "tokenizer_save_jinja_files",
    "processor_type", "processor_kwargs", "model_type", "type_of_model", "trust_remote_code",
    "use_kernels", "model_quantization_config", "model_quantization_config_kwargs",
    "overrides_of_model_config", "overrides_of_model_kwargs", "model_config", "model_kwargs",
    "is_llama_derived_model", "is_mistral_derived_model", "is_falcon_derived_model",
    "is_qwen_derived_model", "resize_token_embeddings_to_32x", "mean_resizing_embeddings",
    "shrink_embeddings", "embeddings_skip_upcast", "reinit_weights", "special_tokens", "tokens",
    "added_tokens_overrides", "fix_untrained_tokens", "device_map", "max_memory",
    "gpu_memory_limit", "low_cpu_mem_usage", "rope_scaling",
    # ---- quantization and adapters
    "load_in_8bit", "load_in_4bit", "gptq", "bnb_config_kwargs", "adapter", "lora_model_dir",
    "lora_r", "lora_alpha", "lora_dropout", "lora_fan_in_fan_out", "lora_target_modules",
    "lora_target_linear", "lora_target_parameters", "lora_modules_to_save", "lora_rank_pattern",
    "lora_alpha_pattern", "lora_on_cpu", "peft", "peft_layers_to_transform", "peft_layers_pattern",
    "peft_use_dora", "peft_use_rslora", "peft_layer_replication", "peft_init_lora_weights",
    "peft_trainable_token_indices", "peft_ensure_weight_tying", "peft_autocast_adapter_dtype",
    "qlora_sharded_model_loading", "loraplus_lr_ratio", "loraplus_lr_embedding", "merge_lora",
    "merge_method", "relora", "relora_steps", "relora_prune_ratio", "relora_cpu_offload",
    "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel",
    "unfrozen_parameters", "freeze_mm_modules", "qat", "quantization",
    # ---- data
    "datasets", "test_datasets", "pretraining_dataset", "val_set_size", "dataset_prepared_path",
    "dataset_processes", "dataset_num_proc", "dataset_shard_num", "dataset_shard_idx",
    "dataset_exact_deduplication", "dataset_keep_in_memory", "skip_prepare_dataset",
    "shuffle_merged_datasets", "shuffle_before_merging_datasets", "push_dataset_to_hub",
    "hf_use_auth_token", "sequence_len", "eval_sequence_len", "excess_length_strategy",
    "min_sample_len", "max_prompt_len", "train_on_inputs", "chat_template", "chat_template_jinja",
    "chat_template_kwargs", "eot_tokens", "default_system_message", "streaming",
    "dataloader_pin_memory", "dataloader_num_workers", "dataloader_prefetch_factor",
    "dataloader_drop_last", "remove_unused_columns", "group_by_length", "curriculum_sampling",
    # ---- packing
    "sample_packing", "eval_sample_packing", "sample_packing_group_size", "sample_packing_bin_size",
    "sample_packing_sequentially", "sample_packing_eff_est", "pad_to_sequence_len",
    "pad_to_multiple_of", "multipack_real_batches", "batch_flattening",
    "pretrain_multipack_buffer_size", "pretrain_multipack_attn", "pretraining_sample_concatenation",
    "max_packed_sequence_len",
    # ---- attention and kernels
    "flash_attention", "sdp_attention", "xformers_attention", "flex_attention", "sage_attention",
    "eager_attention", "attn_implementation", "flash_attn_cross_entropy", "flash_attn_rms_norm",
    "flash_attn_fuse_mlp", "flash_optimum", "s2_attention", "experts_implementation",
    "quantize_moe_experts", "use_scattermoe", "use_sonicmoe", "chunked_cross_entropy",
    "chunked_cross_entropy_num_chunks", "tiled_mlp", "tiled_mlp_num_shards", "cut_cross_entropy",
    "liger_rope", "liger_rms_norm", "liger_glu_activation", "liger_layer_norm", "liger_swiglu",
    "liger_cross_entropy", "liger_fused_linear_cross_entropy", "plugins",
    "torch_compile", "torch_compile_backend", "torch_compile_mode", "torch_compile_options",
    # ---- precision and memory
    "bf16", "fp16", "tf32", "fp8", "bfloat16", "float16", "float32", "fp32_norms",
    "gradient_checkpointing", "gradient_checkpointing_kwargs", "selective_checkpointing",
    "activation_offloading", "layer_offloading",
    # ---- distributed
    "deepspeed", "deepcompile", "fsdp", "fsdp_config", "fsdp_version", "fsdp_final_state_dict_type",
    "ddp", "ddp_timeout", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_find_unused_parameters",
    "dp_shard_size", "dp_replicate_size", "sequence_parallel_degree", "context_parallel_size",
    "tensor_parallel_size", "heads_k_stride", "ring_attn_func", "world_size", "local_rank", "device",
    # ---- hyperparameters
    "micro_batch_size", "gradient_accumulation_steps", "batch_size", "eval_batch_size",
    "auto_find_batch_size", "num_epochs", "max_steps", "learning_rate", "embedding_lr",
    "embedding_lr_scale", "lr_groups", "optimizer", "optim_args", "optim_target_modules",
    "lr_scheduler", "lr_scheduler_kwargs", "lr_quadratic_warmup", "cosine_min_lr_ratio",
    "cosine_constant_lr_ratio", "lr_div_factor", "warmup_steps", "warmup_ratio", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_beta3", "adam_epsilon", "adam_epsilon2", "max_grad_norm",
    "neftune_noise_alpha", "noisy_embedding_alpha", "seed", "jagged_restart_steps",
    "jagged_restart_warmup_steps", "jagged_restart_anneal_steps", "lisa_n_layers",
    "lisa_step_interval", "lisa_layers_attribute", "normalize_weight_scales",
    # ---- RL and distillation
    "rl", "trl", "vllm", "rl_beta", "dpo_beta", "orpo_alpha", "simpo_gamma", "cpo_alpha",
    "kto_desirable_weight", "kto_undesirable_weight", "dpo_use_weighting", "dpo_label_smoothing",
    "precompute_ref_log_probs", "dpo_loss_type", "reward_model", "process_reward_model",
    "center_rewards_coefficient", "num_labels", "kd_trainer", "kd_alpha", "kd_temperature",
    # ---- evaluation, saving, logging
    "output_dir", "hub_model_id", "hub_strategy", "hub_revision", "save_safetensors",
    "save_steps", "saves_per_epoch", "save_strategy", "save_total_limit", "save_first_step",
    "save_only_model", "eval_steps", "evals_per_epoch", "eval_strategy", "evaluation_strategy",
    "eval_table_size", "eval_max_new_tokens", "do_causal_lm_eval", "eval_causal_lm_metrics",
    "do_bench_eval", "bench_dataset", "bench_split", "metric_for_best_model", "greater_is_better",
    "load_best_model_at_end", "early_stopping_patience", "logging_steps", "loss_watchdog_threshold",
    "loss_watchdog_patience", "resume_from_checkpoint", "auto_resume_from_checkpoints",
    "include_tokens_per_second", "profiler_steps", "gc_steps", "torch_empty_cache_steps",
    "use_tensorboard", "use_wandb", "wandb_project", "wandb_entity", "wandb_name", "wandb_run_id",
    "wandb_mode", "wandb_watch", "wandb_log_model", "use_mlflow", "mlflow_tracking_uri",
    "mlflow_experiment_name", "mlflow_run_name", "hf_mlflow_log_artifacts", "use_comet",
    "comet_api_key", "comet_workspace", "comet_project_name", "comet_mode", "use_trackio",
    "trackio_project_name", "use_ray", "ray_num_workers", "generate_samples",
    "num_generation_samples", "strict", "accelerator_config",
    # ---- multimodal
    "image_size", "image_resize_algorithm", "role_boundaries",
})

# Keys of one entry of `datasets` / `test_datasets` in Axolotl (SFT, pretraining, DPO/KTO).
AXOLOTL_DATASET_KEYS: frozenset[str] = frozenset({
    "path", "split", "type", "name", "data_files", "ds_type", "revision", "trust_remote_code",
    "shards", "shards_idx", "preprocess_shards", "input_transform", "conversation",
    "chat_template", "chat_template_jinja", "input_format", "field", "field_human", "field_model",
    "field_messages", "field_tools", "field_thinking", "field_system", "field_instruction",
    "field_input", "field_output", "template_thinking_key", "message_field_role",
    "message_field_content", "message_property_mappings", "message_field_training",
    "message_field_training_detail", "split_thinking", "logprobs_field", "temperature",
    "roles_to_train", "train_on_eos", "train_on_eot", "roles", "drop_system_message",
    "system_prompt", "system_format", "format", "no_input_format", "text_column", "skip",
    "field_prompt", "field_chosen", "field_rejected", "field_completion", "field_label",
    "step_separator", "max_completion_length", "train_on_last_step_only",
})

# What to do instead, for unsupported keys that have an archtune counterpart.
UNSUPPORTED_KEY_HINTS: dict[str, str] = {
    "evals_per_epoch": "use `eval_steps: N` (evaluate every N optimizer steps)",
    "eval_strategy": "use `eval_steps: N`",
    "evaluation_strategy": "use `eval_steps: N`",
    "saves_per_epoch": "use `save_steps: N` (checkpoint every N optimizer steps)",
    "save_strategy": "use `save_steps: N`",
    "use_wandb": "set `wandb_project: NAME` to log to Weights & Biases",
    "model_config": "set `base_model_config` to where config.json is read from",
    "dataset_num_proc": "archtune chooses the number of preprocessing workers",
    "dataset_processes": "archtune chooses the number of preprocessing workers",
    "chat_template_jinja": "put the Jinja template string in `chat_template`",
    "noisy_embedding_alpha": "NEFTune is not supported yet",
    "tokens": "adding new tokens is not supported yet; `special_tokens` overrides the tokenizer's special tokens",
}

# Values of supported keys that Axolotl accepts but archtune does not (yet), with the fix.
# Keyed by the last segment of the key (`type` covers `datasets.N.type`).
UNSUPPORTED_VALUE_HINTS: dict[str, dict[str, str]] = {
    "adapter": {
        "llama-adapter": "use `adapter: lora`",
        "ia3": "use `adapter: lora`",
    },
    "type": {
        "sharegpt": "use `type: chat_template` (Axolotl's replacement for sharegpt); map the fields "
                    "with `field_messages` and `message_property_mappings`",
        "input_output": "use `type: completion` on the whole text, or `type: chat_template`",
        "pretrain": "use `type: completion`",
        "alpaca_chat": "use `type: alpaca`",
        "alpaca_w_system": "use `type: alpaca`",
        "oasst": "use `type: chat_template`",
    },
}
