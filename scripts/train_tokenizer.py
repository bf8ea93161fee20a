#!/usr/bin/env python
"""Train archtune's bundled byte-level BPE tokenizer on the bundled data (deterministic).

Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into
src/archtune/assets/tokenizer/ (or --out-dir). The result loads with
`transformers.AutoTokenizer.from_pretrained(dir)` as a `PreTrainedTokenizerFast`.

* Special tokens come first, in the order of SPECIAL_TOKENS, so their ids (0..14) are stable.
* The vocabulary has exactly VOCAB_SIZE (2048) entries: BPE is trained with that target, and
  if the corpus runs out of merges first the remainder is filled with `<unusedN>` special
  tokens (as Gemma does), so `len(tokenizer)` never depends on the corpus.
* `<bos>` is prepended when `add_special_tokens=True` (template post-processor, like Gemma).
  tokenizer_config.json has no add_bos_token key: transformers 5 ignores it when a
  tokenizer.json exists, so the post-processor is the one source of truth (note that the
  `add_bos_token` attribute of the loaded tokenizer then reads False although bos IS added).
* The chat template is Gemma-style (see CHAT_TEMPLATE).

Running the script twice gives byte-identical files.

Usage: python scripts/train_tokenizer.py [--data-dir examples/data] [--out-dir DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent

VOCAB_SIZE = 2048
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>",
    "<start_of_turn>", "<end_of_turn>",
    "<image_soft_token>", "<audio_soft_token>", "<video_soft_token>",
    "<start_of_image>", "<end_of_image>", "<start_of_audio>", "<end_of_audio>",
    "<vision_start>", "<vision_end>",
]
PAD, EOS, BOS, UNK = SPECIAL_TOKENS[:4]
MODEL_MAX_LENGTH = 2048

# Gemma-style: <bos>, then per message `<start_of_turn>{role}\n{content}<end_of_turn>\n`,
# "assistant" renders as "model", a system message is prepended to the first user turn,
# and add_generation_prompt appends `<start_of_turn>model\n`. Content may be a string or a
# list of {"type": "text", "text": ...} parts. The {% generation %} markers do not change the
# rendered text; they let `apply_chat_template(..., return_assistant_tokens_mask=True)` find
# the assistant tokens (the content and its <end_of_turn>).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] | trim -%}"
    "{%- else -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}"
    "{%- set ns.text = ns.text + part['text'] -%}"
    "{%- endfor -%}"
    "{%- set content = ns.text | trim -%}"
    "{%- endif -%}"
    "{{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{{- content + '<end_of_turn>' -}}"
    "{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{{- content + '<end_of_turn>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<start_of_turn>model\n' -}}"
    "{%- endif -%}"
)

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def corpus_texts(data_dir: Path) -> list[str]:
    """The training texts, in a fixed order: every bundled row rendered as it is trained on."""
    texts: list[str] = []

    def jsonl(name: str) -> list[dict]:
        path = data_dir / name
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    for name in ("quickstart/train.jsonl", "quickstart/test.jsonl"):
        for row in jsonl(name):
            fmt = ALPACA_PROMPT if row.get("input") else ALPACA_PROMPT_NO_INPUT
            texts.append(fmt.format(instruction=row["instruction"], input=row.get("input", "")) + row["output"])
    for row in jsonl("chat.jsonl"):
        texts.append("\n".join(f"{m['role']}\n{m['content']}" for m in row["messages"]))
        texts.append("\n".join(f"model\n{m['content']}" for m in row["messages"] if m["role"] == "assistant"))
    for row in jsonl("completion.jsonl"):
        texts.append(row["text"])
    corpus = data_dir / "corpus.txt"
    if corpus.exists():
        texts.extend(line for line in corpus.read_text(encoding="utf-8").splitlines() if line)
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name} got id {tok.token_to_id(name)}, expected {i}")
    # Fill up to the fixed size with reserved tokens, so len(tokenizer) == vocab_size.
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if missing < 0:
        raise RuntimeError(f"vocabulary is larger than {vocab_size}")
    if missing:
        tok.add_special_tokens([AddedToken(f"<unused{i}>", special=True, normalized=False) for i in range(missing)])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    return tok


def tokenizer_config(tok: Tokenizer) -> dict:
    added = {}
    for token_id in range(tok.get_vocab_size(with_added_tokens=True)):
        content = tok.id_to_token(token_id)
        if content in SPECIAL_TOKENS or content.startswith("<unused"):
            added[str(token_id)] = {
                "content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True,
            }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": PAD,
        "eos_token": EOS,
        "bos_token": BOS,
        "unk_token": UNK,
        "extra_special_tokens": [t for t in SPECIAL_TOKENS if t not in (PAD, EOS, BOS, UNK)],
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict:
    def entry(t: str) -> dict:
        return {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {
        "pad_token": entry(PAD),
        "eos_token": entry(EOS),
        "bos_token": entry(BOS),
        "unk_token": entry(UNK),
        "additional_special_tokens": [entry(t) for t in SPECIAL_TOKENS[4:]],
    }


def _dump(obj: dict) -> str:
    # Key order as built (tokenizer.json: as the tokenizers library writes it, vocab by id).
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write(tok: Tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # Re-serialise through json for a fixed indentation (the content is already deterministic).
    (out_dir / "tokenizer.json").write_text(_dump(json.loads(tok.to_str())), encoding="utf-8", newline="\n")
    (out_dir / "tokenizer_config.json").write_text(_dump(tokenizer_config(tok)), encoding="utf-8", newline="\n")
    (out_dir / "special_tokens_map.json").write_text(_dump(special_tokens_map()), encoding="utf-8", newline="\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "examples" / "data")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "src" / "archtune" / "assets" / "tokenizer")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    tok = build_tokenizer(corpus_texts(args.data_dir), args.vocab_size)
    write(tok, args.out_dir)
    n_unused = sum(1 for t in tok.get_vocab(with_added_tokens=True) if t.startswith("<unused"))
    print(f"wrote {args.out_dir}: {tok.get_vocab_size(with_added_tokens=True)} tokens "
          f"({n_unused} reserved <unusedN>)")


if __name__ == "__main__":
    main()
