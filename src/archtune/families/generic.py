"""The fallback family: any decoder-only model AutoModelForCausalLM loads, with no known quirks.

It claims no model_type (`detect` returns it when no other family claims the config), so it
declares no language-model prefix, layer class, towers or target regex: those depend on the
architecture, and the defaults elsewhere (e.g. a user's `lora_target_modules`) apply.
"""
from __future__ import annotations

from archtune.config.chat_templates import TEXT_MACRO
from archtune.families import GENERIC, Family, TinyModel, register_family
from archtune.families.base import GgufArch, special_token_ids


def _interleave_rope_halves(tensor, heads: int):
    """q/k rows from Hugging Face's rotate-half order to the interleaved pairs llama.cpp's
    `llama` architecture rotates (its converter undoes the same permutation)."""
    return (tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, *tensor.shape[1:])
            .swapaxes(1, 2).reshape(tensor.shape))


def _llama_gguf_tensors(name: str, tensor, text: dict):
    if name.endswith("q_proj.weight"):
        return [(name, _interleave_rope_halves(tensor, text["num_attention_heads"]))]
    if name.endswith("k_proj.weight"):
        return [(name, _interleave_rope_halves(tensor, text.get("num_key_value_heads") or text["num_attention_heads"]))]
    return [(name, tensor)]


LLAMA_GGUF = GgufArch("llama", tensors=_llama_gguf_tensors)


def _llama_config(tokenizer):
    from transformers import LlamaConfig

    ids = special_token_ids(tokenizer)
    return LlamaConfig(
        vocab_size=ids.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=ids.pad,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
    )


CHATML = TEXT_MACRO + (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + text(m['content']) + '<|im_end|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")

LLAMA3 = TEXT_MACRO + (
    "{{ bos_token }}{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + text(m['content']) | trim + '<|eot_id|>' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif -%}")

FAMILY = register_family(
    Family(
        chat_templates={"chatml": CHATML, "qwen_25": CHATML, "llama3": LLAMA3},
        name=GENERIC,
        model_types=(),
        description="Any causal LM transformers loads with AutoModelForCausalLM (no family-specific handling)",
        auto_class="AutoModelForCausalLM",
        language_model_prefix="",
        decoder_layer_cls=None,
        mm_module_prefixes=(),
        lora_target_regex=None,
        tiny_models=(
            TinyModel("llama", "Plain dense Llama (4 layers, hidden 64): the control model", _llama_config),
        ),
        gguf={"llama": LLAMA_GGUF, "mistral": LLAMA_GGUF},
    )
)
