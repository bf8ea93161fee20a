"""`archtune generate` after a bf16 QLoRA run with 4-bit experts on a local Qwen 3.5 MoE checkpoint:
the run trained under autocast with the router kept in float32 beside bf16 activations, and
generation outside autocast failed in the router's matmul (BFloat16 != float)."""
from __future__ import annotations

import torch

from tests.e2e.conftest import QUICKSTART_DATA, head_jsonl, run_cli, write_config


def test_bf16_qlora_with_4bit_experts_generates(tmp_path, capsys):
    from archtune.models.tiny import build_tiny_model

    model, tokenizer = build_tiny_model("qwen3_5-moe", seed=0)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "base", max_shard_size="300KB")
    tokenizer.save_pretrained(tmp_path / "base")
    train = head_jsonl(QUICKSTART_DATA / "train.jsonl", tmp_path / "train.jsonl", 8)
    cfg = write_config(tmp_path / "run.yaml", base_model=str(tmp_path / "base"), adapter="qlora", load_in_4bit=True,
                       quantize_moe_experts=True, lora_target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                       lora_r=4, lora_alpha=8, bf16=True, datasets=[{"path": str(train), "type": "alpaca"}],
                       sequence_len=128, micro_batch_size=4, max_steps=1, output_dir=str(tmp_path / "out"),
                       dataset_prepared_path=str(tmp_path / "prepared"), use_tensorboard=False)
    code, out, err = run_cli(capsys, "train", cfg)
    assert code == 0, out + err
    code, out, err = run_cli(capsys, "generate", cfg, "--prompt", "Name the category of these words: cow",
                             "--max-new-tokens", "4")
    assert code == 0, out + err
    assert "output:" in out and "adapter weights" in out
