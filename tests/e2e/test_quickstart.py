"""README's main job: examples/quickstart.yaml, run exactly as shipped (outputs redirected to tmp)."""
from __future__ import annotations

import json

from tests.e2e.conftest import QUICKSTART_DATA, REPO, read_json, run_cli

QUICKSTART = REPO / "examples" / "quickstart.yaml"


def test_quickstart_halves_the_eval_loss_and_answers_held_out_prompts(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the config's data paths are relative to the repository root
    redirect = [f"output_dir={tmp_path / 'out'}", f"dataset_prepared_path={tmp_path / 'prepared'}"]
    code, out, err = run_cli(capsys, "train", QUICKSTART, *redirect)
    assert code == 0, err
    summary = read_json(tmp_path / "out" / "train_summary.json")
    assert summary["eval_loss_final"] <= 0.5 * summary["eval_loss_initial"]
    assert summary["family"] == "gemma4"

    # Held-out rows (test.jsonl is disjoint from train.jsonl): the learned rule shows in generation.
    rows = [json.loads(line) for line in (QUICKSTART_DATA / "test.jsonl").read_text().splitlines()[:6]]
    train_inputs = {json.loads(line)["input"] for line in (QUICKSTART_DATA / "train.jsonl").read_text().splitlines()}
    right = 0
    for row in rows:
        assert row["input"] not in train_inputs or not row["input"]
        code, out, err = run_cli(capsys, "generate", QUICKSTART, *redirect, "--prompt", row["instruction"],
                                 "--input", row["input"], "--max-new-tokens", "8")
        assert code == 0, err
        answer = out.split("output:")[1].split("(")[0].split()
        right += answer == row["output"].split()
    assert right >= 4, f"{right}/6 held-out prompts answered exactly"


def test_quickstart_lora_variant_plans_expert_lora(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, err = run_cli(capsys, "check", REPO / "examples" / "quickstart-lora.yaml", "--json")
    assert code == 0, err
    settings = json.loads(out)["settings"]
    assert settings["lora_target_parameters"]["value"] == ["experts.gate_up_proj", "experts.down_proj"]


def test_quickstart_lora_trains_with_scattermoe_like_eager_and_logs_expert_load(tmp_path, capsys, monkeypatch):
    """The LoRA quickstart (expert LoRA, use_scattermoe) trains through archtune's scattermoe; its
    loss curve equals transformers' eager experts, and train_summary.json carries experts_load."""
    monkeypatch.chdir(REPO)
    losses = {}
    for impl in ("scattermoe", "eager"):
        out = tmp_path / impl
        code, _, err = run_cli(capsys, "train", REPO / "examples" / "quickstart-lora.yaml", "max_steps=6",
                               "logging_steps=1", "eval_steps=null", f"output_dir={out}", f"experts_implementation={impl}",
                               f"use_scattermoe={'true' if impl == 'scattermoe' else 'false'}",
                               f"dataset_prepared_path={tmp_path / 'prepared'}", "use_tensorboard=false")
        assert code == 0, err
        summary = read_json(out / "train_summary.json")
        assert summary["experts_implementation"] == impl
        losses[impl] = summary["train_losses"]
    assert len(losses["eager"]) == 6
    for a, b in zip(losses["scattermoe"], losses["eager"]):
        assert abs(a - b) <= 1e-4 * abs(b)
    load = read_json(tmp_path / "scattermoe" / "train_summary.json")["experts_load"]
    assert load and all(layer["tokens"] > 0 for layer in load["layers"].values())
