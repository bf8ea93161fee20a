"""Golden loss curves: each tiny family's first training losses, pinned.

Equivalence tests (packed == unpacked, DDP == one process, train == evaluate) compare two sides
of one change and cannot see a change that shifts both sides (a tokenization, a loss reduction,
a rule's default). These runs pin the numbers themselves: `archtune train` with LoRA (the family's
own targets and rules) on the bundled data, seed 0, 6 optimizer steps, every step's loss logged.

A deliberate change that moves a curve regenerates the file, and the commit says why:
    ARCHTUNE_WRITE_GOLDEN=1 python -m pytest tests/e2e/test_golden_losses.py
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from archtune.models.tiny import tiny_model_names
from tests.e2e.conftest import QUICKSTART_DATA, head_jsonl, run_cli, write_config

GOLDEN = Path(__file__).with_name("golden_losses.json")
STEPS = 6
# Same stack, same CPU kind: the curves repeat exactly with two threads and to 1.3e-7 with one
# (float32 reduction order); what a real change moves is orders of magnitude more.
RELATIVE = 1e-5


def _run(name: str, tmp_path: Path, capsys) -> list[float]:
    train = head_jsonl(QUICKSTART_DATA / "train.jsonl", tmp_path / "train.jsonl", 48)
    cfg = write_config(tmp_path / "golden.yaml", base_model=f"tiny:{name}",
                       datasets=[{"path": str(train), "type": "alpaca"}], sequence_len=128,
                       adapter="lora", lora_r=8, lora_alpha=16, micro_batch_size=8, gradient_accumulation_steps=1,
                       max_steps=STEPS, learning_rate=0.002, lr_scheduler="constant", warmup_steps=0, seed=0,
                       logging_steps=1, val_set_size=0, output_dir=str(tmp_path / "out"))
    code, out, err = run_cli(capsys, "train", cfg)
    assert code == 0, out + err
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    return summary["train_losses"]


@pytest.mark.parametrize("name", tiny_model_names())
def test_loss_curve_is_the_golden_one(name, tmp_path, capsys):
    losses = _run(name, tmp_path, capsys)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("ARCHTUNE_WRITE_GOLDEN"):
        golden[name] = losses
        GOLDEN.write_text(json.dumps(dict(sorted(golden.items())), indent=1) + "\n")
        return
    assert name in golden, f"no golden curve for {name}: regenerate with ARCHTUNE_WRITE_GOLDEN=1"
    assert losses == pytest.approx(golden[name], rel=RELATIVE), (name, losses, golden[name])
    assert losses[-1] < losses[0]  # the curve descends: a golden file of a broken run would not
