"""Tokenizers built here (no hub) in the layouts real checkpoints ship: Gemma's (below) and the
byte-level BPEs of Qwen 2, Qwen 3.5 and Llama 3 (`build_byte_level_tokenizer`).

A Gemma-style tokenizer: the layout Gemma 3 and Gemma 4 checkpoints ship.

What a Gemma tokenizer.json holds (transformers' GemmaConverter writes it from the SentencePiece
model): a BPE model with byte fallback over `▁`-pieces (normalizer: " " -> "▁"; pre-tokenizer:
Split(" ", merged_with_previous), a no-op once spaces are `▁`; decoder: `▁` -> " ", byte fallback,
fuse), the 256 byte pieces `<0x00>`..`<0xFF>` in the vocabulary (not added tokens), the special
tokens first (`<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3, `<mask>` 4, then Gemma 4's turn, media
and channel tokens), `<bos>` added in front, and merges for every pair of pieces whose
concatenation is a piece, ranked by the piece they make (SentencePiece's own order: what makes
the BPE model merge as SentencePiece does).

The pieces are learned from the bundled example data the way SentencePiece learns them: words
with their leading `▁`, runs of `▁`, runs of newlines; no piece crosses a word or a line.
"""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data"

# Gemma 4's special tokens, by their real names.
SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>",
           "<|audio>", "<audio|>", "<|audio|>", "<|video|>", "<|channel>", "<channel|>", "<|think|>", "<|tool_call>",
           "<tool_call|>", '<|"|>')
BYTES = tuple(f"<0x{b:02X}>" for b in range(256))
# Gemma's whitespace pieces: runs of newlines and of spaces.
WHITESPACE = tuple("\n" * k for k in range(1, 5)) + tuple("▁" * k for k in range(1, 9))
# How SentencePiece cuts text before it learns pieces.
WORDS = r"▁?[^▁\n]+|▁+|\n+"


def _texts():
    for line in (DATA / "quickstart" / "train.jsonl").open(encoding="utf-8"):
        row = json.loads(line)
        yield "\n".join(v for v in (row["instruction"], row["input"], row["output"]) if v)
    for line in (DATA / "chat.jsonl").open(encoding="utf-8"):
        for message in json.loads(line).get("messages", []):
            if isinstance(message.get("content"), str):
                yield message["content"]
    yield (DATA / "corpus.txt").read_text(encoding="utf-8")


def complete_merges(vocab: dict[str, int], skip: set[str]) -> list[tuple[str, str]]:
    """Every (a, b) with a, b and a + b pieces, ranked by the id of a + b (then a's, b's id)."""
    merges = []
    for piece, i in vocab.items():
        if piece in skip:
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab and a not in skip and b not in skip:
                merges.append((i, vocab[a], vocab[b], a, b))
    return [(a, b) for *_, a, b in sorted(merges)]


def build_gemma_tokenizer(pieces: int = 1024, *, complete: bool = True, words: str = WORDS, whitespace: bool = True):
    """A `PreTrainedTokenizerFast` in Gemma's layout with about `pieces` entries. `complete=False`
    keeps the trainer's own merges (fewer than SentencePiece's order needs); `words` is the split
    the pieces are learned within; `whitespace=False` leaves out Gemma's whitespace pieces."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, \
        trainers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + BYTES + (WHITESPACE if whitespace else ()))}
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.pre_tokenizer = pre_tokenizers.Split(Regex(words), "isolated")
    learner.train_from_iterator(_texts(), trainers.BpeTrainer(
        vocab_size=pieces - len(vocab), show_progress=False, max_token_length=16))
    learned = json.loads(learner.to_str())["model"]
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):  # creation order
        vocab.setdefault(piece, len(vocab))
    skip = set(SPECIAL) | set(BYTES)
    merges = complete_merges(vocab, skip) if complete else [tuple(m) for m in learned["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    from archtune.families.gemma4 import CHAT_TEMPLATE

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>", chat_template=CHAT_TEMPLATE)


# Held-out text llama.cpp must split as transformers does: runs of spaces and newlines, leading
# spaces, characters the pieces lack (byte fallback), the turn tokens inside text.
HELD_OUT = (
    "Name the category of each word: sun head soda",
    " leading space, and  two   spaces",
    "tabs\tand\r\nCRLF\n\n\nthree newlines",
    "   ",
    "\n",
    "naïve café — “quotes” 😀 漢字",
    "<bos><|turn>user\nName the category<turn|>\n<|turn>model\nweather body drink<turn|>\n",
    "<|turn>system\nBe brief.<turn|>\n<|turn>user\n  spaced\n\nout  <turn|>\n",
)


# Text in NFC (the tokenizers normalize to it, llama.cpp does not): digit runs, contractions, marks that
# compose with nothing, special tokens in text.
SPLIT_TEXTS = ("12345 and 2026-12-07", "don't, I'M, they'll", "x\u0301yz q\u0308 \u0915\u093f\u0924\u093e\u092c",
               "tabs\tand  spaces\n\n", "<|im_start|>user\nName the category<|im_end|>\n")
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>")
# ChatML, as Qwen's templates write turns.
CHATML = ("{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim + '<|im_end|>\\n' }}"
          "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


def build_byte_level_tokenizer(pre: str, pieces: int = 900):
    """A byte-level BPE learned from the bundled data with the word split llama.cpp calls `pre`
    ("qwen2", "qwen35", "llama-bpe"), as Qwen's and Llama 3's tokenizer.json write it: NFC,
    Split(regex, isolated), ByteLevel without its own split; Qwen's special tokens, ChatML."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from archtune.export.gguf_file import BYTE_LEVEL_SPLITS

    regex = next(r for r, name in BYTE_LEVEL_SPLITS.items() if name == pre)
    tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(_texts()) + list(SPLIT_TEXTS) * 50, trainers.BpeTrainer(
        vocab_size=pieces, special_tokens=list(QWEN_SPECIAL), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


__all__ = ["BYTES", "CHATML", "HELD_OUT", "QWEN_SPECIAL", "SPECIAL", "SPLIT_TEXTS", "build_byte_level_tokenizer",
           "build_gemma_tokenizer", "complete_merges"]
