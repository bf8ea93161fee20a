"""GRPO end to end (`archtune train` / `evaluate` with `rl: grpo` on tiny:llama).

The example (examples/grpo/: rewards.py beside config.yaml) rewards the share of digits in a
completion on number questions, 16 of them held out. The run trains once (module scope, 40 steps of
2 prompts x 8 completions, about 15 s of training on this CPU): the held-out mean reward of the
greedy completions must rise from near 0 to above 0.5, and `evaluate` must report the same number
the run's final evaluation did. The failure tests check that a missing module or function, a
transform that is missing, and a reward function that raises each end with one error naming the
config key (exit 2), never a traceback.
"""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.e2e.conftest import REPO, read_json, run_cli

EXAMPLE = REPO / "examples" / "grpo"


def example_config(tmp_path, **changes) -> dict:
    cfg = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    for group in ("datasets", "test_datasets"):
        for ds in cfg[group]:
            ds["path"] = str(REPO / ds["path"])
    cfg.update(output_dir=str(tmp_path / "out"), use_tensorboard=False, **changes)
    return cfg


def write_beside_rewards(tmp_path, cfg: dict, rewards: str | None = None):
    """The config written into tmp_path, with the example's rewards.py (or `rewards` as its text) beside it."""
    if rewards is None:
        shutil.copy(EXAMPLE / "rewards.py", tmp_path / "rewards.py")
    else:
        (tmp_path / "rewards.py").write_text(rewards)
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    return root, write_beside_rewards(root, example_config(root))


@pytest.fixture
def trained(example_run, capsys):
    root, config = example_run
    summary = root / "out" / "train_summary.json"
    if not summary.exists():
        code, out, err = run_cli(capsys, "train", config)
        assert code == 0, err[-3000:]
    return config, read_json(summary)


def test_the_example_learns_its_reward_on_held_out_prompts(trained):
    _, s = trained
    assert s["method"] == "grpo" and s["trainer"] == "GRPOTrainer" and s["steps"] == 40
    # A random model writes digits rarely; after GRPO nearly every held-out completion is digits.
    assert s["eval_reward_mean_initial"] < 0.1, s
    assert s["eval_reward_mean"] > 0.5, s
    assert s["eval_reward_mean"] - s["eval_reward_mean_initial"] > 0.4
    assert s["eval_reward_mean_sampled"] > s["eval_reward_mean_sampled_initial"] + 0.3
    assert s["reward_mean_last"] > s["reward_mean_first"] + 0.3
    assert s["eval_rewards/digits/mean"] == s["eval_reward_mean"]  # one function, weight 1
    assert s["eval_rows"] == 16


def test_the_summary_splits_rollout_and_update_time_and_keeps_trl_metrics(trained):
    _, s = trained
    assert s["rollout_seconds"] > 0 and s["update_seconds"] > 0
    assert s["rollout_seconds"] + s["update_seconds"] <= s["train_seconds"] * 1.05
    for key in ("rewards/digits/mean", "rewards/digits/std", "reward_std", "completions/mean_length",
                "clip_ratio/region_mean", "entropy"):
        assert key in s, key
    assert 0 < s["completions/mean_length"] <= 12  # max_completion_length
    assert s["train_tokens"] > 0 and s["rollout_backend"] == "transformers"


def test_evaluate_reports_the_trained_policys_held_out_reward(trained, capsys):
    config, s = trained
    code, out, err = run_cli(capsys, "evaluate", config, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert {"eval_loss", "eval_tokens", "eval_rows", "reward_mean", "reward_mean_sampled"} <= set(result)
    assert result["reward_mean"] == pytest.approx(s["eval_reward_mean"], abs=1e-9)
    # Sampled: each held-out completion from its own seed, so `evaluate` samples what the run's final
    # evaluation sampled.
    assert result["reward_mean_sampled"] == pytest.approx(s["eval_reward_mean_sampled"], abs=1e-9)
    assert result["eval_rows"] == 16


# ---------------------------------------------------------------- your code, and its failures

def _refused(capsys, config, key: str) -> str:
    code, out, err = run_cli(capsys, "train", config)
    assert code == 2, (out + err)[-3000:]
    assert key in err and "Traceback" not in err, err[-3000:]
    return err


def test_a_missing_reward_module_names_its_key(tmp_path, capsys):
    cfg = example_config(tmp_path, trl={"reward_funcs": ["no_such_module.reward"], "num_generations": 8})
    err = _refused(capsys, write_beside_rewards(tmp_path, cfg), "trl.reward_funcs.0")
    assert "no_such_module.py not found" in err
    assert not (tmp_path / "out").exists()  # refused before output_dir is touched


def test_a_missing_reward_function_names_its_key_and_what_the_module_defines(tmp_path, capsys):
    cfg = example_config(tmp_path, trl={"reward_funcs": ["rewards.digits", "rewards.letters"], "num_generations": 8})
    err = _refused(capsys, write_beside_rewards(tmp_path, cfg), "trl.reward_funcs.1")
    assert "has no function letters" in err and "digits" in err


def test_a_missing_transform_names_the_dataset_key(tmp_path, capsys):
    cfg = example_config(tmp_path)
    cfg["datasets"][0]["type"] = "rewards.no_transform"
    err = _refused(capsys, write_beside_rewards(tmp_path, cfg), "datasets.0.type")
    assert "has no function no_transform" in err


def test_a_reward_function_that_raises_is_one_error_naming_its_key(tmp_path, capsys):
    text = (EXAMPLE / "rewards.py").read_text() + (
        "\n\ndef broken(prompts, completions, **kwargs):\n    raise KeyError('answer')\n")
    cfg = example_config(tmp_path, trl={"reward_funcs": ["rewards.broken"], "num_generations": 8}, max_steps=2)
    del cfg["test_datasets"]  # the first rollout fails, not the initial evaluation
    err = _refused(capsys, write_beside_rewards(tmp_path, cfg, text), "trl.reward_funcs.0")
    assert "rewards.broken raised KeyError: 'answer'" in err


def test_reward_functions_get_the_rows_other_columns(tmp_path, capsys):
    """A transform that keeps a column (`answer`) hands it to the reward function, as in Axolotl's
    GSM8K example; the reward function checks it arrives with every completion."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"Write {n}.", "answer": str(n)}) + "\n" for n in range(16)))
    text = (
        "def to_prompt(cfg):\n"
        "    return lambda row: {'prompt': row['question'], 'answer': row['answer']}, {'remove_columns': ['question']}\n"
        "def exact(prompts, completions, answer, **kwargs):\n"
        "    assert len(answer) == len(completions) and all(p == f'Write {a}.' for p, a in zip(prompts, answer))\n"
        "    return [float(c.strip() == a) for c, a in zip(completions, answer)]\n")
    cfg = example_config(tmp_path, trl={"reward_funcs": ["rewards.exact"], "num_generations": 4,
                                        "max_completion_length": 4}, max_steps=2, micro_batch_size=8,
                         datasets=[{"path": str(rows), "type": "rewards.to_prompt"}])
    del cfg["test_datasets"]
    code, out, err = run_cli(capsys, "train", write_beside_rewards(tmp_path, cfg, text))
    assert code == 0, err[-3000:]
    assert read_json(tmp_path / "out" / "train_summary.json")["steps"] == 2
