"""Helpers for the processors of the tiny multimodal models (families declare them).

The tiny models use archtune's own tokenizer; a processor needs it with its media tokens named
(tokenizer.image_token, ...) and a chat template that renders media content parts as the
placeholder text the processor expands.
"""
from __future__ import annotations

# The part of archtune's chat template that joins a message's content parts: text parts only.
_TEXT_PARTS = ("{%- for part in message['content'] if part['type'] == 'text' -%}"
               "{%- set ns.text = ns.text + part['text'] -%}{%- endfor -%}")


def media_chat_template(placeholders: dict[str, str]) -> str:
    """archtune's chat template, rendering each {"type": KIND} content part as placeholders[KIND]
    (e.g. {"image": "<start_of_image>"}: the text a processor expands into the image's tokens).

    Parts of a kind without a placeholder raise in the template, so media never vanish from a
    conversation silently.
    """
    from archtune.assets import load_tokenizer

    template = load_tokenizer().chat_template
    if _TEXT_PARTS not in template:
        raise ValueError("archtune's bundled chat template changed: update families/media.py _TEXT_PARTS")
    branches = "".join(
        "{%- elif part['type'] == " + repr(kind) + " -%}{%- set ns.text = ns.text + " + repr(text) + " -%}"
        for kind, text in placeholders.items())
    joined = ("{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}"
              "{%- set ns.text = ns.text + part['text'] -%}" + branches +
              "{%- else -%}{{- raise_exception('no placeholder for content of type ' + part['type']) -}}"
              "{%- endif -%}{%- endfor -%}")
    return template.replace(_TEXT_PARTS, joined)


def media_tokenizer(named_tokens: dict[str, str]):
    """archtune's tokenizer with attributes naming its media tokens (e.g. image_token ->
    "<image_soft_token>"), as the processors of transformers read them (tokenizer.image_token,
    tokenizer.image_token_id)."""
    from transformers import PreTrainedTokenizerFast

    from archtune.assets import TOKENIZER_DIR

    return PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR), add_bos_token=True,
                                                   extra_special_tokens=dict(named_tokens))


def without_video_processor(processor_cls):
    """`processor_cls` (e.g. Gemma4Processor, Qwen3VLProcessor) built with video_processor=None.

    transformers 5.24 checks the class of every processor part, and its video processors need
    torchvision, which image rows do not (the image processors have Pillow backends). The tiny
    models' processors never see a video; such a processor cannot be saved (save_pretrained
    writes every part), so `archtune init-tiny` writes none for it.
    """

    class ImagesOnly(processor_cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = f"{processor_cls.__name__}WithoutVideo"
    return ImagesOnly


__all__ = ["media_chat_template", "media_tokenizer", "without_video_processor"]
