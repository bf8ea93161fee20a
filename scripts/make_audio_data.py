#!/usr/bin/env python
"""Write the audio quickstart's data (deterministic, seeded): sine tones as WAV files and a
question about each, for Gemma 4 E2B/E4B-shaped models.

Each clip is one tone, low (200-450 Hz) or high (1.4-3 kHz), 0.2-0.4 s long, at a random
loudness, with a little noise; each audio row asks whether it is high or low, in Axolotl's
multimodal chat format:

    {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "wav/0007.wav"},
                                                {"type": "text", "text": "Is the tone high or low?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "high"}]}]}

Audio paths are relative to the data file. Clips are 8 kHz 8-bit mono WAV (small files; archtune
resamples them to the feature extractor's 16 kHz). One row in ten is text-only, so batches mix
text-only and audio rows.

Files written (relative to --out-dir, default examples/data/audio):

* wav/NNNN.wav   the clips
* train.jsonl    training rows
* test.jsonl     held-out rows, on clips that are not in train.jsonl

Usage: python scripts/make_audio_data.py [--out-dir DIR] [--train 400] [--test 100] [--seed 11]
Running it twice writes byte-identical files.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import wave
from pathlib import Path

import numpy as np
from make_vision_data import text_row  # the same text-only rows (scripts/ is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
RATE = 8000
PITCHES: dict[str, tuple[float, float]] = {"low": (200.0, 450.0), "high": (1400.0, 3000.0)}
QUESTIONS = ("Is the tone high or low?", "High or low pitch?")
TEXT_ONLY: tuple[tuple[str, str], ...] = (
    ("Is a whistle high or low?", "high"),
    ("Is a drum high or low?", "low"),
)


def clip(pitch: str, rng: random.Random) -> bytes:
    """One tone as an 8 kHz 8-bit mono WAV file."""
    freq = rng.uniform(*PITCHES[pitch])
    t = np.arange(int(rng.uniform(0.2, 0.4) * RATE)) / RATE
    x = rng.uniform(0.2, 0.8) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    x += np.random.default_rng(rng.randrange(2 ** 32)).normal(0, 0.02, len(t))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(1)
        wav.setframerate(RATE)
        wav.writeframes(np.clip(np.round(x * 127 + 128), 0, 255).astype(np.uint8).tobytes())
    return buf.getvalue()


def audio_row(path: str, question: str, answer: str) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "audio", "audio": path}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}


def make(out: Path, n_train: int, n_test: int, seed: int) -> None:
    rng = random.Random(seed)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        if split == "train" and i % 10 == 9:
            splits[split].append(text_row(*TEXT_ONLY[(i // 10) % len(TEXT_ONLY)]))
            continue
        pitch = rng.choice(sorted(PITCHES))
        name = f"wav/{i:04d}.wav"
        (out / name).write_bytes(clip(pitch, rng))
        splits[split].append(audio_row(name, rng.choice(QUESTIONS), pitch))
    for split, rows in splits.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "examples" / "data" / "audio")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    make(args.out_dir, args.train, args.test, args.seed)


if __name__ == "__main__":
    main()
