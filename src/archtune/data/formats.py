"""Prompt formats: one function per `datasets[].type`, in a small registry.

A formatter turns one raw row (a dict, exactly as read) into a `Formatted`: the full text
to tokenize and the character spans of it that get loss. It does no tokenization: label
masks are computed from character spans by `tokenize.py`, which maps them onto the tokens
of the one tokenization of the full text (so prompt/answer boundaries never depend on how
a separately tokenized prefix would merge).

A malformed row raises `RowError(reason, detail)` (data/row_errors.py); the pipeline drops and
counts it (or, with `strict_data`, reports it as FILE:LINE).

Add a format: write `def my_format(row, ds, ctx) -> Formatted` and register it with
`register_format("my_format", my_format)` (the name must also be added to
`DatasetConfig.type` in config/schema.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from archtune.config.schema import DatasetConfig
from archtune.errors import UserError
from archtune.data.row_errors import EMPTY, MISSING_FIELD, TEMPLATE_ERROR, WRONG_TYPE, RowError
from archtune.registry import Registry


@dataclass
class Formatted:
    text: str
    # Half-open character spans [start, end) of `text` that get loss.
    spans: list[tuple[int, int]] = field(default_factory=list)
    # Append the tokenizer's eos id after the text (trained). Added as an id rather than as
    # text, so the row ends with exactly one eos whatever the tokenizer does with strings.
    add_eos: bool = False
    # A rendered prefix did not line up with the full rendering and the boundary was
    # recovered from the longest common prefix (counted in stats["mask_realigned"]).
    realigned: bool = False
    # Encoded image files, in the order of their placeholders in `text` (data/media.py).
    images: list[bytes] = field(default_factory=list)
    # Encoded audio files (WAV), in the order of their placeholders in `text`.
    audios: list[bytes] = field(default_factory=list)


@dataclass
class FormatContext:
    """What a formatter may use besides the row: the tokenizer and the resolved template."""

    tokenizer: Any
    chat_template: str | None = None  # Jinja string; None means the tokenizer's own
    special_tokens: tuple[str, ...] = ()  # strings of the tokenizer's special tokens
    # Rows with images: the model's processor (data/media.MediaProcessor), or None with the
    # reason this run cannot train on images (such rows are refused, never trained as text).
    media: Any = None
    media_refusal: str = "this model has no image support in archtune"
    base_dir: Any = None  # directory of the data file being read (relative image paths)
    _render: Any = field(default=None, repr=False)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The template applied as `tokenizer.apply_chat_template(tokenize=False)` applies it.

        transformers' own renderer is called directly with the template and special tokens
        resolved once: a chat row renders 2-3 times per trained turn, and
        apply_chat_template's per-call overhead is twice the rendering itself.
        """
        if self._render is None:
            placeholders = self.media.template_tokens() if self.media is not None else {}
            self._render = _make_renderer(self.tokenizer, self.chat_template, placeholders)
        return self._render(messages, add_generation_prompt)


def _make_renderer(tokenizer, chat_template: str | None, placeholders: dict[str, str] | None = None):
    """`placeholders`: the processor's media tokens by name (audio_token, ...), which the template
    sees beside the tokenizer's special tokens: the processor expands these strings."""
    placeholders = placeholders or {}
    try:
        from transformers.utils.chat_template_utils import render_jinja_template

        template = tokenizer.get_chat_template(chat_template, None)
        kwargs = {**tokenizer.special_tokens_map, **placeholders}
    except (ImportError, AttributeError, ValueError):  # another transformers: the public way
        def render(messages, add_generation_prompt):
            return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template,
                                                 add_generation_prompt=add_generation_prompt, **placeholders)
        return render

    def render(messages, add_generation_prompt):
        texts, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                         add_generation_prompt=add_generation_prompt, **kwargs)
        return texts[0]
    return render


Formatter = Callable[[dict, DatasetConfig, FormatContext], Formatted]
FORMATS: Registry[Formatter] = Registry("data format", "src/archtune/data/formats.py")


def register_format(name: str, fn: Formatter) -> Formatter:
    return FORMATS.register(name, fn)


def get_format(name: str) -> Formatter:
    return FORMATS[name]


# ---------------------------------------------------------------- field access

def type_name(value: Any) -> str:
    return {list: "a list", dict: "an object", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def get_str(row: dict, name: str, *, required: bool = True) -> str:
    """The string in `row[name]`; a missing/null optional field reads as ''."""
    value = row.get(name)
    if value is None:
        if required and name in row:
            raise RowError(MISSING_FIELD, f"field {name!r} is null")
        if required:
            present = ", ".join(sorted(map(str, row))) or "none"
            raise RowError(MISSING_FIELD, f"field {name!r} is missing (fields: {present})")
        return ""
    if not isinstance(value, str):
        raise RowError(WRONG_TYPE, f"field {name!r} is {type_name(value)}, expected a string")
    return value


# ---------------------------------------------------------------- alpaca

# Axolotl's `type: alpaca` (its AlpacaPrompter, instruct style): a system line, then the turn. The
# same key trains the same text in both tools, so a model serves with the prompt it learned.
ALPACA_SYSTEM_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                            "further context. Write a response that appropriately completes the request.\n\n")
ALPACA_SYSTEM_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n")
ALPACA_WITH_INPUT = ALPACA_SYSTEM_WITH_INPUT + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_NO_INPUT = ALPACA_SYSTEM_NO_INPUT + "### Instruction:\n{instruction}\n\n### Response:\n"


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The alpaca prompt as Axolotl writes it; the Input block (and its longer system line) only when
    there is an input."""
    if input_text:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def alpaca(row: dict, ds: DatasetConfig, ctx: FormatContext) -> Formatted:
    instruction = get_str(row, ds.field_instruction)
    input_text = get_str(row, ds.field_input, required=False)
    output = get_str(row, ds.field_output)
    if not instruction.strip():
        raise RowError(EMPTY, f"field {ds.field_instruction!r} is empty")
    if not output.strip():
        raise RowError(EMPTY, f"field {ds.field_output!r} is empty")
    prompt = alpaca_prompt(instruction, input_text)
    text = prompt + output
    return Formatted(text=text, spans=[(len(prompt), len(text))], add_eos=True)


# ---------------------------------------------------------------- completion

def completion(row: dict, ds: DatasetConfig, ctx: FormatContext) -> Formatted:
    text = get_str(row, ds.field)
    if not text.strip():
        raise RowError(EMPTY, f"field {ds.field!r} is empty")
    return Formatted(text=text, spans=[(0, len(text))], add_eos=True)


# ---------------------------------------------------------------- chat_template

# Role names used by common data sets (ShareGPT, Gemma) mapped to the names chat templates
# expect; roles_to_train is matched after this mapping.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}
_SENTINEL = "\uE000archtune-content\uE001"


def row_messages(row: dict, ds: DatasetConfig) -> list[dict]:
    raw = row.get(ds.field_messages)
    if raw is None:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(MISSING_FIELD, f"field {ds.field_messages!r} is missing (fields: {present})")
    if isinstance(raw, str):  # CSV / Parquet columns sometimes hold the list as JSON text
        try:
            raw = json.loads(raw)
        except ValueError:
            raise RowError(WRONG_TYPE, f"field {ds.field_messages!r} is a string, expected a list of messages") from None
    if not isinstance(raw, list):
        raise RowError(WRONG_TYPE, f"field {ds.field_messages!r} is {type_name(raw)}, expected a list of messages")
    if not raw:
        raise RowError(EMPTY, f"field {ds.field_messages!r} is an empty list")
    role_key = ds.message_property_mappings.get("role", "role")
    content_key = ds.message_property_mappings.get("content", "content")
    out = []
    for i, msg in enumerate(raw):
        where = f"{ds.field_messages}[{i}]"
        if not isinstance(msg, dict):
            raise RowError(WRONG_TYPE, f"{where} is {type_name(msg)}, expected an object")
        role = msg.get(role_key)
        if role is None:
            raise RowError(MISSING_FIELD, f"{where} has no {role_key!r}")
        if not isinstance(role, str):
            raise RowError(WRONG_TYPE, f"{where}.{role_key} is {type_name(role)}, expected a string")
        content = msg.get(content_key)
        if content is None and not msg.get("tool_calls"):
            raise RowError(MISSING_FIELD, f"{where} has no {content_key!r}")
        if content is not None and not isinstance(content, (str, list)):
            raise RowError(WRONG_TYPE, f"{where}.{content_key} is {type_name(content)}, expected a string")
        # Keep the other keys (tool_calls, name, ...) for the template, minus the nulls that
        # Arrow adds when it unifies the schemas of different messages.
        new = {k: v for k, v in msg.items() if k not in (role_key, content_key) and v is not None}
        new["role"] = ROLE_ALIASES.get(role, role)
        new["content"] = content if content is not None else ""
        out.append(new)
    return out


def _is_blank(content: Any) -> bool:
    if isinstance(content, str):
        return not content.strip()
    if isinstance(content, list):
        return not any(isinstance(p, dict) and (p.get("type") != "text" or str(p.get("text", "")).strip())
                       for p in content)
    return True


def render_chat(ctx: FormatContext, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    try:
        return ctx.render(messages, add_generation_prompt)
    except Exception as exc:  # jinja's TemplateError, raise_exception() in the template, ...
        raise RowError(TEMPLATE_ERROR, f"the chat template failed: {exc}") from None


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def strip_after_end_marker(text: str, start: int, end: int, specials: tuple[str, ...]) -> int:
    """Exclude the whitespace a template writes after a turn's end marker.

    `<start_of_turn>model\\nHi<end_of_turn>\\n`: the loss covers `Hi<end_of_turn>`, not the
    newline that follows the marker (generation stops at the marker).
    """
    trimmed = len(text[start:end].rstrip()) + start
    if trimmed < end and any(text.endswith(s, start, trimmed) for s in specials if s):
        return trimmed
    return end


def chat_template(row: dict, ds: DatasetConfig, ctx: FormatContext) -> Formatted:
    """Render the conversation; loss on the turns whose role is in roles_to_train.

    A trained assistant turn starts where the rendering of the messages before it plus the
    generation prompt ends (what a prompt at inference ends with), and ends where the
    rendering up to and including it ends. Other trained roles start after their header,
    found by rendering the turn with a sentinel as its content.

    Some templates render a turn differently once later turns exist (they mark the last
    message, or drop the reasoning of earlier answers), so a prefix rendering is not always
    a prefix of the full one. Then the start comes from the sentinel rendering (the turn is
    followed by nothing but its own content there), and the end from the longest common
    prefix, extended over an end marker (special token) both renderings have there; the row
    is counted in stats["mask_realigned"].
    """
    messages = row_messages(row, ds)
    messages, media = _media(messages, row, ctx)
    train_roles = {ROLE_ALIASES.get(r, r) for r in ds.roles_to_train}
    trained = [i for i, m in enumerate(messages) if m["role"] in train_roles]
    if trained and all(_is_blank(messages[i]["content"]) for i in trained):
        raise RowError(EMPTY, "every turn in roles_to_train is empty")
    full = render_chat(ctx, messages)
    realigned = False

    def start_of(i: int) -> int:
        nonlocal realigned
        msg = messages[i]
        if msg["role"] == "assistant":
            prompt = render_chat(ctx, messages[:i], add_generation_prompt=True)
            if full.startswith(prompt):
                return len(prompt)
            realigned = True
        probe = render_chat(ctx, messages[:i] + [{**msg, "content": _SENTINEL}])
        cut = probe.find(_SENTINEL)
        head = probe[:cut] if cut >= 0 else render_chat(ctx, messages[:i])
        if full.startswith(head):
            return len(head)
        realigned = True
        return _common_prefix_len(head, full)

    def end_of(i: int) -> int:
        nonlocal realigned
        text = render_chat(ctx, messages[: i + 1])
        if full.startswith(text):
            return len(text)
        realigned = True
        k = _common_prefix_len(text, full)
        tail = text[k:]
        for marker in ctx.special_tokens:  # longest first
            if marker and full.startswith(marker, k) and marker in tail:
                return k + len(marker)
        return k

    spans: list[tuple[int, int]] = []
    for i in trained:
        start = start_of(i)
        end = strip_after_end_marker(full, start, end_of(i), ctx.special_tokens)
        if end <= start:  # the turn renders differently once later turns exist (e.g. Qwen3's reasoning block)
            end = _content_end(full, start, messages[i]["content"], ctx.special_tokens)
        if end > start:
            spans.append((start, end))
    if ds.train_on_eos in ("last", "none"):  # `last`: only the final trained turn keeps its end marker
        keep = len(spans) - 1 if ds.train_on_eos == "last" else len(spans)
        spans = [(s, e) if k >= keep else (s, _without_end_marker(full, s, e, ctx.special_tokens))
                 for k, (s, e) in enumerate(spans)]
    elif ds.train_on_eos == "all":  # also the end marker of every turn that gets no loss (system, user, ...)
        spans = sorted(spans + _untrained_turn_ends(full, messages, trained, spans, start_of, end_of, ctx))
    return Formatted(text=full, spans=spans, realigned=realigned, images=media.images, audios=media.audios)


def _media(messages: list[dict], row: dict, ctx: FormatContext):
    """Messages for the template and the row's media (data.media.RowMedia); a row with media this
    run cannot train on raises MediaRefused before any file is read (the whole run stops: such
    rows are never trained as text)."""
    from archtune.data.media import MediaRefused, RowMedia, content_kinds, extract_media

    has_list = any(isinstance(m["content"], list) for m in messages)
    if not has_list and not row.get("images"):
        return messages, RowMedia()
    kinds = content_kinds(messages, row)
    if kinds:
        if ctx.media is None:
            raise MediaRefused(f"rows carry {', '.join(sorted(kinds))} content, but {ctx.media_refusal}")
        ctx.media.check_kinds(kinds)
    return extract_media(messages, row, base_dir=ctx.base_dir)


def _content_end(text: str, start: int, content: Any, specials: tuple[str, ...]) -> int:
    """Where a turn whose content is `content` ends in `text` (searched from `start`): after the
    content and the end-of-turn marker that directly follows it; `start` when it is not found."""
    body = content if isinstance(content, str) else "".join(
        str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    body = body.strip()
    at = text.find(body, start) if body else -1
    if at < 0:
        return start
    end = at + len(body)
    for marker in specials:  # longest first
        if marker and text.startswith(marker, end):
            return end + len(marker)
    return end


def _untrained_turn_ends(text: str, messages: list[dict], trained: list[int], spans: list[tuple[int, int]],
                         start_of, end_of, ctx: FormatContext) -> list[tuple[int, int]]:
    """`train_on_eos: all`: the spans of the end-of-turn markers closing the turns without loss.

    A marker counts when it is one that closes the trained turns in this rendering (or the
    tokenizer's eos token): a turn that renders nothing of its own (Gemma's system message, merged
    into the next user turn) ends in no marker, and a `<bos>` before it is not one.
    """
    closing = {text[_without_end_marker(text, s, e, ctx.special_tokens):e] for s, e in spans} - {""}
    closing.add(getattr(ctx.tokenizer, "eos_token", None) or "")
    out = []
    for i in sorted(set(range(len(messages))) - set(trained)):
        end = strip_after_end_marker(text, start_of(i), end_of(i), ctx.special_tokens)
        cut = _without_end_marker(text, 0, end, ctx.special_tokens)
        if cut < end and text[cut:end] in closing:
            out.append((cut, end))
    return out


def _without_end_marker(text: str, start: int, end: int, specials: tuple[str, ...]) -> int:
    """The span's end moved before the end-of-turn marker it closes with (train_on_eos)."""
    for marker in specials:  # longest first
        if marker and end - len(marker) >= start and text.endswith(marker, start, end):
            return end - len(marker)
    return end


register_format("alpaca", alpaca)
register_format("chat_template", chat_template)
register_format("completion", completion)


# ---------------------------------------------------------------- prompts at inference

def render_prompt(dataset_cfg: DatasetConfig, tokenizer, prompt: str, *, chat_template: str | None = None,
                  input_text: str = "") -> str:
    """The text a generation prompt becomes for this dataset's format.

    alpaca: the alpaca prompt with `prompt` as the instruction (and `input_text` as its input); chat_template: one user turn
    rendered with the generation prompt (bos included when the template renders it);
    completion: `prompt` unchanged. Tokenize with `tokenize.encode_prompt`, which adds bos
    exactly as training did.
    """
    if dataset_cfg.type == "alpaca":
        return alpaca_prompt(prompt, input_text)
    if dataset_cfg.type == "chat_template":
        ctx = FormatContext(tokenizer=tokenizer, chat_template=resolve_chat_template(chat_template, tokenizer))
        try:
            return render_chat(ctx, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        except RowError as exc:
            raise UserError.single("chat_template", exc.detail, "fix the chat template") from None
    return prompt


def prompt_inputs(media, tokenizer, prompt: str, images: list[bytes],
                  chat_template: str | None = None) -> dict:
    """Model inputs (batch of one) for a generation prompt to a model that reads images (`media`: its
    data.media.MediaProcessor): one user turn holding the images, then the prompt, rendered as
    training renders it (the processor's chat template unless the plan's `chat_template`, Jinja
    text, is given), with the generation prompt."""
    import torch

    template = chat_template if chat_template is not None else getattr(media.processor, "chat_template", None)
    ctx = FormatContext(tokenizer=tokenizer, chat_template=template)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = render_chat(ctx, [{"role": "user", "content": content}], add_generation_prompt=True)
    ids, _, types = media.encode(text, images, [], [])
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    out.update({name: torch.tensor([types]) for name in media.token_type_names})
    if images:
        out.update(media.batch_inputs(images))
    return out


def resolve_chat_template(template: str | None, tokenizer) -> str | None:
    """The chat template to render with: the plan's (Jinja text, `plan.data.chat_template`), or
    None for the tokenizer's own, which must then exist."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise UserError.single(
            "chat_template", "a dataset has type chat_template but the tokenizer has no chat template",
            "set chat_template to a template name (chatml, llama3, gemma3, gemma4, qwen3_5, ...) or a Jinja string")
    return template
