"""Synthetic audio for tests: sine tones written as WAV files with Python's `wave` module."""
from __future__ import annotations

import io
import wave

import numpy as np


def tone_wav(freq: float, seconds: float, rate: int = 16_000, *, channels: int = 1, width: int = 2,
             amplitude: float = 0.5) -> bytes:
    """A PCM WAV file (bytes) holding a sine tone of `freq` Hz: `width` bytes per sample (1: unsigned
    8-bit, 2/3/4: signed little-endian), the same tone on every channel."""
    t = np.arange(int(round(seconds * rate))) / rate
    x = amplitude * np.sin(2 * np.pi * freq * t)
    x = np.repeat(x[:, None], channels, axis=1).reshape(-1)
    if width == 1:
        raw = np.round(x * 127 + 128).astype(np.uint8).tobytes()
    elif width == 3:
        ints = np.round(x * (2 ** 23 - 1)).astype("<i4")
        raw = ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        raw = np.round(x * (2 ** (8 * width - 1) - 1)).astype(f"<i{width}").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(raw)
    return buf.getvalue()


def audio_row(audio: dict, answer: str, question: str = "Is the tone high or low?") -> dict:
    """A chat row in Axolotl's multimodal format: one user turn with an audio part, one answer."""
    return {"messages": [
        {"role": "user", "content": [{"type": "audio", **audio}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}
