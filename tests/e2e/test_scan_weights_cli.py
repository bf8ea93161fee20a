"""`archtune scan-weights` on a tiny Qwen 3.5 MoE written to disk with drift in one DeltaNet conv."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from tests.e2e.conftest import run_cli

RULE = r"linear_attn\.conv1d\.weight=1.3"


def test_scan_weights_reports_and_fixes_the_drifted_tensor(tmp_path, capsys):
    model_dir, fixed_dir = tmp_path / "qwen", tmp_path / "fixed"
    code, _, err = run_cli(capsys, "init-tiny", "qwen3_5-moe", model_dir)
    assert code == 0, err
    weights = load_file(model_dir / "model.safetensors")
    drifted = "model.language_model.layers.1.linear_attn.conv1d.weight"
    weights[drifted] = weights[drifted] * 2.5
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})

    code, out, err = run_cli(capsys, "scan-weights", model_dir, "--rule", RULE, "--json")
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    flagged = [r["name"] for r in report["rows"] if r["action"] != "ok"]
    assert flagged == [drifted]
    assert not fixed_dir.exists()  # a scan without --fix writes nothing

    code, _, err = run_cli(capsys, "scan-weights", model_dir, "--rule", RULE, "--fix", fixed_dir)
    assert code == 0, err
    repaired = load_file(fixed_dir / "model.safetensors")
    before = sorted(weights[k].double().std().item() for k in weights if k.endswith("linear_attn.conv1d.weight"))
    median = before[(len(before) - 1) // 2]  # lower median of the stds before the fix
    assert abs(repaired[drifted].double().std().item() / median - 1) < 1e-5
    assert all(torch.equal(repaired[k], weights[k]) for k in weights if k != drifted)


def test_scan_weights_rejects_a_bad_rule(tmp_path, capsys):
    code, _, err = run_cli(capsys, "scan-weights", tmp_path, "--rule", "conv1d=0.9")
    assert code == 2 and "--rule" in err
