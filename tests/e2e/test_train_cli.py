"""The CLI end to end on embedded tiny models: train, evaluate, generate, merge-lora, init-tiny."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.conftest import read_json, run_cli, write_config

SUMMARY_KEYS = {"steps", "train_loss_first", "train_loss_last", "eval_loss_initial", "eval_loss_final",
                "train_tokens", "tokens_per_second", "peak_rss_mb", "trainable_params", "total_params",
                "world_size", "family"}


@pytest.fixture
def lora_run(tmp_path, small_data, capsys):
    cfg = write_config(tmp_path / "lora.yaml", base_model="tiny:gemma4-moe", **small_data,
                       sequence_len=128, adapter="lora", lora_r=8, lora_alpha=16,
                       lora_modules_to_save=["lm_head"], micro_batch_size=8, max_steps=24,
                       learning_rate=0.005, warmup_steps=2, output_dir=str(tmp_path / "out"))
    code, out, err = run_cli(capsys, "train", cfg)
    assert code == 0, err
    return cfg, tmp_path / "out", out


def test_lora_run_writes_every_output(lora_run):
    cfg, out, stdout = lora_run
    summary = read_json(out / "train_summary.json")
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["family"] == "gemma4" and summary["world_size"] == 1 and summary["steps"] == 24
    assert summary["eval_loss_final"] < summary["eval_loss_initial"] - 0.5
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["train_tokens"] > 0 and summary["tokens_per_second"] > 0
    # The adapter holds LoRA tensors and the saved lm_head (with its tied embedding), nothing else of the base.
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in k or "lm_head" in k or "embed_tokens" in k for k in adapter)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "loss.png").stat().st_size > 10_000
    assert list((out / "runs").glob("events.out.tfevents.*"))
    assert "eval loss" in stdout and "train_summary.json" in stdout


def test_evaluate_matches_the_training_summary(lora_run, capsys):
    cfg, out, _ = lora_run
    code, stdout, err = run_cli(capsys, "evaluate", cfg, "--json")
    assert code == 0, err
    result = __import__("json").loads(stdout.strip().splitlines()[-1])
    assert set(result) == {"eval_loss", "eval_tokens", "eval_rows"}
    assert result["eval_rows"] == 32
    assert result["eval_loss"] == pytest.approx(read_json(out / "train_summary.json")["eval_loss_final"], rel=1e-5)


def test_merged_model_reloads_with_transformers_alone_and_generates_the_same(lora_run, capsys):
    from transformers import AutoModelForImageTextToText

    from archtune.train.assembly import assemble_model
    from archtune.cli import generate_text
    from archtune.config import load_config
    from archtune.train.recipe import plan_for

    cfg_path, out, _ = lora_run
    code, _, err = run_cli(capsys, "merge-lora", cfg_path)
    assert code == 0, err
    cfg = load_config(cfg_path)
    setup = plan_for(cfg)
    built = assemble_model(setup.plan, setup.tokenizer, "generate")
    adapted = built.model
    assert built.weights == "adapter"
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged")
    ids = setup.tokenizer("### Instruction:\nName the category of each word.\n\n### Input:\ncow train\n\n### Response:\n")["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        adapted.eval(), merged.eval()
        diff = (adapted(input_ids=x).logits - merged(input_ids=x).logits).abs().max().item()
    assert diff < 1e-4
    assert generate_text(adapted, setup.tokenizer, ids, 12) == generate_text(merged, setup.tokenizer, ids, 12)


def test_full_fine_tune_saves_and_reloads_full_weights(tmp_path, small_data, capsys):
    from transformers import AutoModelForCausalLM

    cfg = write_config(tmp_path / "full.yaml", base_model="tiny:llama", **small_data, sequence_len=128,
                       micro_batch_size=8, max_steps=6, learning_rate=0.003, output_dir=str(tmp_path / "out"),
                       use_tensorboard=False)
    code, _, err = run_cli(capsys, "train", cfg)
    assert code == 0, err
    summary = read_json(tmp_path / "out" / "train_summary.json")
    assert summary["trainable_params"] == summary["total_params"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert sum(p.numel() for p in model.parameters()) == summary["total_params"]
    code, stdout, err = run_cli(capsys, "evaluate", cfg, "--json")
    assert code == 0, err
    evaluated = __import__("json").loads(stdout.strip().splitlines()[-1])["eval_loss"]
    assert evaluated == pytest.approx(summary["eval_loss_final"], rel=1e-5)


def test_init_tiny_directory_trains_like_the_in_memory_model(tmp_path, small_data, capsys):
    code, _, err = run_cli(capsys, "init-tiny", "llama", tmp_path / "llama")
    assert code == 0, err
    assert (tmp_path / "llama" / "model.safetensors").is_file() and (tmp_path / "llama" / "tokenizer.json").is_file()
    losses = []
    for name, base in (("dir", str(tmp_path / "llama")), ("mem", "tiny:llama")):
        cfg = write_config(tmp_path / f"{name}.yaml", base_model=base, **small_data, sequence_len=128,
                           adapter="lora", micro_batch_size=8, max_steps=1, seed=0,
                           output_dir=str(tmp_path / name), use_tensorboard=False)
        code, _, err = run_cli(capsys, "train", cfg)
        assert code == 0, err
        losses.append(read_json(tmp_path / name / "train_summary.json")["eval_loss_initial"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_preprocess_json_reports_statistics(tmp_path, small_data, capsys):
    cfg = write_config(tmp_path / "p.yaml", base_model="tiny:llama", **small_data, sequence_len=128)
    code, stdout, err = run_cli(capsys, "preprocess", cfg, "--json")
    assert code == 0, err
    stats = __import__("json").loads(stdout.strip().splitlines()[-1])
    assert stats["rows_in"] == 256 + 32 and stats["rows_kept"] == 256 + 32 and stats["tokens"] > 0
    assert sum(stats["rows_dropped"].values()) == 0


@pytest.mark.parametrize("keys, override, needle", [
    ({"learning_rat": 0.1}, [], "did you mean"),
    ({"relora": True}, [], "is refused"),
    ({}, ["base_model=tiny:nosuch"], "tiny:gemma4-moe"),
    ({}, ["datasets.0.path=/nonexistent/file.jsonl"], "datasets.0.path"),
    ({}, ["lora_r=0"], "lora_r"),
])
def test_user_errors_exit_2_naming_the_key(tmp_path, small_data, capsys, keys, override, needle):
    cfg = write_config(tmp_path / "bad.yaml", base_model="tiny:llama", **small_data, **keys)
    code, out, err = run_cli(capsys, "train", cfg, *override)
    assert code == 2
    assert needle in err and "Traceback" not in err + out


def test_console_script_error_has_no_traceback_unless_debug(tmp_path, small_data):
    cfg = write_config(tmp_path / "bad.yaml", base_model="tiny:llama", **small_data, lora_rr=4)
    plain = subprocess.run([sys.executable, "-m", "archtune", "train", str(cfg)], capture_output=True, text=True)
    assert plain.returncode == 2 and "lora_rr" in plain.stderr and "Traceback" not in plain.stderr
    debug = subprocess.run([sys.executable, "-m", "archtune", "--debug", "train", str(cfg)], capture_output=True, text=True)
    assert "Traceback" in debug.stderr


def test_evaluate_uses_the_kind_of_weights_the_last_run_wrote(tmp_path, small_data, capsys):
    """A full fine-tune into a directory that still holds an earlier LoRA adapter: evaluate must use
    the full weights the last run wrote, not the stale adapter."""
    common = dict(base_model="tiny:llama", **small_data, sequence_len=128, micro_batch_size=8,
                  learning_rate=0.003, output_dir=str(tmp_path / "out"), use_tensorboard=False)
    lora = write_config(tmp_path / "lora.yaml", **common, adapter="lora", max_steps=2)
    full = write_config(tmp_path / "full.yaml", **common, max_steps=6, overwrite_output_dir=True)
    assert run_cli(capsys, "train", lora)[0] == 0
    assert run_cli(capsys, "train", full)[0] == 0
    assert list((tmp_path / "out").glob("previous-*/adapter_config.json"))  # set aside, not deleted
    code, stdout, err = run_cli(capsys, "evaluate", full, "--json")
    assert code == 0, err
    evaluated = __import__("json").loads(stdout.strip().splitlines()[-1])["eval_loss"]
    assert evaluated == pytest.approx(read_json(tmp_path / "out" / "train_summary.json")["eval_loss_final"], rel=1e-5)
