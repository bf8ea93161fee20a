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

Audio (Gemma 4 E2B/E4B): an audio part, {"type": "audio", "audio": PATH or base64 or bytes} (or
`path`, `url`, `base64`; a part without one takes the next of the row's `audios` column), names a
PCM WAV file. It is decoded here once (Python's `wave` and numpy: mono, resampled to the feature
extractor's rate) so an unreadable file drops its row with AUDIO_* reasons; the row keeps the
file's bytes (`audios` column). The processor expands the audio placeholder into as many audio
tokens as its feature extractor's frames give, and the collator hands the model the feature
extractor's input_features / input_features_mask for the batch's audios, in row order. Audio
longer than the feature extractor's limit (30 s for Gemma 4) is cut to it by the processor, in
both places alike.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

from archtune.data.row_errors import (
    AUDIO_MISSING,
    AUDIO_UNDECODABLE,
    IMAGE_MISSING,
    IMAGE_MODE,
    IMAGE_UNDECODABLE,
    RowError,
)

# Pixel modes Pillow converts to RGB without losing meaning; others (I;16, I, F) are refused.
RGB_CONVERTIBLE = frozenset({"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "La"})
# Content-part keys that hold the image (audio) itself, in the order they are read.
IMAGE_KEYS: tuple[str, ...] = ("image", "path", "url", "base64")
AUDIO_KEYS: tuple[str, ...] = ("audio", "path", "url", "base64")
# Per media kind: its source keys, the row column that feeds parts without a source (llava
# style), and its (missing, undecodable) drop reasons.
SOURCES: dict[str, tuple[tuple[str, ...], str, tuple[str, str]]] = {
    "image": (IMAGE_KEYS, "images", (IMAGE_MISSING, IMAGE_UNDECODABLE)),
    "audio": (AUDIO_KEYS, "audios", (AUDIO_MISSING, AUDIO_UNDECODABLE)),
}
LLAVA_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@dataclass(frozen=True)
class ImageSettings:
    """Axolotl's image keys: `image_size` (an int: square; [height, width]) and
    `image_resize_algorithm`. Images are resized before the processor sees them."""

    size: tuple[int, int] | None = None
    resample: str = "bilinear"


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


def _bytes_of(source: Any, base_dir: Path | None, key: str, kind: str = "image") -> bytes:
    missing, undecodable = SOURCES[kind][2]
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, dict):  # a Parquet / datasets Image or Audio struct
        if source.get("bytes"):
            return bytes(source["bytes"])
        if source.get("path"):
            return _bytes_of(source["path"], base_dir, "path", kind)
        raise RowError(missing, f"an {kind} object without bytes or path")
    if not isinstance(source, str) or not source.strip():
        raise RowError(missing, f"{kind} {key!r} is {type(source).__name__}, expected a path, base64 or bytes")
    text = source.strip()
    if key == "base64" or text.startswith("data:"):
        payload = text.split(",", 1)[1] if text.startswith("data:") else text
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RowError(undecodable, f"invalid base64 {kind} data") from None
    if text.startswith(("http://", "https://")):
        raise RowError(missing, f"remote {kind} {text} is not fetched (no network access during training)")
    if text.startswith("file://"):
        text = text[len("file://"):]
    path = Path(text).expanduser()
    candidates = [path] if path.is_absolute() else ([base_dir / path] if base_dir else []) + [path]
    for candidate in candidates:
        if candidate.is_file():
            try:
                return candidate.read_bytes()
            except OSError as exc:
                raise RowError(missing, f"cannot read {kind} {text}: {exc.strerror or exc}") from None
    raise RowError(missing, f"{kind} file {text} does not exist")


def decode_audio(data: bytes, sampling_rate: int):
    """Mono float32 samples in [-1, 1] at `sampling_rate` from a PCM WAV file's bytes (8, 16, 24
    or 32-bit; channels averaged; another rate resampled). RowError(AUDIO_UNDECODABLE) when the
    bytes are not such a file or hold no samples."""
    import wave

    import numpy as np

    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError, OSError, ValueError) as exc:
        raise RowError(AUDIO_UNDECODABLE, f"cannot decode the audio as a PCM WAV file: {exc}") from None
    if width == 3:  # 24-bit little-endian: widen each sample to 4 bytes, keeping its sign
        b = np.frombuffer(raw[: len(raw) // 3 * 3], dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        samples = (((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)) >> 8).astype(np.float64) / 2 ** 23
    elif width in (1, 2, 4):
        dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
        ints = np.frombuffer(raw[: len(raw) // width * width], dtype=dtype).astype(np.float64)
        samples = (ints - 128) / 128 if width == 1 else ints / 2 ** (8 * width - 1)  # 8-bit WAV is unsigned
    else:
        raise RowError(AUDIO_UNDECODABLE, f"a WAV file with {8 * width}-bit samples")
    frames = len(samples) // max(channels, 1)
    if frames == 0:
        raise RowError(AUDIO_UNDECODABLE, "the WAV file holds no samples")
    mono = samples[: frames * channels].reshape(frames, channels).mean(axis=1)
    return resample(mono, rate, sampling_rate).astype(np.float32)


def resample(samples, rate: int, target: int):
    """`samples` at `rate` Hz resampled to `target` Hz through the spectrum (the band-limited
    method of scipy.signal.resample): frequencies above the lower Nyquist limit are cut, none alias."""
    import numpy as np

    if rate == target:
        return samples
    n = max(1, int(round(len(samples) * target / rate)))
    return np.fft.irfft(np.fft.rfft(samples), n) * (n / len(samples))


@dataclass
class RowMedia:
    """The media of one row, each kind in the order its placeholders appear in the conversation."""

    images: list[bytes] = field(default_factory=list)
    audios: list[bytes] = field(default_factory=list)


def _part_kind(part: Any) -> tuple[str | None, Any]:
    """(kind, part) of a content part: its `type`, else the key it holds ({"image": ...} or
    {"text": ...} without a type); OpenAI's image_url parts become image parts."""
    if not isinstance(part, dict):
        return None, part
    kind = part.get("type")
    if kind is None:
        kind = next((k for k in ("text", "audio", *IMAGE_KEYS) if k in part), None)
        kind = "image" if kind in IMAGE_KEYS else kind
    if kind == "image_url":
        kind, part = "image", {"url": (part.get("image_url") or {}).get("url")}
    return kind, part


def _as_parts(content: Any, images: list) -> Any:
    """A string content with llava `<image>` placeholders as parts (when the row has images)."""
    if isinstance(content, str) and images and LLAVA_PLACEHOLDER in content:
        pieces = content.split(LLAVA_PLACEHOLDER)
        return [p for i, text in enumerate(pieces)
                for p in ([{"type": "image"}] if i else []) + ([{"type": "text", "text": text}] if text else [])]
    return content


def _pool(row: dict, column: str) -> list:
    pool = row.get(column)
    return [] if pool is None else pool if isinstance(pool, list) else [pool]


def content_kinds(messages: list[dict], row: dict) -> set[str]:
    """Every non-text content kind of a conversation ("image", "audio", "video", ...), read
    without opening a file."""
    images = _pool(row, SOURCES["image"][1])
    return {kind for msg in messages if isinstance(content := _as_parts(msg["content"], images), list)
            for kind, _ in map(_part_kind, content) if kind not in (None, "text")}


def extract_media(messages: list[dict], row: dict, *, base_dir: Path | None = None) -> tuple[list[dict], RowMedia]:
    """Messages for the chat template (media parts reduced to {"type": KIND}) and the row's
    images and audios as encoded bytes. String contents with `<image>` become parts when the row
    has an `images` column. Raises RowError (IMAGE_* / AUDIO_*) for a missing or unreadable file."""
    pools = {kind: _pool(row, column) for kind, (_, column, _) in SOURCES.items()}
    sources = {kind: iter(pool) for kind, pool in pools.items()}
    media = RowMedia()
    found = {"image": media.images, "audio": media.audios}
    out = []
    for msg in messages:
        content = _as_parts(msg["content"], pools["image"])
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts = []
        for raw in content:
            kind, part = _part_kind(raw)
            if kind not in SOURCES:
                parts.append(part if not isinstance(part, dict) or "type" in part else {**part, "type": kind})
                continue
            keys, column, (missing, _) = SOURCES[kind]
            key = next((k for k in keys if part.get(k) is not None), None)
            if key is None:
                source = next(sources[kind], None)
                if source is None:
                    raise RowError(missing, f"an {kind} part has no {kind} and the row's {column!r} "
                                            f"has only {len(pools[kind])}")
                found[kind].append(_bytes_of(source, base_dir, column, kind))
            else:
                found[kind].append(_bytes_of(part[key], base_dir, key, kind))
            parts.append({"type": kind})
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


def per_token_outputs(encoding: dict, length: int, skip: frozenset[str] = frozenset()) -> dict[str, list[int]]:
    """The processor's per-token outputs of one row besides input_ids / attention_mask and the
    media inputs named in `skip` (token_type_ids, mm_token_type_ids, ...): lists of `length` ints.
    (`skip` matters: an audio's input_features_mask is a list of one row too, and may happen to
    be as long as the tokens.)"""
    out = {}
    for name, value in encoding.items():
        if name in ("input_ids", "attention_mask") or name in skip:
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
    """The model's processor as the data pipeline uses it: expand a rendered row's image and
    audio placeholders into their tokens (preprocessing) and turn a batch's images and audios
    into the model's inputs (collation), both with the same settings."""

    processor: Any
    settings: ImageSettings = field(default_factory=ImageSettings)
    modalities: tuple[str, ...] = ("image",)
    # {modality: why} for the model's modalities this processor cannot read (no part for them).
    refused: dict[str, str] = field(default_factory=dict)
    _token_type_names: tuple[str, ...] | None = field(default=None, repr=False)

    @property
    def token_type_names(self) -> tuple[str, ...]:
        """Names of the processor's per-token outputs (token_type_ids, mm_token_type_ids), read
        once from the processor's answer to one small gray image (a processor without an image
        part: to 0.1 s of silence)."""
        if self._token_type_names is None:
            if getattr(self.processor, "image_processor", None) is None:
                import numpy as np

                silence = [np.zeros(self.sampling_rate // 10, dtype=np.float32)]
                enc = self.processor(text=[self.audio_token or ""], audio=silence, sampling_rate=self.sampling_rate,
                                     add_special_tokens=False)
            else:
                from PIL import Image

                probe = [Image.new("RGB", (32, 32), (128, 128, 128))]
                enc = self.processor(text=[self.image_token or ""], images=[probe], add_special_tokens=False)
            names = per_token_outputs(enc, len(enc["input_ids"][0]), self.media_input_names)
            self._token_type_names = tuple(sorted(names))
        return self._token_type_names

    @property
    def image_token(self) -> str | None:
        return getattr(self.processor, "image_token", None)

    @property
    def media_input_names(self) -> frozenset[str]:
        """What the image, video and audio parts of the processor hand the model (pixel_values,
        input_features_mask, ...): never per-token outputs."""
        return frozenset(name for part in ("image_processor", "video_processor", "feature_extractor")
                         for name in getattr(getattr(self.processor, part, None), "model_input_names", ()) or ())

    @property
    def audio_token(self) -> str | None:
        return getattr(self.processor, "audio_token", None)

    @property
    def sampling_rate(self) -> int | None:
        """The audio rate the feature extractor takes (None: the processor reads no audio)."""
        return getattr(getattr(self.processor, "feature_extractor", None), "sampling_rate", None)

    def decode_audio(self, data: bytes):
        if self.sampling_rate is None:
            raise MediaRefused("rows carry audio content, but this model's processor has no audio feature extractor")
        return decode_audio(data, self.sampling_rate)

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
        for attr in ("image_token_id", "boi_token_id", "eoi_token_id", "video_token_id", "audio_token_id",
                     "boa_token_id", "eoa_token_id"):
            for owner in (self.processor, getattr(self.processor, "tokenizer", None)):
                value = getattr(owner, attr, None)
                if isinstance(value, int):
                    ids.add(value)
        return ids

    def template_tokens(self) -> dict[str, str]:
        """The processor's media placeholders by name (image_token, audio_token, video_token), for
        chat templates that render content parts as `{{ audio_token }}` and the like."""
        names = ("image_token", "audio_token", "video_token")
        return {n: v for n in names if isinstance(v := getattr(self.processor, n, None), str)}

    def check_kinds(self, kinds: set[str]) -> None:
        unsupported = sorted(kinds - set(self.modalities))
        refused = [kind for kind in unsupported if kind in self.refused]
        if refused:
            raise MediaRefused("; ".join(f"rows carry {kind} content, which this run cannot read: {self.refused[kind]}"
                                         for kind in refused))
        if unsupported:
            raise MediaRefused(f"rows carry {', '.join(unsupported)} content, which this model's data path does not "
                               f"train on (it takes: {', '.join(self.modalities) or 'text only'})")

    def encode(self, text: str, images: list[bytes], plain_ids: list[int], plain_labels: list[int],
               audios: list[bytes] = ()):
        """(input_ids, labels, token_types) of a rendered row with its images and audios."""
        pil = [decode_image(b, self.settings) for b in images]
        waves = [self.decode_audio(b) for b in audios]
        for kind, token, items in (("image", self.image_token, pil), ("audio", self.audio_token, waves)):
            if items and (token is None or text.count(token) != len(items)):
                raise MediaRefused(f"the chat template rendered {text.count(token) if token else 0} {kind} "
                                   f"placeholder(s) {token!r} for {len(items)} {kind}(s): it does not render "
                                   f"{kind} content parts")
        extra = {"audio": waves, "sampling_rate": self.sampling_rate} if waves else {}
        enc = self.processor(text=[text], images=[pil] if pil else None, add_special_tokens=False, **extra)
        ids = [int(i) for i in enc["input_ids"][0]]
        labels = align_labels(plain_ids, plain_labels, ids)
        per_token = per_token_outputs(enc, len(ids), self.media_input_names)
        types = [max(col) for col in zip(*per_token.values())] if per_token else [0] * len(ids)
        media_ids = self.media_token_ids()
        labels = [IGNORE_INDEX if t or i in media_ids else lab for i, t, lab in zip(ids, types, labels)]
        return ids, labels, types

    def batch_inputs(self, images: list[bytes], audios: list[bytes] = ()) -> dict:
        """The processor's outputs for a batch's images (pixel_values, image_grid_thw, ...) and
        audios (input_features, input_features_mask), each in row order, keeping only what the
        model takes (processor.model_input_names)."""
        out = {}
        if images:
            out.update(self.processor.image_processor([decode_image(b, self.settings) for b in images],
                                                      return_tensors="pt"))
        if audios:
            waves = [self.decode_audio(b) for b in audios]
            out.update(self.processor.feature_extractor(waves, sampling_rate=self.sampling_rate, return_tensors="pt"))
        wanted = set(getattr(self.processor, "model_input_names", ()) or ())
        return {k: v for k, v in out.items() if not wanted or k in wanted}


__all__ = ["MediaRefused", "MediaProcessor", "ImageSettings", "RowMedia", "decode_image",
           "decode_audio", "resample", "content_kinds", "extract_media", "align_labels", "per_token_outputs"]
