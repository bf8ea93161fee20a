"""Axolotl-style configs, one per family, as an Axolotl user writes them (archtune's own, not
copies): Axolotl's keys and spellings, empty values, CUDA-only switches, other loggers. Each runs
through `archtune check` (exit 0, one info line per key without effect here) and a 2-step train."""
from __future__ import annotations

import importlib.util
import json
import textwrap

import pytest

from tests.e2e.conftest import read_json, run_cli

# Shared by every family: the keys Axolotl users write every day.
COMMON = """\
strict: false
dataset_prepared_path: {tmp}/prepared
val_set_size: 0.1
output_dir: {tmp}/out
sequence_len: 128
sample_packing: {packing}
pad_to_sequence_len: {packing}
eval_sample_packing: false
special_tokens:
adapter: lora
lora_model_dir:
lora_r: 8
lora_alpha: 16
lora_dropout: 0
lora_mlp_kernel: true
lora_qkv_kernel: true
lora_o_kernel: true
wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:
gradient_accumulation_steps: 1
micro_batch_size: 2
eval_batch_size: 2
num_epochs: 1
optimizer: adamw_torch_fused
lr_scheduler: cosine
cosine_min_lr_ratio: 0.1
learning_rate: 0.001
adam_beta2: 0.95
bf16: auto
fp16:
tf32: true
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
resume_from_checkpoint:
logging_steps: 1
attn_implementation: flash_attention_2
torch_compile: false
warmup_ratio: 0.1
evals_per_epoch: 2
saves_per_epoch: 1
save_total_limit: 1
weight_decay: 0.0
dataloader_num_workers: 0
dataloader_pin_memory: false
remove_unused_columns: false
use_comet: true
dataset_num_proc: 4
"""

# The chat rows in ShareGPT's spelling (from/value), as the Gemma 4 examples read them.
SHAREGPT_ROWS = """\
datasets:
  - path: {tmp}/chat.jsonl
    type: chat_template
    field_messages: conversations
    message_property_mappings:
      role: from
      content: value
"""

FAMILIES = {
    "gemma3": """\
base_model: tiny:gemma3
processor_type: AutoProcessor
chat_template: gemma3
eot_tokens:
  - <end_of_turn>
datasets:
  - path: {tmp}/chat.jsonl
    type: chat_template
    split: train[:90%]
    field_messages: conversations
    message_property_mappings:
      role: from
      content: value
    roles_to_train: [gpt]
    train_on_eos: turn
ddp_find_unused_parameters: true
""",
    "gemma4-moe": """\
base_model: tiny:gemma4-moe
chat_template: gemma4
""" + SHAREGPT_ROWS + """\
lora_target_parameters:
  - experts.gate_up_proj
  - experts.down_proj
plugins:
  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin
liger_rms_norm: true
""",
    # Axolotl's examples/gemma4-unified/12b-text-lora.yaml, its family keys as written there.
    "gemma4-unified": """\
base_model: tiny:gemma4-unified
plugins:
  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin
  - axolotl.integrations.liger.LigerPlugin
liger_rms_norm: true
liger_glu_activation: true
liger_layer_norm: true
chat_template: gemma4_unified
""" + SHAREGPT_ROWS + """\
lora_target_modules: 'model.language_model.layers.[\\d]+.(_checkpoint_wrapped_module.)?(mlp|self_attn).(up|down|gate|q|k|v|o)_proj'
fused_attn_kernel: true
""",
    "qwen3_5-moe": """\
base_model: tiny:qwen3_5-moe
chat_template: qwen3_5
datasets:
  - path: {tmp}/chat.jsonl
    type: chat_template
    split: train
    field_messages: conversations
    message_property_mappings:
      role: from
      content: value
lora_target_modules:
  - q_proj
  - v_proj
fused_attn_kernel: true
fsdp_version: 2
fsdp_config:
  offload_params: false
  auto_wrap_policy: TRANSFORMER_BASED_WRAP
  state_dict_type: SHARDED_STATE_DICT
  reshard_after_forward: true
""",
    "llama": """\
base_model: tiny:llama
chat_template: chatml
datasets:
  - path: {tmp}/alpaca.jsonl
    ds_type: json
    type: alpaca
    split: train[:50]
skip_prepare_dataset: true
lora_target_linear: true
""",
}
INFO_KEYS = {"lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "use_comet", "dataset_num_proc"}


def write_data(tmp) -> None:
    chat = [{"conversations": [{"from": "human", "value": f"What is {i} plus {i}?"},
                               {"from": "gpt", "value": f"{i} plus {i} is {2 * i}."}]} for i in range(40)]
    (tmp / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    alpaca = [{"instruction": f"Double {i}.", "input": "", "output": str(2 * i)} for i in range(60)]
    (tmp / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))


def axolotl_config(tmp, name: str, packing: bool = False):
    write_data(tmp)
    text = FAMILIES[name] + COMMON
    path = tmp / f"{name}.yaml"
    path.write_text(textwrap.dedent(text).format(tmp=tmp, packing=str(packing).lower()))
    return path


def check_and_train(tmp_path, capsys, name: str, *train_overrides: str) -> dict:
    """`archtune check --json` (exit 0, the info lines, Axolotl's attention and scheduler keys
    mapped) and a 2-step train; returns train_summary.json."""
    cfg = axolotl_config(tmp_path, name, packing=name != "gemma3")
    code, out, err = run_cli(capsys, "check", cfg, "--json")
    assert code == 0, out + err
    plan = json.loads(out)
    noted = {line.split(":", 1)[0] for line in plan["info"]}
    assert INFO_KEYS <= noted, plan["info"]
    assert plan["settings"]["attn_implementation"]["value"] == "sdpa"  # no flash-attn on this machine
    assert plan["settings"]["lr_scheduler"]["value"] == "cosine_with_min_lr"

    code, out, err = run_cli(capsys, "train", cfg, "max_steps=2", *train_overrides)
    assert code == 0, out + err
    summary = read_json(tmp_path / "out" / "train_summary.json")
    assert summary["steps"] == 2 and summary["train_tokens"] > 0
    assert summary["eval_loss_final"] is not None
    assert "info:" in out and "lora_mlp_kernel" in out
    return summary


# gemma4-unified: tests/e2e/test_gemma4_unified.py runs it (8 steps, more assertions)
@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in ("llama", "gemma4-unified")])
def test_axolotl_style_config_checks_and_trains_two_steps(tmp_path, capsys, name):
    check_and_train(tmp_path, capsys, name)


def test_llama_config_logs_to_wandb_and_mlflow_and_lora_model_dir_continues(tmp_path, capsys, monkeypatch):
    """The llama config (check, 2 steps) logged through wandb (offline) and mlflow; a second run
    with lora_model_dir starts from the trained adapter: its first evaluation is the first run's
    last, on the same held-out rows."""
    loggers = importlib.util.find_spec("wandb") and importlib.util.find_spec("mlflow")
    overrides = []
    if loggers:  # the test extra installs both
        monkeypatch.setenv("WANDB_DIR", str(tmp_path))
        monkeypatch.setenv("WANDB_SILENT", "true")
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local directory store, no server
        overrides = ["wandb_project=archtune-test", "wandb_mode=offline", "wandb_name=run-a",
                     f"mlflow_tracking_uri=file:{tmp_path}/mlruns", "mlflow_experiment_name=exp"]
    first = check_and_train(tmp_path, capsys, "llama", *overrides)
    if loggers:
        runs = list((tmp_path / "wandb").glob("offline-run-*"))
        assert runs and any(runs[0].glob("run-*.wandb"))
        assert any((tmp_path / "mlruns").rglob("metrics/train_loss")) or any((tmp_path / "mlruns").rglob("loss"))

    code, out, err = run_cli(capsys, "train", tmp_path / "llama.yaml", "max_steps=1",
                             f"lora_model_dir={tmp_path / 'out'}", f"output_dir={tmp_path / 'out2'}")
    assert code == 0, out + err
    second = read_json(tmp_path / "out2" / "train_summary.json")
    assert second["eval_loss_initial"] == pytest.approx(first["eval_loss_final"], rel=1e-5)
    assert second["trainable_params"] == first["trainable_params"]
