"""Helpers for the processors of the tiny multimodal models (families declare them).

The tiny models use archtune's own tokenizer; a processor needs it with its media tokens named
(tokenizer.image_token, ...) and a chat template that renders media content parts as the
placeholder text the processor expands.
"""
from __future__ import annotations

import copy
import inspect

# The processor part that reads each modality's input (transformers' attribute names).
PROCESSOR_PARTS = {"image": "image_processor", "audio": "feature_extractor", "video": "video_processor"}

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
    """`processor_cls` (e.g. Gemma4Processor, Qwen3VLProcessor) with video_processor=None.

    transformers (5.25) checks the class of every processor part, and its video processors need
    torchvision, which images and audio do not (the image processors have Pillow backends, the
    audio feature extractors numpy). The subclass takes None for the video part, saves the other
    parts (processor_config.json names `processor_cls` and holds no video part), and
    `from_pretrained` loads every part but the video one: a model directory written by
    `archtune init-tiny`, or a real checkpoint on a machine without torchvision.
    """
    return without_parts(processor_cls, ("video_processor",))


def without_parts(processor_cls, parts: tuple[str, ...]):
    """`processor_cls` taking None for each processor part named in `parts` (e.g. "video_processor",
    "image_processor"): what without_video_processor does for the video part, for any parts whose
    classes need a library the others do not (an image processor with only a torchvision backend)."""
    absent = tuple(parts)
    suffix = "".join(part.split("_")[0].title() for part in absent)

    class Without(processor_cls):
        def __init__(self, *args, **kwargs):
            # Some processors add their video token to the tokenizer they are given (Gemma 4:
            # "<|video|>", beyond a tiny model's vocabulary); without a video part, the tokenizer
            # saved is the one given.
            names = processor_cls.get_attributes()
            given = kwargs.get("tokenizer", args[names.index("tokenizer")] if len(args) > names.index("tokenizer")
                               else None)
            self._given_tokenizer = copy.deepcopy(given)
            super().__init__(*args, **kwargs)

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name in absent and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        @classmethod
        def _resolve_subprocessors(cls, pretrained_model_name_or_path, processor_dict, **kwargs):
            names = processor_cls.get_attributes()

            class Parts(processor_cls):  # the same loading, of every part but the absent ones
                @classmethod
                def get_attributes(klass):
                    return [name for name in names if name not in absent]

            processor_dict = {k: v for k, v in processor_dict.items() if k not in absent}
            for part in absent:
                kwargs.pop(part, None)
            processor_dict, kwargs = Parts._resolve_subprocessors(pretrained_model_name_or_path, processor_dict,
                                                                  **kwargs)
            return {**processor_dict, **dict.fromkeys(absent)}, kwargs

        def to_dict(self):
            out = super().to_dict()
            for part in absent:
                out.pop(part, None)
            out["processor_class"] = processor_cls.__name__
            return out

        def save_pretrained(self, save_directory, **kwargs):
            # ProcessorMixin.save_pretrained visits every part; a stand-in for each absent part
            # (to_dict leaves them out) lets it save the others as it saves them.
            tokenizer = self.tokenizer
            for part in absent:
                setattr(self, part, _AbsentPart())
            if self._given_tokenizer is not None:
                self.tokenizer = self._given_tokenizer
            try:
                return super().save_pretrained(save_directory, **kwargs)
            finally:
                for part in absent:
                    setattr(self, part, None)
                self.tokenizer = tokenizer

    # transformers reads a processor's parts from its __init__ signature (get_attributes).
    Without.__init__.__signature__ = inspect.signature(processor_cls.__init__)
    Without.__name__ = Without.__qualname__ = f"{processor_cls.__name__}Without{suffix}"
    return Without


class _AbsentPart:
    """What save_pretrained sees of a processor part that is not there: nothing to save."""

    _auto_class = None


__all__ = ["PROCESSOR_PARTS", "media_chat_template", "media_tokenizer", "without_parts", "without_video_processor"]
