"""GRPO on every embedded tiny family (`rl: grpo`, `archtune train` in this process), 3 steps of 2
prompts x 4 completions of 6 tokens: LoRA on each family, expert LoRA on the MoE families, QLoRA
(a 4-bit base, bitsandbytes on CPU) on Llama and the Gemma 4 MoE, full fine-tuning on Llama and
the Qwen 3.5 MoE. Each run must train: a finite loss, every trainable parameter of the adapter
changed, no frozen parameter changed, and the family's rules applied: the multimodal towers
frozen, the experts' LoRA trained where asked. A test-side plugin (tests/e2e/param_watch_plugin.py)
records the parameters at the start and end of training.

The reward is the number of distinct characters of a completion: random completions differ in
it, so every group has a spread and every step a gradient.
"""
from __future__ import annotations

import json
import math

import pytest
import yaml

from archtune.families import find_tiny
from tests.e2e.conftest import REPO, read_json, run_cli

WATCH_ENV = "ARCHTUNE_TEST_PARAM_WATCH"
REWARDS = (
    "def distinct(prompts, completions, **kwargs):\n"
    "    text = lambda c: c[0]['content'] if isinstance(c, list) else c\n"
    "    return [len(set(text(c))) / 10 for c in completions]\n")
EXPERTS = {"lora_target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}
LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8}
RUNS = {
    "gemma4-dense-lora": ("gemma4-dense", LORA),
    "gemma4-e2b-lora": ("gemma4-e2b", LORA),
    "gemma4-moe-lora": ("gemma4-moe", {**LORA, **EXPERTS}),
    "gemma4-unified-lora": ("gemma4-unified", LORA),
    "gemma3-lora": ("gemma3", LORA),
    "qwen3_5-lora": ("qwen3_5", LORA),
    "qwen3_5-moe-lora": ("qwen3_5-moe", {**LORA, **EXPERTS}),
    "llama-lora": ("llama", LORA),
    "llama-qlora": ("llama", {**LORA, "adapter": "qlora", "load_in_4bit": True}),
    "gemma4-moe-qlora": ("gemma4-moe", {**LORA, "adapter": "qlora", "load_in_4bit": True}),
    "llama-full": ("llama", {}),
    "qwen3_5-moe-full": ("qwen3_5-moe", {}),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo_families")
    (path / "rewards_distinct.py").write_text(REWARDS)
    return path


def train(root, capsys, monkeypatch, name: str) -> tuple[dict, dict, dict]:
    model, keys = RUNS[name]
    cfg = {"base_model": f"tiny:{model}", "rl": "grpo",
           "trl": {"reward_funcs": ["rewards_distinct.distinct"], "num_generations": 4, "max_completion_length": 6},
           "datasets": [{"path": str(REPO / "examples/grpo/data/train.jsonl"), "type": "rewards.number_prompts"}],
           "sequence_len": 64, "micro_batch_size": 8, "max_steps": 3, "learning_rate": 0.01, "logging_steps": 1,
           "seed": 7, "output_dir": str(root / name), "use_tensorboard": False,
           "plugins": ["tests.e2e.param_watch_plugin.ParamWatchPlugin"], "allow_external_plugins": True, **keys}
    (root / "rewards.py").write_text((REPO / "examples/grpo/rewards.py").read_text())
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    watch = root / f"{name}.params.json"
    monkeypatch.setenv(WATCH_ENV, str(watch))
    code, out, err = run_cli(capsys, "train", path)
    assert code == 0, (out + err)[-3000:]
    summary = read_json(root / name / "train_summary.json")
    plan = read_json(root / name / "run_record.json")["plan"]["settings"]
    return summary, plan, json.loads(watch.read_text())


@pytest.mark.parametrize("name", list(RUNS))
def test_grpo_trains_on_every_family(root, capsys, monkeypatch, name):
    model, keys = RUNS[name]
    s, plan, params = train(root, capsys, monkeypatch, name)
    print(f"{name}: {s['steps']} steps, reward {s['reward_mean_first']:.3f} -> {s['reward_mean_last']:.3f}, "
          f"{s['train_seconds']} s of training, {s['trainable_params']} trainable of {s['total_params']}")
    assert s["method"] == "grpo" and s["steps"] == 3
    assert math.isfinite(s["train_loss_last"]) and math.isfinite(s["reward_mean_last"])
    assert all(p["finite"] for p in params.values())
    trainable = {n for n, p in params.items() if p["trainable"]}
    frozen = set(params) - trainable
    assert trainable and not [n for n in frozen if params[n]["changed"]]  # nothing frozen moved
    unchanged = [n for n in trainable if not params[n]["changed"]]
    assert not unchanged, unchanged[:5]  # every trainable parameter moved
    if keys.get("adapter"):
        assert all("lora_" in n for n in trainable) and [n for n in frozen if "base_layer" in n]
    family, _ = find_tiny(model)
    if family.mm_module_prefixes:  # the towers stay frozen (the default), for LoRA and full fine-tuning
        assert plan["freeze_mm_modules"]["value"] is True
        towers = [n for n in params if any(f"{p}." in n for p in family.mm_module_prefixes)]
        assert towers and not [n for n in towers if params[n]["trainable"]]
    if "lora_target_parameters" in keys:  # the experts' LoRA is trained too
        assert [n for n in trainable if "experts" in n]
    if keys.get("load_in_4bit"):
        assert s["adapter"] == "qlora"
