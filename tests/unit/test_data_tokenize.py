"""Formats, label masks, bos/eos, length handling, prompts at inference, the collator."""
from __future__ import annotations

import json

import pytest
import torch

from archtune.assets import load_tokenizer
from archtune.config.schema import Config, DatasetConfig
from archtune.data import DataCollator, encode_prompt, prepare_data, render_prompt
from archtune.data.tokenize import RowEncoder, TokenizeSettings
from archtune.data.formats import ALPACA_WITH_INPUT
from tests.data_plan import data_plan


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def prepare(tmp_path, tok, rows, ds=None, **kw):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = Config(base_model="tiny:test", datasets=[{"path": str(data), **(ds or {})}],
                 dataset_prepared_path=str(tmp_path / "prepared"), **kw)
    return prepare_data(data_plan(cfg), tok, progress=False)


def trained_spans(tok, row) -> list[str]:
    """The labelled tokens of a row, decoded, one string per contiguous run."""
    spans, run = [], []
    for i, lab in zip(row["input_ids"], row["labels"]):
        if lab != -100:
            assert lab == i
            run.append(i)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans + ([tok.decode(run)] if run else [])


def dropped(stats):
    return {k: v for k, v in stats["rows_dropped"].items() if v}


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How are you?"}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "  4  "}]


# ---------------------------------------------------------------- alpaca / completion

def test_alpaca_prompt_is_masked_and_answer_ends_with_one_eos(tmp_path, tok):
    rows = [{"instruction": "Add", "input": "2+2", "output": "4"},
            {"instruction": "Greet", "output": "Hello there."},
            {"instruction": "Say <eos>", "input": "", "output": "ok <eos>"}]
    p = prepare(tmp_path, tok, rows)
    texts = [tok.decode(r) for r in p.train["input_ids"]]
    # Axolotl's `type: alpaca` text (AlpacaPrompter): its system line, longer when there is an input
    with_input = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n")
    no_input = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request.\n\n")
    assert texts == [f"<bos>{with_input}### Instruction:\nAdd\n\n### Input:\n2+2\n\n### Response:\n4<eos>",
                     f"<bos>{no_input}### Instruction:\nGreet\n\n### Response:\nHello there.<eos>",
                     f"<bos>{no_input}### Instruction:\nSay <eos>\n\n### Response:\nok <eos>"]
    assert [trained_spans(tok, r) for r in p.train] == [["4<eos>"], ["Hello there.<eos>"], ["ok <eos>"]]
    for r in p.train:
        ids = r["input_ids"]
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
        assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id
        assert r["length"] == len(ids) == len(r["labels"])
    # the prompt is the same text, tokenized the same, as `archtune generate` will send
    ds = DatasetConfig(path="x")
    first_label = p.train[1]["labels"].index(next(x for x in p.train[1]["labels"] if x != -100))
    assert encode_prompt(ds, tok, "Greet") == p.train[1]["input_ids"][:first_label]


def test_alpaca_field_names_and_train_on_inputs(tmp_path, tok):
    rows = [{"q": "Why?", "ctx": "", "a": "Because."}]
    ds = {"field_instruction": "q", "field_input": "ctx", "field_output": "a"}
    p = prepare(tmp_path, tok, rows, ds)
    assert trained_spans(tok, p.train[0]) == ["Because.<eos>"]
    p = prepare(tmp_path, tok, rows, ds, train_on_inputs=True)
    assert p.train[0]["labels"] == p.train[0]["input_ids"]


def test_completion_trains_every_token(tmp_path, tok):
    p = prepare(tmp_path, tok, [{"text": "Once upon a time."}, {"text": ""}, {"body": "x"}], {"type": "completion"})
    r = p.train[0]
    assert tok.decode(r["input_ids"]) == "<bos>Once upon a time.<eos>"
    assert r["labels"][1:] == r["input_ids"][1:]  # bos is the only unlabelled token (it is never predicted)
    assert dropped(p.stats) == {"empty": 1, "missing_field": 1}


# ---------------------------------------------------------------- chat_template

def test_chat_masks_match_the_templates_generation_markers(tmp_path, tok):
    """Prefix rendering gives the same mask transformers derives from {% generation %}."""
    p = prepare(tmp_path, tok, [{"messages": CHAT}], {"type": "chat_template"})
    r = p.train[0]
    assert trained_spans(tok, r) == ["Hello! How are you?<end_of_turn>", "4<end_of_turn>"]
    oracle = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert r["input_ids"] == oracle["input_ids"]
    assert [int(x != -100) for x in r["labels"]] == oracle["assistant_masks"]
    assert r["input_ids"].count(tok.bos_token_id) == 1  # the template renders <bos>; none added
    assert p.stats["mask_realigned"] == 0
    # the generation prompt is exactly what precedes the first answer
    first = r["labels"].index(next(x for x in r["labels"] if x != -100))
    ds = DatasetConfig(path="x", type="chat_template")
    assert render_prompt(ds, tok, "Hi") == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert encode_prompt(ds, tok, "Be brief.\n\nHi there") == r["input_ids"][:first]


def test_chat_roles_to_train_and_message_mappings(tmp_path, tok):
    conv = [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "See you."}]
    ds = {"type": "chat_template", "field_messages": "conversations",
          "message_property_mappings": {"role": "from", "content": "value"}}
    p = prepare(tmp_path, tok, [{"conversations": conv}], ds)
    assert trained_spans(tok, p.train[0]) == ["Hello.<end_of_turn>", "See you.<end_of_turn>"]
    p = prepare(tmp_path, tok, [{"conversations": conv}], {**ds, "roles_to_train": ["user", "assistant"]})
    assert trained_spans(tok, p.train[0]) == [
        "Hi there<end_of_turn>", "Hello.<end_of_turn>", "Bye<end_of_turn>", "See you.<end_of_turn>"]


def test_chat_rows_the_template_refuses_or_that_train_nothing(tmp_path, tok):
    rows = [{"messages": CHAT},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},  # not alternating
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": []},
            {"messages": "hello"},
            {"messages": [{"role": "user"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}]
    p = prepare(tmp_path, tok, rows, {"type": "chat_template"})
    assert p.stats["train_rows"] == 1
    assert dropped(p.stats) == {"template_error": 1, "no_labels": 1, "empty": 2, "wrong_type": 1, "missing_field": 1}


def test_custom_jinja_chat_template_from_the_config(tmp_path, tok):
    template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}: {{ m.content }}<end_of_turn>"
                "{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant: {% endif %}")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    p = prepare(tmp_path, tok, [{"messages": msgs}], {"type": "chat_template"}, chat_template=template)
    assert tok.decode(p.train[0]["input_ids"]) == "<bos><start_of_turn>user: Hi<end_of_turn><start_of_turn>assistant: Yo<end_of_turn>"
    # The generation prompt ends in a space that byte-level BPE merges into the answer's
    # first token ("ĠYo"): that token is trained (it carries answer text) and the row is
    # counted, since the prompt's own tokens are not a prefix of the row's.
    assert trained_spans(tok, p.train[0]) == [" Yo<end_of_turn>"]
    assert p.stats["mask_realigned"] == 1
    assert render_prompt(DatasetConfig(path="x", type="chat_template"), tok, "Q", chat_template=template) == \
        "<bos><start_of_turn>user: Q<end_of_turn><start_of_turn>assistant: "


def test_a_template_whose_prefixes_do_not_line_up_is_realigned(tmp_path, tok):
    """This template marks the last message, so a prefix rendering is not a prefix of the
    full one: the start comes from a sentinel rendering, the end from where the renderings
    agree plus the end marker, and the row is counted. No prompt token is trained."""
    template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}"
                "{% if loop.last %}[last]{% endif %}<end_of_turn>\n{% endfor %}"
                "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "More"}, {"role": "assistant", "content": "Sure"}]
    p = prepare(tmp_path, tok, [{"messages": msgs}], {"type": "chat_template"}, chat_template=template)
    assert trained_spans(tok, p.train[0]) == ["Yo<end_of_turn>", "Sure[last]<end_of_turn>"]
    assert p.stats["mask_realigned"] == 1


# ---------------------------------------------------------------- lengths

def test_too_long_rows_are_dropped_or_truncated(tmp_path, tok):
    rows = [{"instruction": "Short", "output": "ok"},
            {"instruction": "Long answer", "output": "word " * 100},
            {"instruction": "Long question " * 50, "output": "late"}]
    p = prepare(tmp_path, tok, rows, sequence_len=96)
    assert p.stats["train_rows"] == 1 and dropped(p.stats) == {"too_long": 2} and p.stats["truncated"] == 0
    p = prepare(tmp_path, tok, rows, sequence_len=96, excess_length_strategy="truncate")
    # the long answer is cut to 96 tokens; the long question leaves no answer inside 96: dropped
    assert p.train["length"] == [p.train[0]["length"], 96]
    assert p.stats["truncated"] == 1 and dropped(p.stats) == {"too_long": 1}
    assert trained_spans(tok, p.train[1])[0].startswith("word word")
    assert max(p.train["length"]) <= 96


# ---------------------------------------------------------------- tokenization paths

def test_direct_backend_and_piecewise_paths_agree_with_the_tokenizer(tok):
    settings = TokenizeSettings(sequence_len=512)
    rows = [{"instruction": "Tell me about café ☕ and naïve résumés", "input": "ok\n\nthen", "output": "Sure — ünïcode 😀!"}]
    fast = RowEncoder(tok, DatasetConfig(path="x"), settings)
    slow = RowEncoder(tok, DatasetConfig(path="x"), settings)
    slow.backend = None  # what a tokenizer without offsets goes through
    a, b = fast.encode(rows[0]), slow.encode(rows[0])
    text = ALPACA_WITH_INPUT.format(**rows[0]) + rows[0]["output"]
    assert a["input_ids"] == tok(text)["input_ids"] + [tok.eos_token_id]
    assert (a["input_ids"], a["labels"]) == (b["input_ids"], b["labels"])
    assert tok.decode([x for x in a["labels"] if x != -100]) == "Sure — ünïcode 😀!<eos>"

    chat = RowEncoder(tok, DatasetConfig(path="x", type="chat_template"), settings)
    slow_chat = RowEncoder(tok, DatasetConfig(path="x", type="chat_template"), settings)
    slow_chat.backend = None
    a, b = chat.encode({"messages": CHAT}), slow_chat.encode({"messages": CHAT})
    assert (a["input_ids"], a["labels"]) == (b["input_ids"], b["labels"])


# ---------------------------------------------------------------- collator

def test_collator_pads_and_masks(tok):
    rows = [{"input_ids": [2, 10, 11, 1], "labels": [-100, -100, 11, 1], "length": 4},
            {"input_ids": [2, 12], "labels": [-100, 12], "length": 2}]
    batch = DataCollator(tok, drop_attention_mask=True)(rows)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[2, 10, 11, 1], [2, 12, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 11, 1], [-100, 12, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert int(batch["attention_mask"].sum()) == 6  # real tokens
    wide = DataCollator(tok, pad_to_multiple_of=8, drop_attention_mask=True)(rows)
    assert wide["input_ids"].shape == (2, 8) and wide["labels"][0, 4:].eq(-100).all()
    assert DataCollator(pad_token_id=7, drop_attention_mask=True)(rows)["input_ids"][1, 2:].tolist() == [7, 7]


def test_a_lone_surrogate_is_dropped_as_undecodable_not_a_crash(tok):
    """JSON "\\ud800" decodes to a str the Rust tokenizer refuses (TypeError before this check)."""
    encoder = RowEncoder(tok, DatasetConfig(path="x", type="completion"), TokenizeSettings(sequence_len=64))
    bad, good = encoder.encode_many([{"text": "\ud800"}, {"text": "a b c"}])
    assert bad["_drop"] == "undecodable" and good["_drop"] == ""
