"""archtune's GGUF writer, on the `gguf` package (the format's own Python library).

From the merged (or fully fine-tuned) model in memory: the text model's tensors under llama.cpp's
names (the `gguf` package's tensor map, after the family's transforms: `Family.gguf`), the
hyperparameters every llama.cpp architecture reads (and the family's own keys), and the
tokenizer (tokens, types, merges or scores, special token ids, whether BOS is added, the chat
template): a byte-level BPE as llama.cpp's "gpt2" model (with the pre-tokenizer of its word split:
GPT-2's, Qwen 2's, Qwen 3.5's, Llama 3's), a SentencePiece-style one (Gemma's) as the
model llama.cpp's converter writes for the family; a tokenizer llama.cpp would split otherwise is
refused before anything is written.
Multimodal towers are not written: llama.cpp keeps them in a separate projector file (mmproj),
which this writer does not produce; the GGUF holds the language model.

The tensors are converted to their file type one at a time as they are written, so the file's
data is never held in memory beside the model. Tensor types: 1-D tensors (norms, biases, scalars)
and the family's `keep_f32` tensors (and the norms, gates and kernels llama.cpp always reads in
float32) are float32, as llama.cpp's converter writes them; the rest are the outtype (f32, f16,
bf16, or q8_0 through the `gguf` package's quantizer; a tensor whose rows q8_0's blocks of 32 do
not divide stays f16).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from archtune.errors import UserError


@dataclass
class GgufWritten:
    path: Path
    arch: str
    tensors: int
    dropped: list[str] = field(default_factory=list)  # tower tensors left out (mmproj is not written)
    types: dict[str, int] = field(default_factory=dict)  # GGML type name -> tensors


def _qtypes():
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}


def _file_type(outtype: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


def text_config_of(model) -> dict[str, Any]:
    config = model.config.to_dict()
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def text_tensors(model, language_model_prefix: str, tied: bool) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name as a stand-alone text model names it, tensor) for the language model; (name, None) for
    every other tensor (towers, projectors), which the GGUF leaves out."""
    prefix = f"{language_model_prefix}." if language_model_prefix else "model."
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix):
            yield "model." + name[len(prefix):], tensor
        elif name == "lm_head.weight":
            if not tied:
                yield name, tensor
        else:
            yield name, None


# ---------------------------------------------------------------- hyperparameters

def _rope(text: dict) -> tuple[dict, dict]:
    params = text.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        return params.get("full_attention") or {}, params.get("sliding_attention") or {}
    legacy = {"rope_theta": text["rope_theta"]} if "rope_theta" in text else {}
    return {**legacy, **params}, {}


def write_hparams(writer, text: dict, vocab_size: int, rope_types: tuple[str, ...] = ()) -> None:
    """The keys llama.cpp's architectures share, from the text config (Hugging Face key names).
    `rope_types`: RoPE types the architecture's own keys encode (not refused here)."""
    import gguf

    layers = int(text["num_hidden_layers"])
    heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    writer.add_block_count(layers)
    writer.add_context_length(int(text.get("max_position_embeddings") or 4096))
    writer.add_embedding_length(int(text["hidden_size"]))
    if text.get("intermediate_size"):
        writer.add_feed_forward_length(int(text["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(text.get("num_key_value_heads") or heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(text.get("rms_norm_eps") or 1e-6))
    writer.add_vocab_size(vocab_size)
    full, sliding = _rope(text)
    writer.add_rope_dimension_count(int(head_dim * float(full.get("partial_rotary_factor")
                                                         or text.get("partial_rotary_factor") or 1.0)))
    if full.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(full["rope_theta"]))
    if sliding.get("rope_theta") is not None:
        writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
    kind = full.get("rope_type")
    if kind == "linear" and full.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    elif kind not in (None, "default", *rope_types):
        raise UserError.single("base_model", f"the model's RoPE scaling {kind!r} is not written to GGUF by archtune",
                               "export --format merged, or a model with default or linear RoPE")
    types = text.get("layer_types") or []
    if "sliding_attention" in types and text.get("sliding_window"):
        writer.add_sliding_window(int(text["sliding_window"]))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    if text.get("num_experts") or text.get("num_local_experts"):
        writer.add_expert_count(int(text.get("num_experts") or text.get("num_local_experts")))
    if text.get("num_experts_per_tok"):
        writer.add_expert_used_count(int(text["num_experts_per_tok"]))


# ---------------------------------------------------------------- tokenizer

BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _token_types(tokenizer, byte_pieces: bool = False, visible: tuple[str, ...] = ()) -> tuple[list[str], list[int]]:
    """Tokens in id order and their llama.cpp types: added special tokens CONTROL (USER_DEFINED
    where llama.cpp shows them in output: `visible`), other added tokens USER_DEFINED, the
    `<0xXX>` pieces BYTE when `byte_pieces` (byte fallback), ids without a token UNUSED."""
    import gguf

    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special and added[i].content not in visible
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.BYTE if byte_pieces and BYTE_PIECE.fullmatch(by_id[i])
                         else gguf.TokenType.NORMAL)
    return tokens, types


# The word splits of byte-level BPE tokenizers (a tokenizer.json's Split regex before ByteLevel) that
# llama.cpp has a pre-tokenizer for, by the name its converter writes (llama.cpp's llama-vocab.cpp
# quotes each regex from the tokenizer.json it was written for).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
BYTE_LEVEL_SPLITS = {
    # Qwen 2 / Qwen 3: one digit a piece
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    # Qwen 3.5: combining marks stay with the letters before them
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen35",
    # Llama 3: up to three digits a piece
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}


def byte_level_pre(tokenizer_json: dict) -> str | None:
    """llama.cpp's pre-tokenizer for a byte-level BPE tokenizer: "gpt-2" for ByteLevel's own split,
    the name of a known Split regex followed by ByteLevel without its own (`BYTE_LEVEL_SPLITS`), or
    None (not byte-level, or a split llama.cpp has no pre-tokenizer for). A Unicode NFC normalizer
    is allowed: llama.cpp's converter writes those tokenizers the same way (text already in NFC,
    as most text is, splits the same)."""
    model = tokenizer_json.get("model") or {}
    pre = tokenizer_json.get("pre_tokenizer") or {}
    normalizer = tokenizer_json.get("normalizer")
    if model.get("type") != "BPE" or model.get("byte_fallback") or (normalizer or {"type": "NFC"})["type"] != "NFC":
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and normalizer is None:
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(steps) != 2:
        return None
    split, level = steps
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert") \
            or level.get("type") != "ByteLevel" or level.get("use_regex", True):
        return None
    name = BYTE_LEVEL_SPLITS.get((split.get("pattern") or {}).get("Regex"))
    # llama.cpp takes a word that is a token whole (ignore_merges) for Llama 3's split only, as its tokenizer.json says
    if name and bool(model.get("ignore_merges")) != (name == "llama-bpe"):
        return None
    return name


def _byte_level_bpe(tokenizer_json: dict) -> bool:
    return byte_level_pre(tokenizer_json) is not None


def _replaces_spaces(step: dict | None) -> bool:
    return bool(step) and step.get("type") == "Replace" and step.get("pattern") == {"String": " "} \
        and step.get("content") == "\u2581"


def sentencepiece_layout(tokenizer_json: dict) -> str | None:
    """Why a BPE tokenizer with byte fallback is not the SentencePiece layout llama.cpp reads (Gemma's:
    spaces as `▁` and nothing put in front, every `<0xXX>` piece, plain merges), or None when it is."""
    model = tokenizer_json.get("model") or {}
    normalizer, pre = tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")
    no_op_split = pre is None or (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "})
    metaspace = bool(pre) and pre.get("type") == "Metaspace" and pre.get("replacement") == "\u2581"
    if metaspace and pre.get("prepend_scheme", "always") != "never":
        return f"its Metaspace pre-tokenizer puts a \u2581 in front (prepend_scheme {pre.get('prepend_scheme')!r})"
    if not (_replaces_spaces(normalizer) and no_op_split) and not (normalizer is None and metaspace):
        return (f"it writes spaces otherwise than as \u2581 alone (normalizer {(normalizer or {}).get('type')}, "
                f"pre-tokenizer {(pre or {}).get('type')})")
    vocab = model.get("vocab") or {}
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        return f"its byte fallback lacks {len(missing)} of the 256 byte pieces (e.g. {missing[0]})"
    if model.get("ignore_merges") or model.get("dropout") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        return "its BPE model takes whole words first, drops merges at random or marks subwords"
    return None


def _merges(tokenizer_json: dict) -> list[tuple[str, str]]:
    return [tuple(m) if not isinstance(m, str) else tuple(m.split(" ", 1))
            for m in (tokenizer_json["model"].get("merges") or [])]


def sentencepiece_splits_otherwise(tokenizer_json: dict, model: str, special: set[str],
                                   pieces_of: Callable[[str], list[str]]) -> str | None:
    """Why llama.cpp's tokenizer `model` would split some text otherwise than this BPE model, or None.

    "gemma4" applies the merges by rank within each run of newlines and each run of other text, and
    takes a run of newlines that is a piece whole: the BPE model's split (`pieces_of`: the model's
    split of one run) when no piece holds a newline beside something else and the merges make each
    newline piece. A Metaspace pre-tokenizer that splits before each `▁`: neither runtime splits
    there, which changes nothing while no piece has a `▁` after its start. ("llama" joins the pair
    whose piece scores best, scored by the piece's first merge: the merges' own choice wherever a
    pair that joins into a piece without being a merge never meets, as in a trained BPE; the
    prompts' check after writing is what shows it for the data.)
    """
    vocab = tokenizer_json["model"]["vocab"]
    pieces = [p for p in vocab if p not in special and not BYTE_PIECE.fullmatch(p)]
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("split", True):
        inner = [p for p in pieces if "\u2581" in p[1:]]
        if inner:
            return (f"{len(inner)} pieces hold a \u2581 after their start (e.g. {inner[0]!r}), where its "
                    "pre-tokenizer splits")
    if model != "gemma4":
        return None
    mixed = [p for p in pieces if "\n" in p and p.strip("\n")]
    if mixed:
        return (f"{len(mixed)} pieces hold a newline beside other characters (e.g. {mixed[0]!r}); llama.cpp's "
                "gemma4 tokenizer splits runs of newlines from the rest first")
    unmade = [p for p in pieces if p and not p.strip("\n") and pieces_of(p) != [p]]
    if unmade:
        return (f"{len(unmade)} runs of newlines are pieces the merges do not make (e.g. {unmade[0]!r}); llama.cpp's "
                "gemma4 tokenizer takes such a run whole")
    return None


CONVERT = "export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py"
# llama.cpp's own converter writes the same tokenizer model for the family: the split differs there too.
SERVE_MERGED = ("export --format merged and serve it with transformers or vLLM, or train a tokenizer whose pieces "
                "llama.cpp splits the same way")


def _refuse_tokenizer(why: str, fix: str = CONVERT) -> UserError:
    return UserError.single("tokenizer_config", f"archtune's GGUF writer cannot carry this tokenizer: {why}", fix)


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def tokenizer_model(tokenizer, spec=None) -> str:
    """llama.cpp's tokenizer model for `tokenizer`: "gpt2" for a byte-level BPE whose word split
    llama.cpp has (`byte_level_pre`: GPT-2's, Qwen 2's, Qwen 3.5's, Llama 3's);
    for a SentencePiece-style BPE (Gemma's: `▁` for spaces, byte fallback) the model the family's
    llama.cpp converter writes (`spec.sentencepiece_model`: "llama" with scores, or "gemma4" with
    merges). A tokenizer llama.cpp would split otherwise is refused (UserError), before any file."""
    data = _tokenizer_json(tokenizer)
    model = data.get("model") or {}
    if _byte_level_bpe(data):
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        kind = getattr(spec, "sentencepiece_model", "llama")
        bpe = tokenizer.backend_tokenizer.model
        why = sentencepiece_layout(data)
        if why:
            raise _refuse_tokenizer(why)
        why = sentencepiece_splits_otherwise(data, kind, {t.content for t in tokenizer.added_tokens_decoder.values()},
                                             lambda text: [t.value for t in bpe.tokenize(text)])
        if why:
            raise _refuse_tokenizer(why, SERVE_MERGED)
        return kind
    if model.get("type") == "Unigram":
        raise _refuse_tokenizer("it is a Unigram model; llama.cpp's SentencePiece tokenizer joins pieces by score "
                                "greedily and its T5 tokenizer needs the precompiled normalizer, neither of which "
                                "archtune writes")
    raise _refuse_tokenizer(f"it is {model.get('type')} / {(data.get('pre_tokenizer') or {}).get('type')}; the "
                            "writer carries byte-level BPE with GPT-2's, Qwen 2's, Qwen 3.5's or Llama 3's word split "
                            "and SentencePiece-style BPE with byte fallback (Gemma's)")


def write_tokenizer(writer, tokenizer, vocab_size: int, eos_ids: list[int], spec=None) -> None:
    """The tokenizer as llama.cpp reads it (`tokenizer_model`): tokens and their types, the merges
    (or, for SentencePiece, the scores), special token ids, whether BOS is added, the chat template."""
    import gguf

    kind = tokenizer_model(tokenizer, spec)
    data = _tokenizer_json(tokenizer)
    tokens, types = _token_types(tokenizer, byte_pieces=kind != "gpt2", visible=getattr(spec, "visible_tokens", ()))
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [gguf.TokenType.UNUSED] * (vocab_size - len(types))
    writer.add_tokenizer_model(kind)
    merges = [" ".join(m) for m in _merges(data)]
    if kind == "gpt2":
        writer.add_tokenizer_pre(byte_level_pre(data))
    writer.add_token_list(tokens)
    if kind == "llama":
        # SentencePiece joins the pair whose piece scores best: the earlier its first merge, the better.
        first = {}
        for rank, (a, b) in enumerate(_merges(data)):
            first.setdefault(a + b, rank)
        writer.add_token_scores([-float(first[t] + 1) if t in first else 0.0 for t in tokens])
    elif kind != "gpt2":
        writer.add_token_scores([-1000.0] * len(tokens))  # as llama.cpp's converter: merges decide, not scores
    writer.add_token_types(types)
    if kind != "llama":
        writer.add_token_merges(merges)
    if kind != "gpt2":
        writer.add_add_space_prefix(False)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    for extra in eos_ids:  # the end of a chat turn: llama.cpp stops generating there too
        if extra != tokenizer.eos_token_id:
            writer.add_eot_token_id(int(extra))
            break
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    writer.add_add_eos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# ---------------------------------------------------------------- tensors

# Tensors llama.cpp reads as float32 whatever the file type (as its own converter writes them):
# norms, router and shared-expert gates, convolution kernels, and every tensor not named .weight.
_ALWAYS_F32 = re.compile(r"(_norm\.weight|ffn_gate_inp(_shexp)?\.weight|ssm_conv1d\.weight)$|(?<!\.weight)$")


def _target_type(tensor: torch.Tensor, qtype, qtypes):
    """The type a tensor is written in: q8_0 needs rows in blocks of 32 (else f16)."""
    if qtype == qtypes["q8_0"] and tensor.shape[-1] % 32:
        return qtypes["f16"]
    return qtype


def _array(tensor: torch.Tensor, qtype, qtypes) -> np.ndarray:
    """One tensor in its file type, made when it is written (never all of them at once)."""
    import gguf

    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if qtype == qtypes["f32"]:
        return data
    if qtype == qtypes["f16"]:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _info(tensor: torch.Tensor, qtype, qtypes) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, numpy dtype, bytes) of `_array(tensor, qtype)`, without making it."""
    import gguf

    shape = tuple(int(d) for d in tensor.shape)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if qtype == qtypes["f32"]:
        return shape, np.dtype(np.float32), 4 * count
    if qtype == qtypes["f16"]:
        return shape, np.dtype(np.float16), 2 * count
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape, dtype=np.int64))


def write_gguf(model, tokenizer, spec, language_model_prefix: str, path: Path, outtype: str,
               name: str = "") -> GgufWritten:
    """`model` (a merged or fully trained transformers model) as a GGUF file at `path`."""
    import gguf

    text = text_config_of(model)
    tied = bool(text.get("tie_word_embeddings", model.config.to_dict().get("tie_word_embeddings", False)))
    qtypes = _qtypes()
    main_type = qtypes[outtype]
    tensors = []
    dropped = []
    for hf_name, tensor in text_tensors(model, language_model_prefix, tied):
        if tensor is None:
            dropped.append(hf_name)
            continue
        tensors.extend(spec.tensors(hf_name, tensor, text) if spec.tensors else [(hf_name, tensor)])
    vocab_rows = next((int(t.shape[0]) for n, t in tensors if n == "model.embed_tokens.weight"), len(tokenizer))
    layers = int(text["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[_arch_enum(spec.arch)], layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), spec.arch)
    if name:
        writer.add_name(name)
    writer.add_file_type(_file_type(outtype))
    write_hparams(writer, text, vocab_rows, spec.rope_types)
    if spec.metadata:
        # The family's keys replace shared ones (e.g. per-layer head counts): GGUFWriter overwrites,
        # and its warning about it says nothing to the user.
        gguf_log = logging.getLogger("gguf.gguf_writer")
        level = gguf_log.level
        gguf_log.setLevel(logging.ERROR)
        try:
            spec.metadata(writer, text)
        finally:
            gguf_log.setLevel(level)
    if spec.extra_tensors:
        tensors.extend(spec.extra_tensors(text))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    write_tokenizer(writer, tokenizer, vocab_rows, eos if isinstance(eos, list) else [eos] if eos is not None else [],
                    spec)
    keep = [re.compile(p) for p in spec.keep_f32]
    types: dict[str, int] = {}
    unmapped = []
    planned = []
    for hf_name, tensor in tensors:
        target = hf_name if hf_name.startswith(("blk.", "token_embd", "output")) else \
            names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            unmapped.append(hf_name)
            continue
        f32 = tensor.dim() <= 1 or bool(_ALWAYS_F32.search(target)) or any(p.search(target) for p in keep)
        qtype = _target_type(tensor, qtypes["f32"] if f32 else main_type, qtypes)
        shape, dtype, nbytes = _info(tensor, qtype, qtypes)
        writer.add_tensor_info(target, shape, dtype, nbytes, raw_dtype=qtype)
        planned.append((tensor, qtype, nbytes))
        types[qtype.name] = types.get(qtype.name, 0) + 1
    if unmapped:
        writer.close()
        path.unlink(missing_ok=True)
        raise UserError.single("base_model", f"{len(unmapped)} tensors have no llama.cpp name for arch {spec.arch} "
                               f"(e.g. {', '.join(unmapped[:3])})",
                               "export --format merged; this architecture variant is not written to GGUF yet")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor, qtype, nbytes in planned:  # converted one at a time: the file's data never all in memory
        data = _array(tensor, qtype, qtypes)
        assert data.nbytes == nbytes, (tensor.shape, qtype)
        writer.write_tensor_data(data)
    writer.close()
    return GgufWritten(path, spec.arch, sum(types.values()), dropped, types)


def _arch_enum(arch: str) -> str:
    import gguf

    for member, value in gguf.MODEL_ARCH_NAMES.items():
        if value == arch:
            return member.name
    raise UserError.single("base_model", f"the gguf package has no architecture {arch!r}",
                           "upgrade the gguf package (pip install -U gguf)")


__all__ = ["BYTE_LEVEL_SPLITS", "BYTE_PIECE", "GgufWritten", "byte_level_pre", "sentencepiece_layout",
           "sentencepiece_splits_otherwise", "text_config_of", "text_tensors", "tokenizer_model", "write_gguf",
           "write_hparams", "write_tokenizer"]
