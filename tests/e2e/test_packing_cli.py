"""Packing through the CLI: `evaluate` packed and unpacked agree for every tiny family; training packed works."""
from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import read_json, run_cli, write_config

FAMILIES = ["gemma4-moe", "gemma4-e2b", "gemma3", "qwen3_5-moe", "llama"]


def _eval_loss(capsys, cfg, *overrides) -> dict:
    code, out, err = run_cli(capsys, "evaluate", cfg, "--json", *overrides)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("name", FAMILIES)
def test_evaluate_packed_equals_unpacked(tmp_path, small_data, capsys, name):
    cfg = write_config(tmp_path / "c.yaml", base_model=f"tiny:{name}", **small_data, sequence_len=256,
                       micro_batch_size=4, output_dir=str(tmp_path / "none"))
    plain = _eval_loss(capsys, cfg, "eval_sample_packing=false")
    packed = _eval_loss(capsys, cfg, "eval_sample_packing=true")
    assert packed["eval_tokens"] == plain["eval_tokens"] and packed["eval_rows"] == plain["eval_rows"]
    assert abs(packed["eval_loss"] / plain["eval_loss"] - 1) < 1e-4


def test_packed_training_reports_packing_and_learns(tmp_path, small_data, capsys):
    cfg = write_config(tmp_path / "c.yaml", base_model="tiny:qwen3_5-moe", **small_data, sequence_len=512,
                       sample_packing=True, adapter="lora", lora_modules_to_save=["lm_head"], micro_batch_size=2,
                       max_steps=12, learning_rate=0.005, output_dir=str(tmp_path / "out"), use_tensorboard=False)
    code, out, err = run_cli(capsys, "preprocess", cfg, "--json")
    assert code == 0, err
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["packing"]["train"]["efficiency"] > 0.85 and stats["packing"]["train"]["docs"] == 256
    code, _, err = run_cli(capsys, "train", cfg)
    assert code == 0, err
    summary = read_json(tmp_path / "out" / "train_summary.json")
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
