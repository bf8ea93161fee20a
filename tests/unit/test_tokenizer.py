"""archtune's bundled tokenizer (src/archtune/assets/tokenizer) and the bundled data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from archtune.assets import SPECIAL_TOKENS, TOKENIZER_DIR, VOCAB_SIZE, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

ALPACA = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return load_tokenizer()


def _bundled_texts() -> list[str]:
    texts = []
    for row in _jsonl(DATA / "quickstart" / "test.jsonl") + _jsonl(DATA / "quickstart" / "train.jsonl")[:200]:
        fmt = ALPACA if row["input"] else ALPACA_NO_INPUT
        texts.append(fmt.format(**row) + row["output"])
    for row in _jsonl(DATA / "chat.jsonl")[:100]:
        texts.extend(m["content"] for m in row["messages"])
    texts.extend(row["text"] for row in _jsonl(DATA / "completion.jsonl")[:100])
    return texts


def test_loads_as_fast_tokenizer_both_ways(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    auto = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert isinstance(auto, PreTrainedTokenizerFast)
    assert auto("cat dog")["input_ids"] == tok("cat dog")["input_ids"]
    assert load_tokenizer() is not tok  # a fresh object on every call


def test_vocabulary_size(tok):
    assert VOCAB_SIZE == 2048
    assert len(tok) == VOCAB_SIZE
    assert len(tok.get_vocab()) == VOCAB_SIZE
    assert max(tok.get_vocab().values()) == VOCAB_SIZE - 1


def test_special_token_ids(tok):
    assert len(SPECIAL_TOKENS) == 15
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(token) == i, token
        assert tok.convert_ids_to_tokens(i) == token
    assert (tok.pad_token, tok.pad_token_id) == ("<pad>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<eos>", 1)
    assert (tok.bos_token, tok.bos_token_id) == ("<bos>", 2)
    assert (tok.unk_token, tok.unk_token_id) == ("<unk>", 3)
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    # Special tokens in text are single tokens, never split.
    ids = tok("<start_of_turn>user\nhi<end_of_turn>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 4 and ids[-1] == 5


def test_bos_is_added_once(tok):
    ids = tok("Reverse the order of the words.")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1
    assert tok.eos_token_id not in ids
    plain = tok("Reverse the order of the words.", add_special_tokens=False)["input_ids"]
    assert plain == ids[1:]
    assert tok.add_bos_token
    assert AutoTokenizer.from_pretrained(TOKENIZER_DIR)("x")["input_ids"][0] == tok.bos_token_id


def test_round_trip_on_bundled_rows(tok):
    texts = _bundled_texts() + ["Unicode: naïve café 東京 🙂\ttab  two spaces\n\nend", " leading space", ""]
    assert len(texts) > 300
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_task_words_are_single_tokens(tok):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_data
    finally:
        sys.path.pop(0)
    for word in make_data.WORDS + list(make_data.CATEGORIES):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word


def test_quickstart_rows_are_short(tok):
    for row in _jsonl(DATA / "quickstart" / "test.jsonl"):
        fmt = ALPACA if row["input"] else ALPACA_NO_INPUT
        assert len(tok(fmt.format(**row) + row["output"])["input_ids"]) + 1 < 64


CHAT = [
    {"role": "system", "content": "Answer with the words only."},
    {"role": "user", "content": "Reverse the order of the words.\ncat apple red"},
    {"role": "assistant", "content": "red apple cat"},
    {"role": "user", "content": "Give the category of each word.\ncat apple"},
]


def test_chat_template_renders_gemma_style(tok):
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<bos><start_of_turn>user\nAnswer with the words only.\n\nReverse the order of the words.\ncat apple red<end_of_turn>\n"
        "<start_of_turn>model\nred apple cat<end_of_turn>\n"
        "<start_of_turn>user\nGive the category of each word.\ncat apple<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    no_system = tok.apply_chat_template(CHAT[1:3], tokenize=False)
    assert no_system == (
        "<bos><start_of_turn>user\nReverse the order of the words.\ncat apple red<end_of_turn>\n"
        "<start_of_turn>model\nred apple cat<end_of_turn>\n"
    )
    parts = [{"role": "user", "content": [{"type": "text", "text": "cat dog"}]}]
    assert tok.apply_chat_template(parts, tokenize=False) == "<bos><start_of_turn>user\ncat dog<end_of_turn>\n"
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([CHAT[1], CHAT[1]], tokenize=False)


def test_chat_template_tokens_and_assistant_mask(tok):
    out = tok.apply_chat_template(CHAT[:3], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = out["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    trained = [i for i, m in zip(ids, out["assistant_masks"]) if m]
    assert tok.decode(trained) == "red apple cat<end_of_turn>"


def test_save_pretrained_keeps_behaviour(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert len(again) == VOCAB_SIZE
    assert again("cat")["input_ids"] == tok("cat")["input_ids"]
    assert again.apply_chat_template(CHAT, tokenize=False) == tok.apply_chat_template(CHAT, tokenize=False)


def test_training_script_is_reproducible(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_tokenizer.py"), "--out-dir", str(tmp_path)],
        check=True, capture_output=True, timeout=120,
    )
    for name in TOKENIZER_FILES:
        assert (tmp_path / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name


def test_data_script_is_reproducible_and_test_is_held_out(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_data.py"), "--out-dir", str(tmp_path)],
        check=True, capture_output=True, timeout=120,
    )
    for name in ("quickstart/train.jsonl", "quickstart/test.jsonl", "chat.jsonl", "completion.jsonl", "corpus.txt"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    train = _jsonl(DATA / "quickstart" / "train.jsonl")
    test = _jsonl(DATA / "quickstart" / "test.jsonl")
    assert all(set(row) == {"instruction", "input", "output"} for row in train + test)
    seen = {(r["instruction"], r["input"]) for r in train}
    assert not any((r["instruction"], r["input"]) in seen for r in test)
    for row in _jsonl(DATA / "chat.jsonl"):
        roles = [m["role"] for m in row["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
