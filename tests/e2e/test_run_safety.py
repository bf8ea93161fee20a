"""Runs that stop early stop cleanly, and output_dir is only touched once a run is sure to start.

- the run record (config as given, the plan, versions, data cache key); save_total_limit;
- a finished output_dir is refused unless overwrite_output_dir or resume; a run that fails
  validation (config, data) moves nothing of the old run;
- a non-finite loss stops the run naming the step and the rows (FILE:LINE), keeping the last good
  checkpoint (huge learning rate; a poisoned row), or skips the step (`on_nonfinite: skip`);
- SIGTERM / SIGINT: a checkpoint at the step end and exit 75; a second signal ends it at once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import QUICKSTART_DATA, REPO, head_jsonl, read_json, run_cli, write_config

BASE = dict(base_model="tiny:llama", sequence_len=128, micro_batch_size=2, use_tensorboard=False,
            logging_steps=1, seed=3)


@pytest.fixture
def data(tmp_path) -> dict:
    train = head_jsonl(QUICKSTART_DATA / "train.jsonl", tmp_path / "train.jsonl", 24)
    return {"datasets": [{"path": str(train), "type": "alpaca"}], "dataset_prepared_path": str(tmp_path / "prep")}


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_run_record_limit_refusal_and_nothing_touched_before_validation(tmp_path, data, capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", **BASE, **data, max_steps=3, save_steps=1, save_total_limit=2,
                       output_dir=str(out))
    code, stdout, err = run_cli(capsys, "train", cfg, "learning_rate=0.001")
    assert code == 0, err
    record = read_json(out / "run_record.json")
    assert record["config"]["max_steps"] == 3 and record["config"]["learning_rate"] == 0.001  # as given
    assert "lora_r" not in record["config"]  # defaults are the plan's business, not "as given"
    assert record["plan"]["family"] and record["plan"]["settings"]["max_steps"]["value"] == 3
    assert {"archtune", "torch", "transformers", "peft"} <= set(record["versions"])
    assert record["versions"]["torch"]
    assert record["data_cache_key"] == Path(read_json(out / "train_summary.json")["data"]["cache_dir"]).name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # limit 2
    assert not list(out.glob(".staging/*"))

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    code, _, err = run_cli(capsys, "train", cfg)  # a finished run is not silently replaced
    assert code == 2 and "output_dir" in err and "finished run" in err and "overwrite_output_dir" in err
    # Validation failures (config, then data) touch nothing, even with overwrite_output_dir.
    code, _, err = run_cli(capsys, "train", cfg, "overwrite_output_dir=true", "lora_r=0")
    assert code == 2 and "lora_r" in err
    code, _, err = run_cli(capsys, "train", cfg, "overwrite_output_dir=true", f"datasets.0.path={tmp_path}/no.jsonl")
    assert code == 2 and "datasets.0.path" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before
    assert not list(out.glob("previous-*"))

    code, _, err = run_cli(capsys, "train", cfg, "overwrite_output_dir=true", "max_steps=1")
    assert code == 0, err
    previous = list(out.glob("previous-*"))
    assert len(previous) == 1 and (previous[0] / "model.safetensors").is_file()
    assert sorted(p.name for p in previous[0].glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert read_json(out / "train_summary.json")["steps"] == 1


def test_resume_from_checkpoint_true_without_a_checkpoint_is_a_user_error(tmp_path, data, capsys):
    cfg = write_config(tmp_path / "c.yaml", **BASE, **data, max_steps=1, output_dir=str(tmp_path / "out"),
                       resume_from_checkpoint=True)
    code, _, err = run_cli(capsys, "train", cfg)
    assert code == 2 and "resume_from_checkpoint" in err and "no complete checkpoint" in err
    assert not (tmp_path / "out").exists()


HUGE_LR = dict(optimizer="sgd", learning_rate=1e9, max_grad_norm=0.0, lr_scheduler="constant", max_steps=6,
               save_steps=1)


def test_huge_learning_rate_stops_at_the_first_non_finite_step(tmp_path, data, capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", **BASE, **data, **HUGE_LR, output_dir=str(out))
    code, stdout, err = run_cli(capsys, "train", cfg)
    assert code == 3, err
    text = " ".join(err.split())
    assert "stopped at step" in text and "not finite" not in text.split("stopped at step")[0]
    step = int(text.split("stopped at step ")[1].split(":")[0])
    assert step >= 2 and ("nan" in text or "inf" in text)
    assert f"{data['datasets'][0]['path']}:" in text  # the batch's rows, as FILE:LINE
    assert f"checkpoint-{step - 1}" in text and "Traceback" not in err
    # The last good checkpoint is there and finite; nothing of the bad step was written.
    import torch
    from safetensors.torch import load_file

    last = load_file(str(out / f"checkpoint-{step - 1}" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in last.values())
    assert not (out / f"checkpoint-{step}").exists() and not (out / "train_summary.json").exists()


def test_on_nonfinite_skip_leaves_the_weights_of_skipped_steps_alone(tmp_path, data, capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", **BASE, **data, **HUGE_LR, output_dir=str(out), on_nonfinite="skip")
    code, stdout, err = run_cli(capsys, "train", cfg)
    assert code == 0, err
    skipped = read_json(out / "train_summary.json")["skipped_steps"]
    assert skipped and skipped == list(range(skipped[0], 7))
    import torch

    before = _weights(out / f"checkpoint-{skipped[0] - 1}")
    final = _weights(out)
    assert all(torch.equal(before[k], final[k]) for k in final)  # no skipped step changed a weight


def test_a_poisoned_row_is_named_by_file_and_line(tmp_path, data, capsys):
    rows = (QUICKSTART_DATA / "train.jsonl").read_text().splitlines()[:24]
    poisoned = json.loads(rows[9])
    poisoned["input"] = poisoned["input"] + " ☠"
    rows[9] = json.dumps(poisoned, ensure_ascii=False)
    path = tmp_path / "poisoned.jsonl"
    path.write_text("\n".join(rows) + "\n")
    cfg = write_config(tmp_path / "c.yaml", **BASE, datasets=[{"path": str(path), "type": "alpaca"}],
                       dataset_prepared_path=str(tmp_path / "prep"), num_epochs=1, learning_rate=1e-4,
                       output_dir=str(tmp_path / "out"), plugins=["tests.e2e.poison_plugin.PoisonPlugin"],
                       allow_external_plugins=True)
    code, _, err = run_cli(capsys, "train", cfg)
    text = " ".join(err.split())
    assert code == 3, err
    assert f"{path}:10" in text and "the loss is" in text
    batch = text.split("The batch held: ")[1].split(". Nothing")[0] if "The batch held: " in text else ""
    assert batch.count(f"{path}:") == 2  # micro_batch_size 2: the poisoned row and its neighbour


def _train_subprocess(tmp_path: Path, data: dict, name: str, kill_at: str | None, **keys):
    out = tmp_path / name
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, **data, "output_dir": str(out), "max_steps": 6, "save_steps": 5,
                                   "plugins": ["tests.e2e.kill_plugin.KillPlugin"], "allow_external_plugins": True,
                                   **keys}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    env.pop("ARCHTUNE_TEST_KILL_AT", None)
    if kill_at:
        env["ARCHTUNE_TEST_KILL_AT"] = kill_at
    proc = subprocess.run([sys.executable, "-m", "archtune", "train", str(cfg)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    return proc, out


def test_sigterm_saves_a_checkpoint_at_the_step_end_and_exits_75_then_resumes(tmp_path, data):
    # The signal arrives after step 3's boundary was checked: the run stops at the next one, step 4.
    proc, out = _train_subprocess(tmp_path, data, "term", "term:3")
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "SIGTERM received" in text and "stopped by SIGTERM after step 4" in text and "Traceback" not in text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # save_steps is 5
    assert not (out / "train_summary.json").exists()
    resumed, _ = _train_subprocess(tmp_path, data, "term", None, resume_from_checkpoint=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-4" in resumed.stdout
    assert read_json(out / "train_summary.json")["steps"] == 6


def test_a_second_sigint_stops_at_once_without_a_checkpoint(tmp_path, data):
    proc, out = _train_subprocess(tmp_path, data, "int2", "int2:3")
    assert proc.returncode == -2, (proc.returncode, proc.stderr[-3000:])  # ended by the signal itself
    assert "SIGINT again: stopping at once" in " ".join((proc.stdout + proc.stderr).split())
    assert not (out / "checkpoint-3").exists()
