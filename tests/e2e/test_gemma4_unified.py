"""Gemma 4 Unified (`Gemma4UnifiedForConditionalGeneration`, model_type gemma4_unified): Axolotl's
gemma4-unified text example as a user runs it (base model, data and output_dir swapped for local
stand-ins), through `archtune check` and `archtune train`, with the embedders (the family's
multimodal modules: it has no towers) frozen."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.conftest import read_json, run_cli, write_config
from tests.e2e.test_axolotl_configs import axolotl_config, write_data


def test_axolotl_gemma4_unified_text_lora_config_checks_and_trains(tmp_path, capsys):
    """Axolotl's gemma4-unified text LoRA example (tests/e2e/test_axolotl_configs.py holds its keys),
    packed: the family's plan, and LoRA on the text decoder alone."""
    cfg = axolotl_config(tmp_path, "gemma4-unified", packing=True)
    code, out, err = run_cli(capsys, "check", cfg, "--json")
    assert code == 0, out + err
    plan = json.loads(out)
    s = plan["settings"]
    assert plan["family"] == "gemma4_unified" and plan["model_type"] == "gemma4_unified"
    assert s["freeze_mm_modules"]["value"] is True and s["freeze_mm_modules"]["source"] == "family"
    assert s["chat_template"]["value"] == "gemma4_unified"
    code, out, err = run_cli(capsys, "train", cfg, "max_steps=8", "learning_rate=0.002")
    assert code == 0, out + err
    summary = read_json(tmp_path / "out" / "train_summary.json")
    assert summary["family"] == "gemma4_unified" and summary["steps"] == 8
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert adapter and all(".language_model.layers." in k for k in adapter), sorted(adapter)[:5]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from archtune.models.tiny import write_tiny_model

    return write_tiny_model("gemma4-unified", tmp_path_factory.mktemp("g4u") / "base")


def test_full_fine_tune_leaves_the_embedders_as_loaded(tmp_path, capsys, base):
    """Without LoRA the text decoder trains; the vision and audio embedders are frozen and stay
    bit-identical."""
    write_data(tmp_path)
    cfg = write_config(tmp_path / "full.yaml", base_model=str(base), chat_template="gemma4_unified",
                       datasets=[{"path": str(tmp_path / "chat.jsonl"), "type": "chat_template",
                                  "field_messages": "conversations",
                                  "message_property_mappings": {"role": "from", "content": "value"}}],
                       sequence_len=128, micro_batch_size=2, max_steps=6, learning_rate=0.0005,
                       output_dir=str(tmp_path / "out"), use_tensorboard=False)
    code, out, err = run_cli(capsys, "train", cfg)
    assert code == 0, out + err
    before, after = load_file(str(base / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    # (transformers saves model.embed_vision's patch layers as model.vision_embedder.*)
    embedders = [k for k in before if k.startswith(("model.embed_vision.", "model.vision_embedder.", "model.embed_audio."))]
    decoder = [k for k in before if k.startswith("model.language_model.layers.")]
    assert embedders and decoder
    assert all(torch.equal(before[k], after[k]) for k in embedders)
    # Frozen, not merely unreached by text batches: every parameter but the embedders' trains.
    summary = read_json(tmp_path / "out" / "train_summary.json")
    assert summary["total_params"] - summary["trainable_params"] == sum(before[k].numel() for k in embedders)
    assert sum(not torch.equal(before[k], after[k]) for k in decoder) > len(decoder) // 2


def test_gemma4_unified_template_keeps_consecutive_assistant_messages_in_one_model_turn():
    from archtune.families import chat_templates
    from archtune.models.tiny import build_tiny_model

    _, tokenizer = build_tiny_model("llama")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                {"role": "assistant", "content": "b"}]
    templates = chat_templates()
    unified = tokenizer.apply_chat_template(messages, chat_template=templates["gemma4_unified"], tokenize=False)
    gemma4 = tokenizer.apply_chat_template(messages, chat_template=templates["gemma4"], tokenize=False)
    assert unified == f"{tokenizer.bos_token}<|turn>user\nhi<turn|>\n<|turn>model\na<turn|>\nb<turn|>\n"
    assert gemma4.count("<|turn>model") == 2
