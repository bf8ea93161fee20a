"""Preference data (data/preference.py) and the Plan's preference rules (rl, reward_model)."""
from __future__ import annotations

import json

import pytest

from archtune.assets import load_tokenizer
from archtune.config import config_from_dict
from archtune.data.preference import prepare_preference_data, unpair
from archtune.errors import UserError
from archtune.models.tiny import build_tiny_config
from archtune.plan import resolve
from tests.data_plan import data_plan

USER = {"role": "user", "content": "Give the category of each word.\ncat red"}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def prepare(tmp_path, tok, rows, ds_type="chat_template.default", **keys):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    cfg = config_from_dict({"base_model": "tiny:llama", "rl": "dpo", "datasets": [{"path": str(path), "type": ds_type}],
                            **keys})
    return prepare_preference_data(data_plan(cfg), tok, progress=False)


def test_chat_pairs_prompt_is_the_generation_prompt_and_answers_end_at_the_turn_marker(tmp_path, tok):
    rows = [{"messages": [USER], "chosen": "animal color", "rejected": {"role": "assistant", "content": "red cat"}},
            {"messages": [USER], "chosen": [USER, {"role": "assistant", "content": "animal color"}],
             "rejected": "red cat"}]
    data = prepare(tmp_path, tok, rows)
    first, second = data.train[0], data.train[1]
    prompt = tok.apply_chat_template([USER], add_generation_prompt=True, tokenize=False)
    assert tok.decode(first["prompt_ids"]) == prompt
    assert first["prompt_ids"].count(tok.bos_token_id) == 1
    assert tok.decode(first["chosen_ids"]) == "animal color<end_of_turn>"  # not the newline after the marker
    assert tok.decode(first["rejected_ids"]) == "red cat<end_of_turn>"
    # A string, a message and a list whose last message is the answer are the same answer.
    assert first == second
    assert data.stats["train_rows"] == 2 and data.eval is None


def test_passthrough_strings_get_one_bos_and_eos(tmp_path, tok):
    rows = [{"prompt": "Q: cat red\nA:", "chosen": " animal color", "rejected": " red cat"}]
    row = prepare(tmp_path, tok, rows, "passthrough.default").train[0]
    assert row["prompt_ids"][0] == tok.bos_token_id and row["prompt_ids"].count(tok.bos_token_id) == 1
    assert row["chosen_ids"][-1] == tok.eos_token_id and row["rejected_ids"][-1] == tok.eos_token_id
    assert tok.decode(row["chosen_ids"][:-1]) == " animal color"


def test_malformed_rows_are_dropped_and_counted_or_listed_by_line(tmp_path, tok):
    rows = [{"messages": [USER], "chosen": "animal color", "rejected": "red cat"},
            {"messages": [USER], "chosen": "animal color"},  # no rejected answer
            "{not json"]
    data = prepare(tmp_path, tok, rows)
    assert data.stats["rows_dropped"] == {"bad_json": 1, "missing_field": 1}
    with pytest.raises(UserError) as err:
        prepare(tmp_path, tok, rows, strict_data=True)
    assert sorted(p.key.rsplit(":", 1)[1] for p in err.value.problems) == ["2", "3"]


def test_kto_rows_and_pairs_unpaired(tmp_path, tok):
    rows = [{"messages": [USER], "completion": "animal color", "label": True},
            {"messages": [USER], "completion": "red cat", "label": "false"}]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config_from_dict({"base_model": "tiny:llama", "rl": "kto",
                            "datasets": [{"path": str(path), "type": "chat_template.default"}]})
    data = prepare_preference_data(data_plan(cfg), tok, progress=False)
    assert data.train["label"] == [True, False]
    pair = {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}
    assert unpair([pair]) == [{"prompt_ids": [1, 2], "completion_ids": [3], "label": True},
                              {"prompt_ids": [1, 2], "completion_ids": [4], "label": False}]


def test_bradley_terry_rows_are_whole_conversations(tmp_path, tok):
    path = tmp_path / "bt.jsonl"
    path.write_text(json.dumps({"input": USER["content"], "chosen": "animal color", "rejected": "red cat"}) + "\n")
    cfg = config_from_dict({"base_model": "tiny:llama", "reward_model": True,
                            "datasets": [{"path": str(path), "type": "bradley_terry.chat_template"}]})
    row = prepare_preference_data(data_plan(cfg), tok, progress=False).train[0]
    whole = tok.apply_chat_template([USER, {"role": "assistant", "content": "animal color"}], tokenize=False)
    assert tok.decode(row["chosen_ids"]) == whole.rstrip()
    assert "prompt_ids" not in row


# ---------------------------------------------------------------- the Plan's rules

def plan(name="llama", **keys):
    cfg = config_from_dict({"base_model": f"tiny:{name}", "datasets": [{"path": "d.jsonl", "type": keys.pop(
        "ds_type", "chat_template.default")}], **keys})
    return resolve(cfg, build_tiny_config(name).to_dict())


def errors(p) -> list[str]:
    return [e.key for e in p.errors]


@pytest.mark.parametrize("keys, trainer, reference", [
    ({"rl": "dpo", "adapter": "lora"}, "DPOTrainer", "adapter_disabled"),
    ({"rl": "dpo"}, "DPOTrainer", "frozen_copy"),
    ({"rl": "ipo", "adapter": "lora"}, "DPOTrainer", "adapter_disabled"),
    ({"rl": "kto"}, "KTOTrainer", "frozen_copy"),
    ({"rl": "orpo", "adapter": "lora"}, "ORPOTrainer", "none"),
    ({"rl": "simpo"}, "CPOTrainer", "none"),
    ({"reward_model": True, "ds_type": "bradley_terry.chat_template"}, "RewardTrainer", "none"),
])
def test_method_trainer_and_reference_model(keys, trainer, reference):
    p = plan(**keys)
    assert not p.errors
    assert p.get("rl_trainer") == trainer
    assert p.get("rl_reference_model") == reference


def test_betas_and_losses_keep_axolotls_meanings():
    assert plan(rl="orpo", orpo_alpha=0.3).get("rl_beta") == 0.3
    assert plan(rl="dpo").get("rl_beta") == 0.1
    assert plan(rl="ipo").get("rl_loss_type") == ["ipo"]
    assert plan(rl="dpo", dpo_norm_loss=True, rpo_alpha=0.5).get("rl_loss_type") == ["sigmoid_norm", "sft"]
    assert "dpo_label_smoothing" in errors(plan(rl="ipo", dpo_label_smoothing=0.1))
    assert any("orpo_alpha has no effect" in w for w in plan(rl="dpo", orpo_alpha=0.2).warnings)


def test_chunked_cross_entropy_stays_off_for_trl_trainers():
    p = plan(rl="dpo", chunked_cross_entropy=True)
    assert p.get("chunked_cross_entropy") is False and p.source("chunked_cross_entropy") == "auto"
    assert any("chunked_cross_entropy has no effect" in w for w in p.warnings)


def test_packing_padding_free_and_fsdp_are_refused_with_the_reason():
    p = plan(rl="dpo", sample_packing=True, dpo_padding_free=True)
    assert {"sample_packing", "dpo_padding_free"} <= set(errors(p))
    assert "padding-free" in p.errors[0].message


def test_data_types_must_match_the_training():
    assert errors(plan(ds_type="chat_template.default")) == ["datasets.0.type"]  # preference rows, SFT config
    assert errors(plan(rl="dpo", ds_type="alpaca")) == ["datasets.0.type"]
    assert errors(plan(reward_model=True, ds_type="chat_template.default")) == ["datasets.0.type"]


def test_reward_model_head_and_lora_score():
    p = plan(reward_model=True, ds_type="bradley_terry.chat_template", adapter="lora")
    assert p.get("model_auto_class") == "AutoModelForSequenceClassification"
    assert p.get("lora_modules_to_save") == ["score"]
    assert p.get("reward_head_class") is None  # transformers' own LlamaForSequenceClassification


@pytest.mark.parametrize("name, head", [("gemma4-moe", "Gemma4ForSequenceClassification"),
                                        ("qwen3_5-moe", "Qwen3_5MoeForSequenceClassification")])
def test_reward_head_transformers_lacks_is_the_familys_generic_one(name, head):
    # transformers 5.24 has no sequence-classification class for Gemma 4 or Qwen 3.5 MoE: their
    # families name the PreTrainedModel class the generic head goes on.
    p = plan(name, reward_model=True, ds_type="bradley_terry.chat_template", adapter="lora")
    assert not p.errors and p.get("reward_head_class") == head and p.source("reward_head_class") == "family"


def test_reward_model_without_any_head_class_is_refused_before_loading():
    cfg = config_from_dict({"base_model": "tiny:llama", "reward_model": True,
                            "datasets": [{"path": "d.jsonl", "type": "bradley_terry.chat_template"}]})
    p = resolve(cfg, {**build_tiny_config("llama").to_dict(), "model_type": "cohere"})  # no *ForSequenceClassification
    assert errors(p) == ["reward_model"] and "no sequence-classification" in p.errors[0].message
