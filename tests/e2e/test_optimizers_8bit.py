"""Axolotl's 8-bit and paged optimizer names train a tiny model, and the optimizer state is what
the name says: 8-bit (uint8 moments with their absmax) for the 8-bit names, float32 for the 32-bit one.
adamw_torch_8bit runs torchao's optimizer where torchao is installed, else bitsandbytes' 8-bit AdamW
(the same algorithm), which the plan records; adamw_torch_4bit needs torchao and check says so."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.e2e.conftest import QUICKSTART_DATA, head_jsonl, read_json, run_cli, write_config

BASE = dict(base_model="tiny:llama", sequence_len=128, micro_batch_size=2, use_tensorboard=False,
            logging_steps=1, seed=3, max_steps=3, save_steps=3, learning_rate=1e-3)


def _moments(out) -> list[torch.dtype]:
    state = torch.load(out / "checkpoint-3" / "optimizer.pt", map_location="cpu", weights_only=False)["state"]
    # bitsandbytes saves its state under one nested key
    flat = [s.get("__bnb_optimizer_quant_state__", s) for s in state.values()]
    return [t.dtype for s in flat for k, t in s.items() if k in ("state1", "state2", "exp_avg", "exp_avg_sq")]


@pytest.mark.parametrize("name, moment", [
    ("adamw_bnb_8bit", torch.uint8), ("paged_adamw_8bit", torch.uint8), ("adamw_8bit", torch.uint8),
    ("adamw_torch_8bit", torch.uint8), ("paged_adamw_32bit", torch.float32)])
def test_optimizer_trains_with_the_state_its_name_says(tmp_path, capsys, name, moment):
    train = head_jsonl(QUICKSTART_DATA / "train.jsonl", tmp_path / "train.jsonl", 12)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", **BASE, optimizer=name, output_dir=str(out),
                       datasets=[{"path": str(train), "type": "alpaca"}], dataset_prepared_path=str(tmp_path / "p"))
    code, text, err = run_cli(capsys, "check", cfg, "--json")
    assert code == 0, text + err
    torchao = importlib.util.find_spec("torchao") is not None
    settings = __import__("json").loads(text)["settings"]
    if name == "adamw_torch_8bit" and not torchao:
        assert settings["optimizer"]["value"] == "adamw_bnb_8bit" and "bitsandbytes" in settings["optimizer"]["reason"]
    code, text, err = run_cli(capsys, "train", cfg)
    assert code == 0, text + err
    summary = read_json(out / "train_summary.json")
    assert summary["steps"] == 3 and summary["train_loss_last"] == summary["train_loss_last"]  # finite
    dtypes = _moments(out)
    if name == "adamw_torch_8bit" and torchao:
        return  # torchao keeps its 8-bit state in its own tensor subclass
    assert dtypes and moment in dtypes
    if moment == torch.uint8:
        # bitsandbytes quantizes tensors of 4096 elements or more; the big ones hold 8-bit moments
        assert dtypes.count(torch.uint8) >= 2
    else:
        assert torch.uint8 not in dtypes


def test_adamw_torch_4bit_is_refused_by_check_with_the_install_line_without_torchao(tmp_path, capsys):
    if importlib.util.find_spec("torchao") is not None:
        pytest.skip("torchao is installed: adamw_torch_4bit runs")
    cfg = write_config(tmp_path / "c.yaml", **BASE, optimizer="adamw_torch_4bit", output_dir=str(tmp_path / "o"),
                       datasets=[{"path": "d.jsonl", "type": "alpaca"}])
    code, text, _ = run_cli(capsys, "check", cfg, "--json")
    (error,) = __import__("json").loads(text)["errors"]
    assert code == 2 and error["key"] == "optimizer" and "pip install torchao" in error["fix"]
