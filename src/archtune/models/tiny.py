"""Embedded tiny random models (`base_model: tiny:NAME`, `archtune init-tiny NAME DIR`).

The shapes live with their families (`Family.tiny_models`); this module only builds them:
seeded random weights, archtune's own tokenizer, transformers' Auto classes. Nothing here
names a family.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from archtune.families.base import special_token_ids

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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
    name: str, seed: int | None = 0, dtype: torch.dtype = torch.float32, auto_class: str | None = None,
    **config_updates,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Tiny model `name` with random weights drawn from `seed`, and archtune's tokenizer.

    `auto_class` builds another head on the same configuration (e.g. a reward model's
    AutoModelForSequenceClassification, with `num_labels=1` among `config_updates`); default: the
    family's class.

    Same seed -> bitwise the same weights. The global RNG is neither read nor advanced
    (the build runs inside `torch.random.fork_rng`).
    """
    import transformers

    family, tiny = _find(name)
    tokenizer = _tokenizer()
    config = tiny.build_config(tokenizer)
    for key, value in config_updates.items():
        setattr(config, key, value)
    auto = getattr(transformers, auto_class or family.auto_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else int(seed))
        # No attn_implementation: transformers then picks sdpa for every sub-model that supports
        # it and eager for the others (Gemma 4's audio tower is eager-only, so a blanket "sdpa"
        # raises) -- the same choice `from_pretrained` makes when a written model is reloaded.
        model = auto.from_config(config, dtype=dtype)
    # Generation stops at <eos> and at the end of a chat turn (archtune's chat template is
    # Gemma-style for every tiny model), as in the real checkpoints' generation_config.json.
    ids = special_token_ids(tokenizer)
    gen = getattr(model, "generation_config", None)
    if gen is None:  # a head without generation (sequence classification)
        model.eval()
        return model, tokenizer
    gen.pad_token_id, gen.bos_token_id = ids.pad, ids.bos
    gen.eos_token_id = [ids.eos] + ([ids.by_token["<end_of_turn>"]] if "<end_of_turn>" in ids.by_token else [])
    model.eval()
    return model, tokenizer


def build_tiny_processor(name: str, config=None):
    """The processor of tiny model `name` (None when the tiny model is text only)."""
    _, tiny = _find(name)
    if tiny.build_processor is None:
        return None
    return tiny.build_processor(config if config is not None else tiny.build_config(_tokenizer()))


def write_tiny_model(name: str, out_dir: str | os.PathLike, seed: int | None = 0) -> Path:
    """Write config.json, model.safetensors, the tokenizer and (multimodal tiny models) the
    processor of tiny model `name` to `out_dir`.

    `transformers.<the family's auto_class>.from_pretrained(out_dir)`,
    `AutoTokenizer.from_pretrained(out_dir)` and `AutoProcessor.from_pretrained(out_dir)` load it
    back with identical weights (a processor without a video part, as the tiny Gemma 4 and Qwen
    3.5 have: `archtune.models.load.load_processor`, or AutoProcessor where torchvision is installed).
    """
    model, tokenizer = build_tiny_model(name, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    processor = build_tiny_processor(name, model.config)
    if processor is not None:
        processor.save_pretrained(out)
    return out


__all__ = [
    "tiny_model_names",
    "build_tiny_config",
    "build_tiny_model",
    "build_tiny_processor",
    "write_tiny_model",
]
