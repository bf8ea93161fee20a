"""Preference and reward training end to end (`archtune train` / `evaluate` on tiny:llama).

The bundled preference data (scripts/make_preference_data.py) prefers the quickstart task's answer
(the categories of three words) over the other task's (the words reversed), on word lists the test
files hold out. Each method trains once (module-scoped runs and evaluations, shared by the
assertions) for 6 to 30 steps; held-out preference accuracy must reach 0.9 and the reward margin
must grow.
"""
from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import REPO, read_json, run_cli, write_config

PREF = REPO / "examples" / "data" / "preference"
COMMON = {"base_model": "tiny:llama", "sequence_len": 64, "micro_batch_size": 8, "learning_rate": 0.01,
          "warmup_steps": 3, "logging_steps": 5, "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "seed": 3,
          "use_tensorboard": False}
PAIRS = {"datasets": [{"path": str(PREF / "train.jsonl"), "type": "chat_template.default"}],
         "test_datasets": [{"path": str(PREF / "test.jsonl"), "type": "chat_template.default"}]}
METHODS = {
    "dpo": {"rl": "dpo", "max_steps": 15, **PAIRS},
    "ipo": {"rl": "ipo", "max_steps": 10, **PAIRS},
    "orpo": {"rl": "orpo", "max_steps": 30, **PAIRS},
    "simpo": {"rl": "simpo", "max_steps": 10, **PAIRS},
    # KTO trains on unpaired rows and is evaluated on the held-out pairs.
    "kto": {"rl": "kto", "max_steps": 15, **PAIRS,
            "datasets": [{"path": str(PREF / "kto_train.jsonl"), "type": "chat_template.default"}]},
    "reward": {"reward_model": True, "max_steps": 20,
               "datasets": [{"path": str(PREF / "reward_train.jsonl"), "type": "bradley_terry.chat_template"}],
               "test_datasets": [{"path": str(PREF / "reward_test.jsonl"), "type": "bradley_terry.chat_template"}]},
    # Full fine-tune: the reference is a frozen copy of the starting weights.
    "dpo_full": {"rl": "dpo", "max_steps": 6, "adapter": None, "learning_rate": 0.001, **PAIRS},
    # QLoRA: a bitsandbytes 4-bit base (its CPU path), the reference is that base with the adapter off.
    "dpo_qlora": {"rl": "dpo", "max_steps": 6, "adapter": "qlora", "load_in_4bit": True, **PAIRS},
}


class Runs:
    def __init__(self, root, capsys):
        self.root, self.capsys, self.done, self.evaluated = root, capsys, {}, {}

    def config(self, name: str):
        keys = {**COMMON, **METHODS[name], "output_dir": str(self.root / name)}
        return write_config(self.root / f"{name}.yaml", **{k: v for k, v in keys.items() if v is not None})

    def __call__(self, name: str) -> dict:
        if name not in self.done:
            code, out, err = run_cli(self.capsys, "train", self.config(name))
            assert code == 0, err[-3000:]
            self.done[name] = read_json(self.root / name / "train_summary.json")
        return self.done[name]

    def evaluate(self, name: str) -> dict:
        """`archtune evaluate CONFIG --json` on the trained run."""
        if name not in self.evaluated:
            self(name)
            code, out, err = run_cli(self.capsys, "evaluate", self.config(name), "--json")
            assert code == 0, err[-3000:]
            self.evaluated[name] = json.loads(out)
        return self.evaluated[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("preference"), None)


@pytest.fixture
def trained(runs, capsys):
    runs.capsys = capsys
    return runs


@pytest.mark.parametrize("name", ["dpo", "ipo", "orpo", "simpo", "kto", "reward"])
def test_held_out_preference_accuracy_reaches_0_9_and_the_margin_grows(trained, name):
    s = trained(name)
    assert s["eval_rewards/accuracies"] >= 0.9, s
    assert s["eval_rewards/margins"] > s["eval_rewards/margins_initial"]
    assert s["eval_rewards/chosen"] > s["eval_rewards/rejected"]
    assert s["data"]["eval_rows"] == 64
    assert s["train_tokens"] > 0 and s["tokens_per_second"] > 0  # the real tokens of every sequence trained on


def test_dpo_ld_alpha_weighs_the_longer_answers_extra_tokens(tmp_path, capsys):
    """dpo_ld_alpha (Axolotl 0.21, TRL's ld_alpha) on pairs whose rejected answer is twice as long: 1.0
    trains exactly as plain DPO; 0.0 leaves the longer answer's extra tokens out of its log-probability,
    so the losses differ once the policy has moved from the reference (step 1 is ln 2 either way)."""
    rows = [json.loads(line) for line in (PREF / "train.jsonl").read_text().splitlines()[:24]]
    for row in rows:
        row["rejected"]["content"] = f"{row['rejected']['content']} {row['rejected']['content']}"
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summaries = {}
    for alpha in (None, 1.0, 0.0):
        keys = {**COMMON, "rl": "dpo", "max_steps": 3, "logging_steps": 1, "output_dir": str(tmp_path / str(alpha)),
                "datasets": [{"path": str(tmp_path / "pairs.jsonl"), "type": "chat_template.default"}]}
        config = write_config(tmp_path / f"{alpha}.yaml", **keys, **({"dpo_ld_alpha": alpha} if alpha is not None else {}))
        code, out, err = run_cli(capsys, "train", config)
        assert code == 0, err[-3000:]
        summaries[alpha] = read_json(tmp_path / str(alpha) / "train_summary.json")
    plain, one, zero = summaries[None], summaries[1.0], summaries[0.0]
    assert abs(one["train_loss_last"] - plain["train_loss_last"]) < 1e-6
    assert abs(zero["train_loss_first"] - plain["train_loss_first"]) < 1e-6
    assert abs(zero["train_loss_last"] - plain["train_loss_last"]) > 1e-4


def test_summary_plot_and_adapter(trained):
    s = trained("dpo")
    assert s["method"] == "dpo" and s["trainer"] == "DPOTrainer" and s["reference_model"] == "adapter_disabled"
    # A fresh adapter is the base model: before training every reward is exactly 0.
    assert s["eval_rewards/chosen_initial"] == s["eval_rewards/margins_initial"] == 0.0
    assert all(s[k] is not None for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"))
    out = trained.root / "dpo"
    assert (out / "loss.png").stat().st_size > 10_000
    assert (out / "adapter_model.safetensors").is_file() and s["train_tokens"] > 0


REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@pytest.mark.parametrize("name", ["dpo", "reward", "dpo_full"])
def test_evaluate_json_reports_the_final_held_out_rewards(trained, name):
    s = trained(name)
    result = trained.evaluate(name)
    # The public shape: eval_loss, eval_tokens, eval_rows, plus the rewards under eval_ names.
    assert set(result) == {"eval_loss", "eval_tokens", "eval_rows"} | {f"eval_{k}" for k in REWARDS}
    assert isinstance(result["eval_loss"], float) and isinstance(result["eval_tokens"], int)
    for key in REWARDS:
        assert result[f"eval_{key}"] == pytest.approx(s[f"eval_{key}"], abs=1e-5), key
    assert result["eval_loss"] == pytest.approx(s["eval_loss_final"], abs=1e-5)
    assert s["eval_loss_initial"] is not None and s["eval_loss_final"] != s["eval_loss_initial"]
    assert result["eval_rows"] == 64 and result["eval_tokens"] > 64


def test_eval_loss_is_the_chosen_answers_token_weighted_cross_entropy(trained):
    """eval_loss of a preference run is defined as for supervised data: the chosen answers' tokens
    are the labels. Checked against transformers' own loss, one row at a time."""
    import torch

    from archtune.train.assembly import assemble_model
    from archtune.config import load_config
    from archtune.data.preference import prepare_preference_data
    from archtune.train.recipe import plan_for

    s = trained("dpo")
    cfg = load_config(trained.config("dpo"))
    setup = plan_for(cfg)
    rows = prepare_preference_data(setup.plan, setup.tokenizer, progress=False).eval
    built = assemble_model(setup.plan, setup.tokenizer, "evaluate")
    model = built.model
    assert built.weights == "adapter"
    total, tokens = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["prompt_ids"] + r["chosen_ids"]])
            labels = torch.tensor([[-100] * len(r["prompt_ids"]) + r["chosen_ids"]])
            n = len(r["chosen_ids"])
            total += float(model(input_ids=ids, labels=labels).loss) * n
            tokens += n
    assert s["eval_loss_final"] == pytest.approx(total / tokens, rel=1e-5)
    assert trained.evaluate("dpo")["eval_tokens"] == tokens


def test_qlora_dpo_trains_on_a_4bit_base_and_evaluate_reloads_it(trained):
    """QLoRA + DPO on bitsandbytes' CPU path: the policy's linears are 4-bit, the reference is the
    4-bit base with the adapter disabled, and `evaluate` reloads the base in 4 bit (as training saw
    it), so it reports the figures of the run's final evaluation."""
    pytest.importorskip("bitsandbytes")
    s, lora = trained("dpo_qlora"), trained("dpo")
    assert s["adapter"] == "qlora" and s["reference_model"] == "adapter_disabled"
    assert s["model_bytes"] < 0.8 * lora["model_bytes"]  # the same tiny:llama base, its linears in 4 bit
    assert s["eval_rewards/margins"] > s["eval_rewards/margins_initial"] == 0.0
    result = trained.evaluate("dpo_qlora")
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        assert result[f"eval_{key}"] == pytest.approx(s[f"eval_{key}" if key != "loss" else "eval_loss_final"],
                                                      abs=1e-5), key


def test_full_fine_tune_trains_against_a_frozen_copy(trained):
    s = trained("dpo_full")
    assert s["adapter"] is None and s["reference_model"] == "frozen_copy"
    assert s["eval_rewards/margins"] > s["eval_rewards/margins_initial"] == 0.0


def test_packing_and_sft_types_are_refused_before_loading(trained, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", **{**COMMON, **METHODS["dpo"], "sample_packing": True,
                                               "output_dir": str(tmp_path / "o")})
    code, out, err = run_cli(trained.capsys, "train", cfg)
    assert code == 2 and "sample_packing" in err + out and "padding-free" in err + out


# ---------------------------------------------------------------- the DPO examples, one per family

DPO_EXAMPLES = {"gemma4-26b-a4b-moe.yaml": ("gemma4-moe", "gemma4"), "gemma3-4b.yaml": ("gemma3", "gemma3"),
                "qwen3_5-35b-a3b.yaml": ("qwen3_5-moe", "qwen3_5_moe")}


@pytest.mark.parametrize("example", sorted(DPO_EXAMPLES))
def test_dpo_example_plans_on_its_tiny_counterpart(capsys, example):
    tiny, family = DPO_EXAMPLES[example]
    path = REPO / "examples" / "dpo" / example
    header = path.read_text().split("\nbase_model:")[0]
    assert f"archtune train examples/dpo/{example}" in header and "Needs:" in header
    code, out, err = run_cli(capsys, "check", path, f"base_model=tiny:{tiny}", "--json", "--nproc", "2")
    data = json.loads(out)
    assert code == 0 and data["errors"] == [] and data["warnings"] == [], (data["errors"], data["warnings"])
    s = data["settings"]
    assert data["family"] == family and s["rl_trainer"]["value"] == "DPOTrainer"
    assert s["rl_reference_model"]["value"] == "adapter_disabled"
    assert s["freeze_mm_modules"]["value"] is True  # text-only preference data: the towers stay frozen


def test_gemma4_moe_dpo_example_trains_with_expert_lora_and_scattermoe(capsys, tmp_path):
    """The family rules hold under DPO: expert LoRA through ScatterMoE, checkpointing, towers frozen."""
    small = tmp_path / "test.jsonl"
    small.write_text("".join((PREF / "test.jsonl").read_text().splitlines(keepends=True)[:8]))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "train", REPO / "examples" / "dpo" / "gemma4-26b-a4b-moe.yaml",
                           "base_model=tiny:gemma4-moe", "bf16=false", "max_steps=2",
                           # forced, whatever the shape rule picks: this test is about ScatterMoE's expert LoRA
                           "experts_implementation=scattermoe", "micro_batch_size=2",
                           "gradient_accumulation_steps=1", "sequence_len=64", "learning_rate=0.01",
                           f"test_datasets.0.path={small}", f"output_dir={out}")
    assert code == 0, err[-3000:]
    s = read_json(out / "train_summary.json")
    assert s["steps"] == 2 and s["experts_implementation"] == "scattermoe"
    assert s["eval_rewards/margins"] != s["eval_rewards/margins_initial"]
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("experts" in k for k in keys) and any("self_attn" in k for k in keys)
    assert not any("vision" in k for k in keys)


# ---------------------------------------------------------------- the same guards as supervised runs

def test_a_poisoned_pair_stops_dpo_naming_its_file_and_line(tmp_path, capsys):
    """The non-finite guard of supervised runs, on DPO: the step with the poisoned pair stops before
    the optimizer applies it, with the same message (rows as FILE:LINE, the last good checkpoint)."""
    rows = (PREF / "train.jsonl").read_text().splitlines()[:16]
    poisoned = json.loads(rows[5])
    poisoned["messages"][-1]["content"] += " ☠"
    rows[5] = json.dumps(poisoned, ensure_ascii=False)
    path = tmp_path / "poisoned.jsonl"
    path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", **{**COMMON, "rl": "dpo", "micro_batch_size": 2, "num_epochs": 1,
                                               "save_steps": 1, "output_dir": str(out),
                                               "datasets": [{"path": str(path), "type": "chat_template.default"}],
                                               "plugins": ["tests.e2e.poison_plugin.PoisonPlugin"],
                                               "allow_external_plugins": True})
    code, _, err = run_cli(capsys, "train", cfg)
    text = " ".join(err.split())
    assert code == 3, err[-3000:]
    assert "stopped at step " in text and "the loss is nan" in text and "Traceback" not in err
    step = int(text.split("stopped at step ")[1].split(":")[0])
    batch = text.split("The batch held: ")[1].split(". Nothing")[0].split(", ")
    # micro_batch_size 2: the poisoned pair (line 6) and one other, each named once
    assert f"{path}:6" in batch and len(batch) == 2 and all(b.startswith(f"{path}:") for b in batch), batch
    if step > 1:
        assert f"the last good checkpoint is {out / f'checkpoint-{step - 1}'}" in text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{i}" for i in range(1, step)]
    assert not list(out.glob(".staging/*")) and not (out / "train_summary.json").exists()
