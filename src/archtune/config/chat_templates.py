"""`chat_template:` names that are not a family's template, and what a name that is none says.

The templates themselves (`gemma3`, `gemma4`, `qwen3_5`, `chatml`, ...) live in their family's
file (`Family.chat_templates`): each is archtune's own Jinja text for that family's published
turn format (the strings the model was trained with), kept short: text turns (a content list
contributes its text parts), a system turn, and the generation prompt, written on `TEXT_MACRO`.
`tokenizer_default` uses the tokenizer's own template and `jinja` the template in
`chat_template_jinja`.
"""
from __future__ import annotations

# Text of a message's content: a string, or the text parts of a content list (`text(c)`).
TEXT_MACRO = ("{%- macro text(c) -%}{%- if c is string -%}{{ c }}{%- else -%}"
         "{%- for p in c -%}{%- if p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}{%- endfor -%}"
         "{%- endif -%}{%- endmacro -%}")

# Names that are not a template of their own.
SPECIAL_NAMES = ("tokenizer_default", "jinja")
# Axolotl's other template names: refused by name, with the ways to get the format.
AXOLOTL_ONLY_TEMPLATES = (
    "alpaca", "mistral_v1", "mistral_v2v3", "mistral_v3_tekken", "mistral_v7_tekken", "cohere", "llama3_2_vision",
    "llama4", "phi_3", "phi_35", "phi_4", "deepseek_v2", "deepseek_v3", "jamba", "falcon_h1", "nemotron_h", "exaone",
    "exaone4", "metharme", "pixtral", "llava", "qwen2_vl", "command_a", "command_a_tool_use",
    "command_a_rag", "aya")


def is_jinja(value: str) -> bool:
    return "{" in value


def template_problem(value: str | None, built_in: dict[str, str]) -> tuple[str, str] | None:
    """(message, fix) when `chat_template: value` names neither a template of `built_in` (name ->
    Jinja text, the families' templates) nor a special name, else None."""
    if value is None or value in built_in or value in SPECIAL_NAMES or is_jinja(value):
        return None
    names = ", ".join([*SPECIAL_NAMES, *built_in])
    if value in AXOLOTL_ONLY_TEMPLATES:
        return (f"chat template {value!r} is not built into archtune",
                f"use tokenizer_default (the model's own template), or `chat_template: jinja` with the template text "
                f"in chat_template_jinja; built in: {names}")
    import difflib

    close = difflib.get_close_matches(value, [*SPECIAL_NAMES, *built_in], n=1, cutoff=0.6)
    return (f"unknown chat template {value!r}",
            f"did you mean `chat_template: {close[0]}`?" if close else f"use one of: {names}, or a Jinja template string")


__all__ = ["TEXT_MACRO", "SPECIAL_NAMES", "AXOLOTL_ONLY_TEMPLATES", "is_jinja", "template_problem"]
