"""Chat templates by the names Axolotl users write (`chat_template: gemma3`, `qwen3_5`, `chatml`, ...).

Each is archtune's own Jinja text for that model family's published turn format (the strings
the model was trained with), kept short: text turns (a content list contributes its text
parts), a system turn, and the generation prompt. `tokenizer_default` uses the tokenizer's own
template and `jinja` the template in `chat_template_jinja`.
"""
from __future__ import annotations

# Text of a message's content: a string, or the text parts of a content list.
_TEXT = ("{%- macro text(c) -%}{%- if c is string -%}{{ c }}{%- else -%}"
         "{%- for p in c -%}{%- if p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}{%- endfor -%}"
         "{%- endif -%}{%- endmacro -%}")

_CHATML = _TEXT + (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + text(m['content']) + '<|im_end|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")

# Qwen 3 / 3.5: ChatML; an answer after the last user turn carries its (possibly empty) reasoning block.
_QWEN3 = _TEXT + (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}{%- set body = text(m['content']) -%}"
    "{%- if m['role'] == 'assistant' and loop.index0 > ns.last_user and '<think>' not in body -%}"
    "{%- set body = '<think>\\n\\n</think>\\n\\n' + body -%}{%- endif -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + body + '<|im_end|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")

_LLAMA3 = _TEXT + (
    "{{ bos_token }}{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + text(m['content']) | trim + '<|eot_id|>' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif -%}")

# Gemma 1-3: the system prompt opens the first user turn; the assistant's role is `model`.
_GEMMA3 = _TEXT + (
    "{{ bos_token }}{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first = text(messages[0]['content']) + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set first = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' "
    "+ (first if loop.first else '') + text(m['content']) | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")

# Gemma 4: `<|turn>ROLE ... <turn|>` turns, a system turn of its own, the assistant's role is `model`.
_GEMMA4 = _TEXT + (
    "{{ bos_token }}{%- for m in messages -%}"
    "{{ '<|turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + text(m['content']) | trim "
    "+ '<turn|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}{%- endif -%}")

CHAT_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "qwen_25": _CHATML,
    "qwen3": _QWEN3,
    "qwen3_5": _QWEN3,
    "llama3": _LLAMA3,
    "gemma": _GEMMA3,
    "gemma3": _GEMMA3,
    "gemma3n": _GEMMA3,
    "gemma4": _GEMMA4,
}
# Names that are not a template of their own.
SPECIAL_NAMES = ("tokenizer_default", "jinja")
# Axolotl's other template names: refused by name, with the ways to get the format.
AXOLOTL_ONLY_TEMPLATES = (
    "alpaca", "mistral_v1", "mistral_v2v3", "mistral_v3_tekken", "mistral_v7_tekken", "cohere", "llama3_2_vision",
    "llama4", "phi_3", "phi_35", "phi_4", "deepseek_v2", "deepseek_v3", "jamba", "falcon_h1", "nemotron_h", "exaone",
    "exaone4", "metharme", "pixtral", "llava", "qwen2_vl", "gemma4_unified", "command_a", "command_a_tool_use",
    "command_a_rag", "aya")


def is_jinja(value: str) -> bool:
    return "{" in value


def template_problem(value: str | None) -> tuple[str, str] | None:
    """(message, fix) when `chat_template: value` does not name a template, else None."""
    if value is None or value in CHAT_TEMPLATES or value in SPECIAL_NAMES or is_jinja(value):
        return None
    names = ", ".join([*SPECIAL_NAMES, *CHAT_TEMPLATES])
    if value in AXOLOTL_ONLY_TEMPLATES:
        return (f"chat template {value!r} is not built into archtune",
                f"use tokenizer_default (the model's own template), or `chat_template: jinja` with the template text "
                f"in chat_template_jinja; built in: {names}")
    import difflib

    close = difflib.get_close_matches(value, [*SPECIAL_NAMES, *CHAT_TEMPLATES], n=1, cutoff=0.6)
    return (f"unknown chat template {value!r}",
            f"did you mean `chat_template: {close[0]}`?" if close else f"use one of: {names}, or a Jinja template string")


__all__ = ["CHAT_TEMPLATES", "SPECIAL_NAMES", "AXOLOTL_ONLY_TEMPLATES", "is_jinja", "template_problem"]
