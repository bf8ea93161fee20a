"""Embedded tiny random models (`base_model: tiny:NAME`, `archtune init-tiny NAME DIR`).

The shapes live with their families (`Family.tiny_models`); this module only builds them:
seeded random weights, archtune's own tokenizer, transformers' Auto classes. Nothing here
names a family.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Special tokens every tiny config may point its multimodal ids at (archtune's tokenizer has them all).
SPECIAL_TOKENS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
    "<image_soft_token>", "<audio_soft_token>", "<video_soft_token>",
    "<start_of_image>", "<end_of_image>", "<start_of_audio>", "<end_of_audio>",
    "<vision_start>", "<vision_end>",
)


@dataclass(frozen=True)
class TokenIds:
    """Vocabulary size and special token ids of a tokenizer, for tiny configs.

    `ids["<image_soft_token>"]` raises KeyError when the tokenizer lacks the token (instead of
    silently mapping it to `<unk>` as `convert_tokens_to_ids` does).
    """

    vocab_size: int
    pad: int
    bos: int
    eos: int
    by_token: dict[str, int]

    def __getitem__(self, token: str) -> int:
        try:
            return self.by_token[token]
        except KeyError:
            raise KeyError(f"the tokenizer has no special token {token!r}") from None


def special_token_ids(tokenizer: "PreTrainedTokenizerBase") -> TokenIds:
    vocab = tokenizer.get_vocab()
    by_token = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS if tok in vocab}

    def required(attr: str, fallback: str) -> int:
        value = getattr(tokenizer, attr)
        if value is None:
            value = by_token.get(fallback)
        if value is None:
            raise KeyError(f"the tokenizer has no {attr.removesuffix('_id')} ({fallback})")
        return int(value)

    return TokenIds(
        vocab_size=len(tokenizer),
        pad=required("pad_token_id", "<pad>"),
        bos=required("bos_token_id", "<bos>"),
        eos=required("eos_token_id", "<eos>"),
        by_token=by_token,
    )


def tiny_model_names() -> list[str]:
    from archtune.families import tiny_names

    return tiny_names()


def _find(name: str):
    from archtune.families import find_tiny

    try:
        return find_tiny(name)
    except KeyError:
        raise KeyError(f"no tiny model named {name!r}; valid names: {', '.join(tiny_model_names())}") from None


def _tokenizer():
    from archtune.assets import load_tokenizer

    return load_tokenizer()


def build_tiny_config(name: str, tokenizer: "PreTrainedTokenizerBase | None" = None):
    """The transformers config of tiny model `name` (no weights)."""
    _, tiny = _find(name)
    return tiny.build_config(tokenizer if tokenizer is not None else _tokenizer())


def build_tiny_model(
    name: str, seed: int | None = 0, dtype: torch.dtype = torch.float32
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Tiny model `name` with random weights drawn from `seed`, and archtune's tokenizer.

    Same seed -> bitwise the same weights. The global RNG is neither read nor advanced
    (the build runs inside `torch.random.fork_rng`).
    """
    import transformers

    family, tiny = _find(name)
    tokenizer = _tokenizer()
    config = tiny.build_config(tokenizer)
    auto = getattr(transformers, family.auto_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else int(seed))
        # No attn_implementation: transformers then picks sdpa for every sub-model that supports
        # it and eager for the others (Gemma 4's audio tower is eager-only, so a blanket "sdpa"
        # raises) -- the same choice `from_pretrained` makes when a written model is reloaded.
        model = auto.from_config(config, dtype=dtype)
    # Generation stops at <eos> and at the end of a chat turn (archtune's chat template is
    # Gemma-style for every tiny model), as in the real checkpoints' generation_config.json.
    ids = special_token_ids(tokenizer)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id = ids.pad, ids.bos
    gen.eos_token_id = [ids.eos] + ([ids.by_token["<end_of_turn>"]] if "<end_of_turn>" in ids.by_token else [])
    model.eval()
    return model, tokenizer


def write_tiny_model(name: str, out_dir: str | os.PathLike, seed: int | None = 0) -> Path:
    """Write config.json, model.safetensors and the tokenizer of tiny model `name` to `out_dir`.

    `transformers.<the family's auto_class>.from_pretrained(out_dir)` and
    `AutoTokenizer.from_pretrained(out_dir)` load it back with identical weights.
    """
    model, tokenizer = build_tiny_model(name, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


__all__ = [
    "SPECIAL_TOKENS",
    "TokenIds",
    "special_token_ids",
    "tiny_model_names",
    "build_tiny_config",
    "build_tiny_model",
    "write_tiny_model",
]
