"""config.load: YAML + overrides -> Config, and every kind of user error it reports."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from archtune.config import (
    Config,
    DatasetConfig,
    config_from_dict,
    config_to_dict,
    flatten,
    load_config,
    parse_override,
)
from archtune.config import load as load_mod
from archtune.config import problems as problems_mod
from archtune.config.axolotl_keys import AXOLOTL_DATASET_KEYS, AXOLOTL_KEYS
from archtune.errors import Problem, UserError

MINIMAL = """\
base_model: tiny:llama
datasets:
  - path: data.jsonl
    type: alpaca
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def problems_of(path: Path, overrides: list[str] = ()) -> list[Problem]:
    with pytest.raises(UserError) as ei:
        load_config(path, overrides)
    assert ei.value.problems, "a UserError must carry at least one problem"
    return ei.value.problems


def by_key(problems: list[Problem]) -> dict[str, Problem]:
    return {p.key: p for p in problems}


# ---------------------------------------------------------------- valid configs

def test_minimal_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert isinstance(cfg, Config)
    assert cfg.base_model == "tiny:llama"
    assert isinstance(cfg.datasets[0], DatasetConfig)
    assert cfg.datasets[0].path == "data.jsonl"
    assert cfg.lora_r == 8 and cfg.sequence_len == 2048 and cfg.trust_remote_code is False


def test_roundtrip_through_dict_and_yaml(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + """\
adapter: lora
lora_r: 16
lora_target_modules: ".*\\\\.(q|v)_proj"
learning_rate: 1e-4
bf16: auto
gradient_checkpointing: true
gradient_checkpointing_kwargs: {use_reentrant: false}
special_tokens: {pad_token: "<pad>"}
"""))
    assert cfg.learning_rate == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as text; pydantic converts it
    assert cfg.lora_target_modules == r".*\.(q|v)_proj"
    d = config_to_dict(cfg)
    assert set(d) == set(Config.model_fields)  # nothing excluded, defaults included
    again = load_config(write(tmp_path, yaml.safe_dump(d), "again.yaml"))
    assert again == cfg
    assert config_to_dict(again) == d


def test_axolotl_key_that_is_a_schema_field_is_accepted(tmp_path, monkeypatch):
    shared = sorted(AXOLOTL_KEYS & set(Config.model_fields))
    assert {"lora_r", "sequence_len", "bf16", "datasets"} <= set(shared)
    # "unsupported" is computed against the schema, so a key listed both ways is simply a field
    monkeypatch.setattr(problems_mod, "AXOLOTL_KEYS", AXOLOTL_KEYS | {"lora_r"})
    cfg = load_config(write(tmp_path, MINIMAL + "lora_r: 4\nsequence_len: 512\n"))
    assert (cfg.lora_r, cfg.sequence_len) == (4, 512)


def test_config_from_dict_does_not_modify_its_input():
    data = {"base_model": "tiny:llama", "datasets": [{"path": "a.jsonl"}]}
    cfg = config_from_dict(data, ["datasets.0.path=b.jsonl", "max_steps=3"])
    assert cfg.datasets[0].path == "b.jsonl" and cfg.max_steps == 3
    assert data == {"base_model": "tiny:llama", "datasets": [{"path": "a.jsonl"}]}


# ---------------------------------------------------------------- unknown and unsupported keys

@pytest.mark.parametrize("text, key, suggestion", [
    ("lerning_rate: 0.001\n", "lerning_rate", "learning_rate"),
    ("micro_batchsize: 2\n", "micro_batchsize", "micro_batch_size"),
    ("Sequence_Len: 512\n", "Sequence_Len", "sequence_len"),
    ("gradient_acumulation_steps: 4\n", "gradient_acumulation_steps", "gradient_accumulation_steps"),
])
def test_typo_at_top_level_gets_did_you_mean(tmp_path, text, key, suggestion):
    (p,) = problems_of(write(tmp_path, MINIMAL + text))
    assert p.key == key
    assert f"unknown key `{key}`" in p.message
    assert "cfg.yaml:5" in p.message  # where it is in the file
    assert f"did you mean `{suggestion}`?" in p.fix


def test_typo_inside_a_dataset_entry(tmp_path):
    (p,) = problems_of(write(tmp_path, MINIMAL + "    feild_messages: conversations\n"))
    assert p.key == "datasets.0.feild_messages"
    assert "did you mean `field_messages`" in p.fix


def test_unknown_key_without_close_match(tmp_path):
    (p,) = problems_of(write(tmp_path, MINIMAL + "zzqx_frobnicate: 1\n"))
    assert p.key == "zzqx_frobnicate"
    assert "did you mean" not in p.fix and "remove it" in p.fix


@pytest.mark.parametrize("key, value, words", [
("lisa_n_layers", "4", "unfrozen weight"),
    ("peft_use_dora", "true", "plain LoRA"), ("neftune_noise_alpha", "5", "without noise"),
    # new in Axolotl 0.21
    ("context_parallel_size", "2", "whole sequences"), ("tensor_parallel_size", "2", "whole sequences"),
    ("use_dft", "true", "plain cross-entropy"), ("mixlora_num_experts", "4", "adapter: lora"),
    ("nf4_backend", "torchao", "bitsandbytes"), ("balance_labels", "true", "shuffled order"),
])
def test_refused_axolotl_key_names_what_archtune_does_instead(tmp_path, key, value, words):
    (p,) = problems_of(write(tmp_path, MINIMAL + f"{key}: {value}\n"))
    assert p.key == key
    assert p.message.startswith(f"`{key}: {value}` is refused:") and words in p.message
    assert "cfg.yaml:5" in p.message and f"remove `{key}`" in p.fix


@pytest.mark.parametrize("text", ["relora:\n", "rl: null\n", "peft_use_dora: false\n"])
def test_refused_key_left_empty_or_off_is_accepted(tmp_path, text):
    cfg = load_config(write(tmp_path, MINIMAL + text))
    assert cfg.axolotl_notes == []


@pytest.mark.parametrize("text", ["context_parallel_size: 1\n", "tensor_parallel_size: 1\n",
                                  "sequence_parallel_degree: 1\n", "context_parallel:\n  size: 1\n  backend: ring\n",
                                  "nf4_backend: bitsandbytes\n"])
def test_values_that_ask_for_nothing_are_accepted_without_a_note(tmp_path, text):
    """A parallel size of 1 splits nothing; bitsandbytes is the NF4 backend archtune uses."""
    assert load_config(write(tmp_path, MINIMAL + text)).axolotl_notes == []


@pytest.mark.parametrize("text, key, words", [
    ("context_parallel:\n  size: 2\n", "context_parallel", "whole sequences"),
    ("    weight: 0.5\n", "datasets.0.weight", "every row"),
])
def test_refused_blocks_and_dataset_keys_new_in_axolotl_0_21(tmp_path, text, key, words):
    (p,) = problems_of(write(tmp_path, MINIMAL + text))
    assert p.key == key and "is refused" in p.message and words in p.message


def test_axolotl_0_21_keys_without_effect_say_why(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "ple_cpu_offload: true\nmoe_bnb_fast: true\n"
                            "export:\n  format: gguf\n  llama_cpp_dir: /opt/llama.cpp\n"))
    notes = dict(cfg.axolotl_notes)
    assert "_no_placement_params" in notes["ple_cpu_offload"] and "scattermoe" in notes["moe_bnb_fast"]
    assert "llama-cpp-python" in notes["export.llama_cpp_dir"] and cfg.export.format == "gguf"


def test_no_effect_keys_are_accepted_with_a_note_only_when_they_ask_for_something(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "lora_mlp_kernel: true\nlora_qkv_kernel: false\nuse_comet: true\n"
                            "model_type: AutoModelForCausalLM\n"))
    notes = dict(cfg.axolotl_notes)
    assert set(notes) == {"lora_mlp_kernel", "use_comet", "model_type"}
    assert "PEFT" in notes["lora_mlp_kernel"] and "Comet" in notes["use_comet"]
    # DeepSpeed's ZeRO trains the same weights as DDP: accepted with a note that says how to shard.
    notes = dict(load_config(write(tmp_path, MINIMAL + "deepspeed: deepspeed_configs/zero1.json\n")).axolotl_notes)
    assert "fsdp_version: 2" in notes["deepspeed"]


@pytest.mark.parametrize("key", ["model_type", "type_of_model"])
def test_sequence_classification_class_is_accepted_only_for_a_reward_model(tmp_path, key):
    """Axolotl's reward-model configs name the classifier class; elsewhere it would be another model."""
    line = f"{key}: AutoModelForSequenceClassification\n"
    cfg = load_config(write(tmp_path, MINIMAL + "reward_model: true\n" + line))
    assert cfg.reward_model is True and key in dict(cfg.axolotl_notes)
    (p,) = problems_of(write(tmp_path, MINIMAL + line))
    assert p.key == key and "is refused" in p.message and "reward_model: true" in p.message
    (p,) = problems_of(write(tmp_path, MINIMAL + "reward_model: true\n" + f"{key}: AutoModelForTokenClassification\n"))
    assert p.key == key


def test_refused_dataset_key_is_named(tmp_path):
    (p,) = problems_of(write(tmp_path, MINIMAL + "    conversation: chatml\n"))
    assert p.key == "datasets.0.conversation"
    assert "is refused" in p.message and "type: chat_template" in p.message


def test_empty_values_mean_unset(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "wandb_entity:\nwandb_project:\nlora_model_dir:\nval_set_size:\n"
                            "special_tokens:\nresume_from_checkpoint:\n"))
    assert cfg.wandb_entity is None and cfg.val_set_size == 0.0 and cfg.axolotl_notes == []
    assert "wandb_entity" not in cfg.model_fields_set


def test_axolotl_spellings_of_honored_keys(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "flash_attention: true\nrevision_of_model: main\n"
                            "auto_resume_from_checkpoints: true\nevaluation_strategy: steps\n"))
    assert cfg.attn_implementation == "flash_attention_2" and cfg.model_revision == "main"
    assert cfg.resume_from_checkpoint == "auto" and cfg.eval_strategy == "steps"


def test_fsdp_config_is_read_in_both_spellings(tmp_path):
    new = load_config(write(tmp_path, MINIMAL + "fsdp_version: 2\nfsdp_config:\n  offload_params: true\n"
                            "  transformer_layer_cls_to_wrap: LlamaDecoderLayer\n  state_dict_type: FULL_STATE_DICT\n"
                            "  use_orig_params: true\n"))
    old = load_config(write(tmp_path, MINIMAL + "fsdp_config:\n  fsdp_version: 2\n  fsdp_offload_params: true\n"
                            "  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer\n"
                            "  fsdp_state_dict_type: FULL_STATE_DICT\n  fsdp_use_orig_params: true\n", "old.yaml"))
    assert new.fsdp_config == old.fsdp_config
    assert new.fsdp_config.fsdp_offload_params and new.fsdp_config.fsdp_version == 2
    assert [k for k, _ in new.axolotl_notes] == ["fsdp_config.use_orig_params"]
    assert [k for k, _ in old.axolotl_notes] == ["fsdp_config.fsdp_use_orig_params"]


def test_a_typo_is_never_answered_with_a_key_of_another_meaning(tmp_path):
    (p,) = problems_of(write(tmp_path, MINIMAL + "fsdp_config:\n  fsdp_use_orig_param: true\n"))
    assert "offload" not in p.fix


def test_strict_refuses_overrides_of_keys_the_file_does_not_set(tmp_path):
    path = write(tmp_path, MINIMAL + "strict: true\nlora_r: 4\n")
    assert load_config(path, ["lora_r=8"]).lora_r == 8
    (p,) = problems_of(path, ["lora_alpha=8"])
    assert p.key == "lora_alpha" and "strict" in p.message
    assert load_config(write(tmp_path, MINIMAL + "strict: false\n", "b.yaml"), ["lora_alpha=8"]).lora_alpha == 8


# ---------------------------------------------------------------- YAML and file problems

@pytest.mark.parametrize("text, line, fix_words", [
    # a dataset key indented one space too far
    ("base_model: x\ndatasets:\n  - path: a\n   type: alpaca\nlora_r: 4\n", 4, "indentation"),
    # a value holding ': '
    ("base_model: x\nchat_template: role: user\nlora_r: 4\n", 2, "quote"),
    # a tab used for indentation
    ("base_model: x\ndatasets:\n\t- path: a\n", 3, "tabs"),
    # a key without a colon
    ("base_model: x\nsequence_len\nlora_r: 4\n", 2, "key: value"),
    # a quote opened and never closed
    ("base_model: x\nchat_template: 'abc\nlora_r: 4\nseed: 1\n", 2, "close the quote"),
    # a flow list never closed
    ("base_model: x\nlora_target_modules: [q_proj, v_proj\nlora_r: 4\n", 2, "close the list"),
])
def test_yaml_syntax_error_names_file_and_line(tmp_path, text, line, fix_words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    (p,) = problems_of(path)
    assert p.key == f"{path}:{line}"
    assert "YAML syntax error" in p.message
    assert fix_words in p.fix


def test_duplicate_key_is_an_error_with_both_lines(tmp_path):
    path = write(tmp_path, MINIMAL + "lora_r: 4\nseed: 1\nlora_r: 8\n")
    (p,) = problems_of(path)
    assert p.key == f"{path}:7"
    assert "duplicate key `lora_r`" in p.message and "line 5" in p.message


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"
    (p,) = problems_of(path)
    assert p.key == str(path) and "not found" in p.message


def test_directory_is_not_a_config(tmp_path):
    (p,) = problems_of(tmp_path)
    assert p.key == str(tmp_path) and "directory" in p.message


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "a list"), ("just text\n", "the text 'just text'")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    (p,) = problems_of(path)
    assert p.key == str(path)
    assert "must be a mapping" in p.message and kind in p.message


def test_empty_file_reports_both_required_keys(tmp_path):
    found = by_key(problems_of(write(tmp_path, "# nothing yet\n")))
    assert set(found) == {"base_model", "datasets"}
    for p in found.values():
        assert p.message == "required key missing"
    assert "base_model:" in found["base_model"].fix
    assert "datasets:" in found["datasets"].fix and "path:" in found["datasets"].fix


def test_missing_dataset_path(tmp_path):
    (p,) = problems_of(write(tmp_path, "base_model: x\ndatasets:\n  - type: alpaca\n"))
    assert p.key == "datasets.0.path"
    assert p.message.startswith("required key missing") and "cfg.yaml:3" in p.message
    assert "path:" in p.fix


# ---------------------------------------------------------------- values

@pytest.mark.parametrize("text, key, message, fix_words", [
    ("    type: sharegpt\n", "datasets.0.type",
     "must be one of alpaca, chat_template, completion, chat_template.default, passthrough.default, bradley_terry.chat_template or an import path module.function of your own transform (rl: grpo); got 'sharegpt'", "chat_template"),
    ("    type: completon\n", "datasets.0.type",
     "must be one of alpaca, chat_template, completion, chat_template.default, passthrough.default, bradley_terry.chat_template or an import path module.function of your own transform (rl: grpo); got 'completon'",
     "did you mean `type: completion`?"),
    ("excess_length_strategy: trim\n", "excess_length_strategy", "must be drop or truncate; got 'trim'", "use one of"),
    ("lora_r: 0\n", "lora_r", "must be greater than 0; got 0", "default: 8"),
    ("lora_r: ten\n", "lora_r", "must be a whole number; got 'ten'", "LoRA rank"),
    ("lora_dropout: 1.5\n", "lora_dropout", "must be less than 1; got 1.5", "lora_dropout"),
    ("bf16: maybe\n", "bf16", "must be one of true, false, auto; got 'maybe'", "true, false, auto"),
    ("fp16: maybe\n", "fp16", "must be one of true, false, auto; got 'maybe'", "true, false, auto"),
    ("base_model_config: 123\n", "base_model_config", "must be text; got 123", "quote it"),
    ("lora_target_modules: 5\n", "lora_target_modules", "must be a list or text; got 5", "regex"),
    ("lora_target_modules: '(q_proj'\n", "lora_target_modules", "not a valid regular expression", "regex"),
    ("datasets: []\n", "datasets", "at least one dataset is needed", "Training data sets"),
])
def test_bad_value_names_its_key(tmp_path, text, key, message, fix_words):
    base = "base_model: x\n" if text.startswith("datasets:") else MINIMAL
    if text.startswith("    type:"):
        base = MINIMAL.replace("    type: alpaca\n", "")
    (p,) = problems_of(write(tmp_path, base + text))
    assert p.key == key
    assert message in p.message
    assert fix_words in p.fix


def test_adapter_value_from_axolotl_is_named(tmp_path):
    (p,) = problems_of(write(tmp_path, MINIMAL + "adapter: ia3\n"))
    assert p.key == "adapter"
    assert "Axolotl value that archtune does not support yet" in p.message
    assert "adapter: lora" in p.fix


def test_union_reports_the_member_the_input_looks_like(tmp_path):
    # data_files is text or a list of text: a list with a number in it is wrong at item 1
    (p,) = problems_of(write(tmp_path, MINIMAL + "    data_files: [a.jsonl, 5]\n"))
    assert p.key == "datasets.0.data_files.1"
    assert "must be text; got 5" in p.message


def test_non_text_key(tmp_path):
    (p,) = problems_of(write(tmp_path, MINIMAL + "1: one\n"))
    assert p.key == "1" and "keys must be text" in p.message


# ---------------------------------------------------------------- rules between keys

@pytest.mark.parametrize("text, key, words", [
    ("bf16: true\nfp16: true\n", "bf16", "bf16 and fp16"),
    ("lora_target_modules: [q_proj]\n", "adapter", "adapter: lora"),
    ("lora_target_linear: true\n", "adapter", "adapter: lora"),
    ("warmup_steps: 10\nwarmup_ratio: 0.1\n", "warmup_ratio", "warmup"),
])
def test_cross_field_error_names_its_key(tmp_path, text, key, words):
    (p,) = problems_of(write(tmp_path, MINIMAL + text))
    assert p.key == key
    assert words in p.message + p.fix
    assert p.fix


def test_cross_field_rules_pass_when_consistent(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "bf16: auto\nfp16: true\nadapter: lora\nlora_target_linear: true\n"))
    assert cfg.fp16 is True and cfg.lora_target_linear is True


def test_cross_field_error_is_reported_next_to_field_errors(tmp_path):
    # pydantic skips model validators when a field fails; the loader checks the rules anyway
    found = by_key(problems_of(write(tmp_path, MINIMAL + "lerning_rate: 1\nbf16: true\nfp16: true\n")))
    assert set(found) == {"lerning_rate", "bf16"}


def test_cross_field_rule_is_skipped_when_one_of_its_keys_is_invalid(tmp_path):
    # fp16 itself is wrong: no second, confusing message about the bf16/fp16 rule
    found = by_key(problems_of(write(tmp_path, MINIMAL + "bf16: true\nfp16: perhaps\n")))
    assert set(found) == {"fp16"}


def test_ad_hoc_model_validator_error_is_mapped_to_the_key_it_starts_with(tmp_path, monkeypatch):
    from pydantic import model_validator

    class Stricter(Config):
        @model_validator(mode="after")
        def _even_seed(self):
            if self.seed % 2:
                raise ValueError("seed must be even in this test")
            return self

    monkeypatch.setattr(load_mod, "Config", Stricter)
    (p,) = problems_of(write(tmp_path, MINIMAL + "seed: 3\n"))
    assert p.key == "seed" and p.message == "seed must be even in this test"


def test_assignment_is_validated_too(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "bf16: true\n"))
    with pytest.raises(Exception):
        cfg.fp16 = True


# ---------------------------------------------------------------- overrides

@pytest.mark.parametrize("override, attr, value", [
    ("max_steps=10", "max_steps", 10),
    ("bf16=true", "bf16", True),
    ("bf16=auto", "bf16", "auto"),
    ("learning_rate=3e-5", "learning_rate", 3e-5),
    ("base_model=tiny:llama", "base_model", "tiny:llama"),
    ("base_model=org/model-name", "base_model", "org/model-name"),
    ("wandb_project=", "wandb_project", None),
    ("chat_template='tokenizer_default'", "chat_template", "tokenizer_default"),
    ("output_dir=./out # not a comment", "output_dir", "./out # not a comment"),
    ("lora_modules_to_save=[embed_tokens,lm_head]", "lora_modules_to_save", ["embed_tokens", "lm_head"]),
])
def test_scalar_and_list_overrides(tmp_path, override, attr, value):
    cfg = load_config(write(tmp_path, MINIMAL), [override])
    assert getattr(cfg, attr) == value


@pytest.mark.parametrize("regex", [
    r".*\.(q|v)_proj", r"[qkv]_proj", r"^(?!.*vision).*(q|k|v|o)_proj$", r"!?q_proj", r"@?q_proj", r"model\..*: ?proj",
    r"{a,b}_proj", r"&x|y", r"(q|v)_proj #x",
])
def test_regex_override_survives_exactly(tmp_path, regex):
    cfg = load_config(write(tmp_path, MINIMAL), ["adapter=lora", f"lora_target_modules={regex}"])
    assert cfg.lora_target_modules == regex


def test_flow_list_override_for_targets(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["adapter=lora", "lora_target_modules=[q_proj,v_proj]"])
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]


def test_nested_override_creates_and_updates_mappings(tmp_path):
    path = write(tmp_path, MINIMAL + "gradient_checkpointing_kwargs:\n  use_reentrant: true\n  other: 1\n")
    cfg = load_config(path, ["gradient_checkpointing_kwargs.use_reentrant=false"])
    assert cfg.gradient_checkpointing_kwargs == {"use_reentrant": False, "other": 1}
    cfg = load_config(write(tmp_path, MINIMAL, "plain.yaml"), ["gradient_checkpointing_kwargs.use_reentrant=false"])
    assert cfg.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_nested_override_keeps_the_fields_default_entries(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["datasets.0.message_property_mappings.role=from"])
    assert cfg.datasets[0].message_property_mappings == {"role": "from", "content": "content"}


def test_list_index_overrides(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), [
        "datasets.0.path=foo.jsonl",
        "datasets.0.type=completion",
        "datasets.1.path=second.jsonl",  # index == length appends an item
        "datasets.1.type=chat_template",
    ])
    assert [(d.path, d.type) for d in cfg.datasets] == [("foo.jsonl", "completion"), ("second.jsonl", "chat_template")]


def test_list_index_override_builds_missing_list(tmp_path):
    cfg = load_config(write(tmp_path, "base_model: x\n"), ["datasets.0.path=a.jsonl"])
    assert cfg.datasets[0].path == "a.jsonl"


def test_whole_value_override_replaces_yaml(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["datasets=[{path: b.jsonl, type: completion}]"])
    assert [(d.path, d.type) for d in cfg.datasets] == [("b.jsonl", "completion")]


@pytest.mark.parametrize("override, key, words", [
    ("max_steps", "max_steps", "key=value"),
    ("=5", "=5", "key=value"),
    ("datasets.3.path=x", "datasets.3.path", "out of range"),
    ("datasets.path=x", "datasets.path", "is a list"),
    ("base_model.inner=1", "base_model.inner", "not a mapping"),
    ("a..b=1", "a..b", "empty key segment"),
])
def test_malformed_override_is_named(tmp_path, override, key, words):
    problems = problems_of(write(tmp_path, MINIMAL), [override])
    assert problems[0].key == key
    assert words in problems[0].message + problems[0].fix


def test_error_from_override_says_so(tmp_path):
    found = by_key(problems_of(write(tmp_path, MINIMAL), ["lora_r=-2", "lerning_rate=1", "datasets.0.type=sharegpt"]))
    assert "from override `lora_r=-2`" in found["lora_r"].message
    assert "did you mean `learning_rate`?" in found["lerning_rate"].fix
    assert "from override `datasets.0.type=sharegpt`" in found["datasets.0.type"].message


def test_parse_override():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override(" x = [1, 2]") == ("x", [1, 2])
    assert parse_override("x=a=b") == ("x", "a=b")
    with pytest.raises(ValueError):
        parse_override("novalue")


# ---------------------------------------------------------------- gathering

def test_all_problems_are_raised_once(tmp_path):
    path = write(tmp_path, """\
        base_model: tiny:llama
        datasets:
          - path: a.jsonl
            type: sharegpt
            pth: b
        lerning_rate: 1e-4
        relora: true
        lora_r: -1
        bf16: true
        fp16: true
        """)
    with pytest.raises(UserError) as ei:
        load_config(path, ["nonsense", "max_steps=ten"])
    problems = ei.value.problems
    keys = [p.key for p in problems]
    assert len(keys) == len(set(keys))
    assert set(keys) == {"nonsense", "datasets.0.type", "datasets.0.pth", "lerning_rate", "relora",
                         "lora_r", "bf16", "max_steps"}
    assert all(p.fix for p in problems), [p for p in problems if not p.fix]
    text = str(ei.value)
    assert text.count("\n  fix: ") == len(problems)  # one message listing each problem with its fix


# ---------------------------------------------------------------- flatten

def test_flatten_dotted_keys(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "adapter: lora\nlora_target_modules: [q_proj, v_proj]\n"),
                      ["gradient_checkpointing_kwargs.use_reentrant=false"])
    flat = flatten(config_to_dict(cfg))
    assert flat["gradient_checkpointing_kwargs.use_reentrant"] is False
    assert flat["datasets.0.path"] == "data.jsonl"
    assert flat["datasets.0.message_property_mappings.role"] == "role"
    assert flat["lora_target_modules"] == ["q_proj", "v_proj"]  # a list of values stays one setting
    assert flat["test_datasets"] is None
    assert "datasets" not in flat and "gradient_checkpointing_kwargs" not in flat


def test_flatten_keeps_empty_containers():
    assert flatten({"a": {}, "b": [], "c": {"d": [{"e": 1}, 2]}}) == {"a": {}, "b": [], "c.d.0.e": 1, "c.d.1": 2}

