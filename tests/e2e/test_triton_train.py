"""`archtune train` with `experts_implementation: scattermoe_triton` (Triton's interpreter on CPU):
the LoRA quickstart (expert LoRA on the tiny Gemma-4-MoE) trains with the same losses as
transformers' eager experts; without the interpreter `check` and `train` refuse it, exit 2."""
from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import REPO, read_json, run_cli

pytest.importorskip("triton", reason="triton is not installed: the optional `triton` extra")

CONFIG = REPO / "examples" / "quickstart-lora.yaml"
SHORT = ("max_steps=3", "micro_batch_size=2", "logging_steps=1", "eval_steps=null", "test_datasets=null",
         "use_scattermoe=false", "use_tensorboard=false")


def test_train_with_the_triton_kernels_matches_eager(tmp_path, capsys, monkeypatch):
    from tests.unit.test_triton_experts import interpret_kernels

    interpret_kernels(monkeypatch)
    monkeypatch.chdir(REPO)
    losses = {}
    for impl in ("scattermoe_triton", "eager"):
        out = tmp_path / impl
        code, _, err = run_cli(capsys, "train", CONFIG, *SHORT, f"output_dir={out}", f"experts_implementation={impl}",
                               f"dataset_prepared_path={tmp_path / 'prepared'}")
        assert code == 0, err
        summary = read_json(out / "train_summary.json")
        assert summary["experts_implementation"] == impl
        losses[impl] = summary["train_losses"]
    assert len(losses["eager"]) == 3
    for a, b in zip(losses["scattermoe_triton"], losses["eager"]):
        assert abs(a - b) <= 1e-5 * abs(b)


def test_without_the_interpreter_check_and_train_refuse_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.chdir(REPO)
    code, out, _ = run_cli(capsys, "check", CONFIG, "experts_implementation=scattermoe_triton", "--json")
    assert code == 2
    (error,) = json.loads(out)["errors"]
    assert error["key"] == "experts_implementation" and "TRITON_INTERPRET=1" in error["fix"]
    code, _, err = run_cli(capsys, "train", CONFIG, *SHORT, "experts_implementation=scattermoe_triton",
                           f"output_dir={tmp_path / 'out'}", f"dataset_prepared_path={tmp_path / 'prepared'}")
    assert code == 2 and "TRITON_INTERPRET=1" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "train_summary.json").exists()
