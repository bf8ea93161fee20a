"""Tokenizers in GGUF: llama.cpp splits text as transformers does.

The tokenizer is built here in Gemma's layout (tests/gemma_tokenizer.py). archtune's writer
carries it as the model llama.cpp's converter writes for the family (Gemma 3 and the generic
families: "llama", pieces with scores; Gemma 4: "gemma4", pieces with merges), and llama.cpp
(llama-cpp-python, the file loaded for its vocabulary alone) must give the same ids as the
Hugging Face tokenizer on held-out text: the bundled test rows, chat-gemma turns with Gemma 4's
`<|turn>`/`<turn|>`, runs of spaces and newlines, characters only byte fallback can write.
Controls: what llama.cpp would split otherwise is refused before a file is written, and written
anyway it does split otherwise.
"""
from __future__ import annotations

import json

import pytest

from archtune.errors import UserError
from tests.local_tokenizers import HELD_OUT, SPLIT_TEXTS, build_byte_level_tokenizer, build_gemma_tokenizer

QUICKSTART_TEST = build_gemma_tokenizer.__globals__["DATA"] / "quickstart" / "test.jsonl"


@pytest.fixture(scope="module")
def gemma():
    return build_gemma_tokenizer()


def _needs_llama_cpp():
    pytest.importorskip("gguf", reason="the gguf package (archtune[gguf]) is not installed")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (archtune[gguf]) is not installed")


def _spec(model: str):
    from archtune.families.base import GgufArch

    return GgufArch("llama", sentencepiece_model=model)


def _vocab_file(tokenizer, path, spec):
    """A GGUF file holding only the tokenizer (and the few keys llama.cpp reads before it)."""
    import gguf

    from archtune.export.gguf_file import write_tokenizer

    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 64), (writer.add_embedding_length, 8),
                       (writer.add_feed_forward_length, 8), (writer.add_head_count, 1)):
        add(value)
    writer.add_layer_norm_rms_eps(1e-6)
    write_tokenizer(writer, tokenizer, len(tokenizer), [], spec)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _forced(tokenizer, path, spec, monkeypatch):
    """The control: the file written although the writer refuses it."""
    from archtune.export import gguf_file

    with monkeypatch.context() as m:
        m.setattr(gguf_file, "sentencepiece_splits_otherwise", lambda *a: None)
        return _vocab_file(tokenizer, path, spec)


def _texts(tokenizer):
    rows = [json.loads(line) for line in QUICKSTART_TEST.open(encoding="utf-8")]
    plain = ["\n".join(v for v in (r["instruction"], r["input"], r["output"]) if v) for r in rows]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": r["instruction"] + "\n" + r["input"]},
                                            {"role": "assistant", "content": r["output"]}], tokenize=False)
             for r in rows[:20]]
    return list(HELD_OUT) + plain + chats


def _mismatches(tokenizer, path) -> list[str]:
    import llama_cpp

    from archtune.export.llama_runtime import stdout_to_stderr

    with stdout_to_stderr():
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return [t for t in _texts(tokenizer) if llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
                != tokenizer(t, add_special_tokens=False)["input_ids"]]
    finally:
        llm.close()


@pytest.mark.parametrize("merges", ["sentencepiece", "trained"])
@pytest.mark.parametrize("model", ["llama", "gemma4"])
def test_llama_cpp_splits_held_out_text_as_transformers(model, merges, gemma, tmp_path):
    """Gemma's tokenizer (merges for every pair that joins into a piece, SentencePiece's order), and
    one with the BPE trainer's own merges: both carried exactly by both of llama.cpp's models."""
    _needs_llama_cpp()
    import gguf

    tokenizer = gemma if merges == "sentencepiece" else build_gemma_tokenizer(complete=False, whitespace=False)
    texts = _texts(tokenizer)
    assert len(texts) == 8 + 150 + 20 and any("<turn|>" in t for t in texts)
    assert any("<0xF0>" in tokenizer.convert_ids_to_tokens(tokenizer(t)["input_ids"]) for t in texts)  # byte fallback
    path = _vocab_file(tokenizer, tmp_path / "vocab.gguf", _spec(model))
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["tokenizer.ggml.model"]
    assert bytes(field.parts[field.data[0]]).decode() == model
    assert ("tokenizer.ggml.merges" in reader.fields) == (model == "gemma4")
    types = reader.fields["tokenizer.ggml.token_type"]
    assert sum(int(types.parts[i][0]) == gguf.TokenType.BYTE for i in types.data) == 256
    assert _mismatches(tokenizer, path) == []


def test_sentencepiece_scores_decide_the_joins(gemma, tmp_path, monkeypatch):
    """The control for "llama": pieces written with equal scores (llama.cpp then joins the leftmost
    pair) give other ids; the scores from the merges are what makes the split the same."""
    _needs_llama_cpp()
    import gguf

    flat = gguf.GGUFWriter.add_token_scores
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_scores", lambda self, scores: flat(self, [0.0] * len(scores)))
    assert len(_mismatches(gemma, _vocab_file(gemma, tmp_path / "flat.gguf", _spec("llama")))) > 50


def test_pieces_across_a_newline_are_refused_for_gemma4(tmp_path, monkeypatch):
    """Pieces learned across line ends: llama.cpp's gemma4 tokenizer splits newlines off first (its
    SentencePiece one does not, and carries them)."""
    _needs_llama_cpp()
    lines = build_gemma_tokenizer(words=r"\u2581?[^\u2581]+|\u2581+")
    with pytest.raises(UserError, match="newline beside other characters"):
        _vocab_file(lines, tmp_path / "refused.gguf", _spec("gemma4"))
    assert _mismatches(lines, _forced(lines, tmp_path / "forced.gguf", _spec("gemma4"), monkeypatch))
    assert _mismatches(lines, _vocab_file(lines, tmp_path / "spm.gguf", _spec("llama"))) == []


def test_newline_pieces_the_merges_do_not_make_are_refused_for_gemma4(tmp_path, monkeypatch):
    """Gemma's newline pieces without the merges that make them: llama.cpp's gemma4 tokenizer takes
    a run of newlines that is a piece whole, the BPE model splits it."""
    _needs_llama_cpp()
    unmade = build_gemma_tokenizer(complete=False)
    with pytest.raises(UserError, match="runs of newlines are pieces the merges do not make"):
        _vocab_file(unmade, tmp_path / "refused.gguf", _spec("gemma4"))
    assert _mismatches(unmade, _forced(unmade, tmp_path / "forced.gguf", _spec("gemma4"), monkeypatch))


def test_tokenizers_the_writer_cannot_carry_are_refused_by_name():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from archtune.export.gguf_file import tokenizer_model

    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("\u2581a", -1.0), ("a", -2.0)], unk_id=0))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(UserError, match="Unigram model") as exc:
        tokenizer_model(PreTrainedTokenizerFast(tokenizer_object=unigram, unk_token="<unk>"))
    assert exc.value.problems[0].key == "tokenizer_config" and "convert_hf_to_gguf.py" in str(exc.value)

    llama2 = json.loads(build_gemma_tokenizer().backend_tokenizer.to_str())  # Llama 2's: a \u2581 put in front
    llama2["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                                llama2["normalizer"]]}
    with pytest.raises(UserError, match="spaces otherwise"):
        tokenizer_model(PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(llama2))))

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.Lowercase()
    with pytest.raises(UserError, match="WordPiece"):
        tokenizer_model(PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]"))


def test_the_bundled_byte_level_tokenizer_stays_gpt2(gemma):
    from archtune.assets import load_tokenizer
    from archtune.export.gguf_file import tokenizer_model

    assert tokenizer_model(load_tokenizer()) == "gpt2"
    assert tokenizer_model(gemma) == "llama" and tokenizer_model(gemma, _spec("gemma4")) == "gemma4"


# ---------------------------------------------------------------- byte-level BPE with a model's own word split

def _split_mismatches(tokenizer, path) -> list[str]:
    import llama_cpp

    from archtune.export.llama_runtime import stdout_to_stderr

    rows = [json.loads(line) for line in QUICKSTART_TEST.open(encoding="utf-8")][:40]
    texts = list(SPLIT_TEXTS) + list(HELD_OUT[:6]) + [r["instruction"] + "\n" + r["output"] for r in rows]
    with stdout_to_stderr():
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return [t for t in texts if llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
                != tokenizer(t, add_special_tokens=False)["input_ids"]]
    finally:
        llm.close()


@pytest.mark.parametrize("pre", ["qwen2", "qwen35", "llama-bpe"])
def test_byte_level_splits_are_carried_with_llama_cpps_pre_tokenizer(pre, tmp_path):
    """Qwen 2's, Qwen 3.5's and Llama 3's word splits: written with llama.cpp's pre-tokenizer of that name,
    split as transformers splits (digits, contractions, combining marks, special tokens in text)."""
    _needs_llama_cpp()
    import gguf

    tokenizer = build_byte_level_tokenizer(pre)
    path = _vocab_file(tokenizer, tmp_path / "vocab.gguf", _spec("llama"))
    field = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == pre
    assert _split_mismatches(tokenizer, path) == []


@pytest.mark.parametrize("pre, other", [("qwen35", "qwen2"), ("llama-bpe", "qwen2")])
def test_another_pre_tokenizer_splits_otherwise(pre, other, tmp_path, monkeypatch):
    """The control: Qwen 3.5's tokenizer written with Qwen 2's pre-tokenizer splits words with combining
    marks otherwise; Llama 3's, digits. The pre-tokenizer written is what makes the ids the same."""
    _needs_llama_cpp()
    from archtune.export import gguf_file

    tokenizer = build_byte_level_tokenizer(pre)
    monkeypatch.setattr(gguf_file, "byte_level_pre", lambda data: other)
    assert _split_mismatches(tokenizer, _vocab_file(tokenizer, tmp_path / "other.gguf", _spec("llama")))


def test_an_unknown_word_split_is_refused():
    from archtune.export.gguf_file import tokenizer_model

    data = json.loads(build_byte_level_tokenizer("qwen2").backend_tokenizer.to_str())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+|."
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    with pytest.raises(UserError, match="Qwen 3.5's or Llama 3's word split"):
        tokenizer_model(PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data))))
