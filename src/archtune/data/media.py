"""Rows with images: Axolotl's multimodal chat format, read with the model's processor.

A message's content may be a list of parts, as in Axolotl and transformers' chat templates:

    {"role": "user", "content": [{"type": "image", "path": "cat.png"},
                                 {"type": "text", "text": "What is this?"}]}

An image part names its image by one of `image` (a path, base64 data URI, raw bytes, or a
Parquet image struct {bytes, path}), `path`, `url` (a local path or file:// URI; remote URLs are
not fetched), or `base64`. A part with none of them takes the next image of the row's `images`
column (llava style), and so does each `<image>` in a string content when the row has images.
Relative paths are read from the data file's directory, else the working directory.

Images are checked here, once, at preprocessing: a missing file, bytes Pillow cannot decode, or
a pixel mode that has no RGB conversion drops the row with its reason (IMAGE_DROP_REASONS),
counted like any malformed row. The row keeps the image's encoded bytes (`images` column), the
processor's token ids with the image tokens expanded (`input_ids`), and the processor's per-token
type ids (`token_types`: 0 text, else the media kind the processor marks). The collator turns the
bytes into `pixel_values` (and `image_grid_thw`, ...) with the same processor: nothing about
image tokens is guessed here.

Labels: the rendered conversation is tokenized once without the expansion (where the trained
character spans map onto tokens, as for text rows), and those labels are carried over to the
processor's ids by aligning the two id sequences: every token the processor inserted (image soft
tokens, begin/end markers, their newlines) gets -100, and so does every token the processor
marks as media, so an image token is never a label.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

from archtune.data.formats import IMAGE_MISSING, IMAGE_MODE, IMAGE_UNDECODABLE, RowError

# Pixel modes Pillow converts to RGB without losing meaning; others (I;16, I, F) are refused.
RGB_CONVERTIBLE = frozenset({"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "La"})
# Content-part keys that hold the image itself, in the order they are read.
IMAGE_KEYS: tuple[str, ...] = ("image", "path", "url", "base64")
LLAVA_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@dataclass(frozen=True)
class ImageSettings:
    """Axolotl's image keys: `image_size` (an int: square; [height, width]) and
    `image_resize_algorithm`. Images are resized before the processor sees them."""

    size: tuple[int, int] | None = None
    resample: str = "bilinear"

    @classmethod
    def from_config(cls, cfg) -> "ImageSettings":
        size = getattr(cfg, "image_size", None)
        if isinstance(size, int):
            size = (size, size)
        return cls(tuple(size) if size else None, getattr(cfg, "image_resize_algorithm", None) or "bilinear")


def decode_image(data: bytes, settings: ImageSettings = ImageSettings()):
    """RGB PIL image from encoded bytes (RowError with the reason when it cannot be one)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise RowError(IMAGE_UNDECODABLE, f"cannot decode the image: {exc}") from None
    if img.mode not in RGB_CONVERTIBLE:
        raise RowError(IMAGE_MODE, f"image mode {img.mode!r} has no RGB conversion")
    img = img.convert("RGB")
    if settings.size is not None:
        height, width = settings.size
        img = img.resize((width, height), RESAMPLE[settings.resample])
    return img


def _bytes_of(source: Any, base_dir: Path | None, key: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, dict):  # a Parquet / datasets Image struct
        if source.get("bytes"):
            return bytes(source["bytes"])
        if source.get("path"):
            return _bytes_of(source["path"], base_dir, "path")
        raise RowError(IMAGE_MISSING, "an image object without bytes or path")
    if not isinstance(source, str) or not source.strip():
        raise RowError(IMAGE_MISSING, f"image {key!r} is {type(source).__name__}, expected a path, base64 or bytes")
    text = source.strip()
    if key == "base64" or text.startswith("data:"):
        payload = text.split(",", 1)[1] if text.startswith("data:") else text
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RowError(IMAGE_UNDECODABLE, "invalid base64 image data") from None
    if text.startswith(("http://", "https://")):
        raise RowError(IMAGE_MISSING, f"remote image {text} is not fetched (no network access during training)")
    if text.startswith("file://"):
        text = text[len("file://"):]
    path = Path(text).expanduser()
    candidates = [path] if path.is_absolute() else ([base_dir / path] if base_dir else []) + [path]
    for candidate in candidates:
        if candidate.is_file():
            try:
                return candidate.read_bytes()
            except OSError as exc:
                raise RowError(IMAGE_MISSING, f"cannot read image {text}: {exc.strerror or exc}") from None
    raise RowError(IMAGE_MISSING, f"image file {text} does not exist")


@dataclass
class RowMedia:
    """The images of one row, in the order their placeholders appear in the conversation."""

    images: list[bytes] = field(default_factory=list)
    kinds: set[str] = field(default_factory=set)  # every non-text part type seen


def extract_media(messages: list[dict], row: dict, *, images_field: str = "images",
                  base_dir: Path | None = None) -> tuple[list[dict], RowMedia]:
    """Messages for the chat template (image parts reduced to {"type": "image"}) and the row's
    images as encoded bytes. String contents with `<image>` become parts when the row has an
    `images` column. Raises RowError (IMAGE_*) for a missing or unreadable image."""
    pool = row.get(images_field)
    if pool is None:
        pool = []
    elif not isinstance(pool, list):
        pool = [pool]
    pool_iter = iter(pool)
    media = RowMedia()
    out = []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, str) and pool and LLAVA_PLACEHOLDER in content:
            pieces = content.split(LLAVA_PLACEHOLDER)
            content = [p for i, text in enumerate(pieces)
                       for p in ([{"type": "image"}] if i else []) + ([{"type": "text", "text": text}] if text else [])]
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts = []
        for part in content:
            if not isinstance(part, dict):
                parts.append(part)
                continue
            kind = part.get("type")
            if kind is None:  # {"image": ...} or {"text": ...} without a type
                kind = next((k for k in ("text", *IMAGE_KEYS) if k in part), None)
                kind = "image" if kind in IMAGE_KEYS else kind
            if kind == "image_url":
                kind, part = "image", {"url": (part.get("image_url") or {}).get("url")}
            if kind != "image":
                if kind not in (None, "text"):
                    media.kinds.add(str(kind))
                parts.append(part if "type" in part else {**part, "type": kind})
                continue
            media.kinds.add("image")
            key = next((k for k in IMAGE_KEYS if part.get(k) is not None), None)
            if key is None:
                source = next(pool_iter, None)
                if source is None:
                    raise RowError(IMAGE_MISSING, f"an image part has no image and the row's {images_field!r} "
                                                  f"has only {len(pool)}")
                media.images.append(_bytes_of(source, base_dir, images_field))
            else:
                media.images.append(_bytes_of(part[key], base_dir, key))
            parts.append({"type": "image"})
        out.append({**msg, "content": parts})
    return out, media


# ------------------------------------------------------------------ token alignment

def align_labels(plain_ids: list[int], plain_labels: list[int], ids: list[int]) -> list[int]:
    """Labels for `ids` (the processor's tokens, media expanded) carried over from the same
    text's plain tokenization: tokens in blocks both sequences share keep their label, tokens
    only the processor has (inserted or re-merged around a placeholder) get IGNORE_INDEX.

    >>> align_labels([5, 9, 7, 8], [-100, -100, 7, 8], [5, 9, 6, 6, 10, 7, 8])
    [-100, -100, -100, -100, -100, 7, 8]
    """
    labels = [IGNORE_INDEX] * len(ids)
    matcher = SequenceMatcher(None, plain_ids, ids, autojunk=False)
    for a, b, n in matcher.get_matching_blocks():
        labels[b:b + n] = plain_labels[a:a + n]
    return labels


def per_token_outputs(encoding: dict, length: int) -> dict[str, list[int]]:
    """The processor's per-token outputs of one row besides input_ids / attention_mask
    (token_type_ids, mm_token_type_ids, ...): lists of `length` ints."""
    out = {}
    for name, value in encoding.items():
        if name in ("input_ids", "attention_mask"):
            continue
        row = value[0] if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) == 2 else None
        if row is not None and len(row) == length and not hasattr(row[0], "__len__"):
            out[name] = [int(v) for v in row]
    return out


# ------------------------------------------------------------------ the processor

class MediaRefused(Exception):
    """Rows with media this run cannot train on (a systematic problem, not one bad row)."""


@dataclass
class MediaProcessor:
    """The model's processor as the data pipeline uses it: expand a rendered row's image
    placeholders into image tokens (preprocessing) and turn a batch's images into the model's
    image inputs (collation), both with the same image settings."""

    processor: Any
    settings: ImageSettings = field(default_factory=ImageSettings)
    modalities: tuple[str, ...] = ("image",)
    _token_type_names: tuple[str, ...] | None = field(default=None, repr=False)

    @property
    def token_type_names(self) -> tuple[str, ...]:
        """Names of the processor's per-token outputs (token_type_ids, mm_token_type_ids), read
        once from the processor's answer to one small gray image."""
        if self._token_type_names is None:
            from PIL import Image

            probe = [Image.new("RGB", (32, 32), (128, 128, 128))]
            enc = self.processor(text=[self.image_token or ""], images=[probe], add_special_tokens=False)
            self._token_type_names = tuple(sorted(per_token_outputs(enc, len(enc["input_ids"][0]))))
        return self._token_type_names

    @property
    def image_token(self) -> str | None:
        return getattr(self.processor, "image_token", None)

    def fingerprint(self) -> str:
        """What makes this processor's tokens and images: its saved configuration, the image
        settings (part of the preprocessing cache key)."""
        import hashlib
        import json

        state = self.processor.to_dict() if hasattr(self.processor, "to_dict") else repr(self.processor)
        body = json.dumps({"processor": state, "size": self.settings.size, "resample": self.settings.resample},
                          sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()

    def media_token_ids(self) -> set[int]:
        ids = set()
        for attr in ("image_token_id", "boi_token_id", "eoi_token_id", "video_token_id", "audio_token_id"):
            for owner in (self.processor, getattr(self.processor, "tokenizer", None)):
                value = getattr(owner, attr, None)
                if isinstance(value, int):
                    ids.add(value)
        return ids

    def check_kinds(self, kinds: set[str]) -> None:
        unsupported = sorted(kinds - set(self.modalities))
        if unsupported:
            raise MediaRefused(f"rows carry {', '.join(unsupported)} content, which this model's data path does not "
                               f"train on (it takes: {', '.join(self.modalities) or 'text only'})")

    def encode(self, text: str, images: list[bytes], plain_ids: list[int], plain_labels: list[int]):
        """(input_ids, labels, token_types) of a rendered row with its images."""
        pil = [decode_image(b, self.settings) for b in images]
        token = self.image_token
        if token is not None and text.count(token) != len(pil):
            raise MediaRefused(f"the chat template rendered {text.count(token)} image placeholder(s) {token!r} for "
                               f"{len(pil)} image(s): it does not render image content parts")
        enc = self.processor(text=[text], images=[pil] if pil else None, add_special_tokens=False)
        ids = [int(i) for i in enc["input_ids"][0]]
        labels = align_labels(plain_ids, plain_labels, ids)
        per_token = per_token_outputs(enc, len(ids))
        types = [max(col) for col in zip(*per_token.values())] if per_token else [0] * len(ids)
        media_ids = self.media_token_ids()
        labels = [IGNORE_INDEX if t or i in media_ids else lab for i, t, lab in zip(ids, types, labels)]
        return ids, labels, types

    def batch_inputs(self, images: list[bytes]) -> dict:
        """The image processor's outputs for a batch's images, in row order (pixel_values,
        image_grid_thw, ...), keeping only what the model takes (processor.model_input_names)."""
        pil = [decode_image(b, self.settings) for b in images]
        out = self.processor.image_processor(pil, return_tensors="pt")
        wanted = set(getattr(self.processor, "model_input_names", ()) or ())
        return {k: v for k, v in out.items() if not wanted or k in wanted}


def prompt_inputs(media: MediaProcessor, tokenizer, prompt: str, images: list[bytes],
                  chat_template: str | None = None) -> dict:
    """Model inputs (batch of one) for a generation prompt: one user turn holding the images,
    then the prompt, rendered as training renders it (the processor's chat template unless
    `chat_template` names one), with the generation prompt."""
    import torch

    from archtune.data.formats import FormatContext, render_chat

    template = chat_template if chat_template not in (None, "tokenizer_default") else \
        getattr(media.processor, "chat_template", None)
    ctx = FormatContext(tokenizer=tokenizer, chat_template=template)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = render_chat(ctx, [{"role": "user", "content": content}], add_generation_prompt=True)
    ids, _, types = media.encode(text, images, [], [])
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    out.update({name: torch.tensor([types]) for name in media.token_type_names})
    if images:
        out.update(media.batch_inputs(images))
    return out


__all__ = ["MediaRefused", "MediaProcessor", "prompt_inputs", "ImageSettings", "RowMedia", "decode_image", "extract_media", "align_labels", "per_token_outputs"]
