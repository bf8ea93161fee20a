"""Training and evaluation with `chunked_cross_entropy: true` equal the stock loss, through the
real Trainer: gradient accumulation (num_items_in_batch), packing, LoRA on lm_head (tied to the
embeddings on Gemma 4, whose final_logit_softcapping the chunked loss applies inside)."""
from __future__ import annotations

import pytest

from tests.e2e.conftest import read_json, run_cli, write_config


def test_chunked_training_equals_the_stock_loss(tmp_path, small_data, capsys):
    base = dict(base_model="tiny:gemma4-dense", **small_data, sequence_len=128, sample_packing=True,
                adapter="lora", lora_target_modules=r".*language_model.*\.(q_proj|v_proj)|lm_head",
                micro_batch_size=2, gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3,
                use_tensorboard=False, seed=7)
    summaries = {}
    for chunked in (False, True):
        out = tmp_path / f"chunked_{chunked}"
        cfg = write_config(tmp_path / f"c_{chunked}.yaml", **base, chunked_cross_entropy=chunked,
                           chunked_cross_entropy_num_chunks=3 if chunked else None, output_dir=str(out))
        code, _, err = run_cli(capsys, "train", str(cfg))
        assert code == 0, err[-3000:]
        summaries[chunked] = read_json(out / "train_summary.json")
        code, stdout, err = run_cli(capsys, "evaluate", str(cfg), "--json")
        assert code == 0, err[-3000:]
        summaries[chunked]["evaluate"] = read_json_line(stdout)
    stock, chunked = summaries[False], summaries[True]
    assert (stock["chunked_cross_entropy"], chunked["chunked_cross_entropy"]) == (False, True)
    assert len(chunked["train_losses"]) == 3
    assert chunked["train_losses"] == pytest.approx(stock["train_losses"], rel=1e-5)
    for key in ("eval_loss_initial", "eval_loss_final"):
        assert chunked[key] == pytest.approx(stock[key], rel=1e-5)
    assert chunked["evaluate"]["eval_tokens"] == stock["evaluate"]["eval_tokens"]
    assert chunked["evaluate"]["eval_loss"] == pytest.approx(stock["evaluate"]["eval_loss"], rel=1e-5)


def read_json_line(stdout: str) -> dict:
    import json

    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_check_memory_json_and_gpu_memory_warning(capsys):
    from tests.e2e.conftest import REPO

    code, out, _ = run_cli(capsys, "check", str(REPO / "examples" / "quickstart.yaml"), "--memory", "--json")
    assert code == 0
    plan = read_json_line(out)
    assert plan["memory"]["per_device"] is True and plan["memory"]["peak_bytes"] == sum(plan["memory"]["parts"].values())
    assert not plan["warnings"]
    code, out, _ = run_cli(capsys, "check", str(REPO / "examples" / "quickstart.yaml"), "--json", "--gpu-memory", "100MiB")
    warning = " ".join(read_json_line(out)["warnings"])
    assert code == 0 and "exceeds 0.1 GiB" in warning and "micro_batch_size: 8" in warning
    code, out, _ = run_cli(capsys, "check", str(REPO / "examples" / "quickstart.yaml"), "--gpu-memory", "lots")
    assert code == 2 and "--gpu-memory" in out
