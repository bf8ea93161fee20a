#!/usr/bin/env python
"""Write the vision quickstart's data (deterministic, seeded): shapes drawn with Pillow and
questions about them.

Each image is one filled shape (circle, square or triangle) in one of four colors (red, green,
blue, yellow) on a light background, at a random size and position. Each image row asks about
the shape's color or its kind, in Axolotl's multimodal chat format:

    {"messages": [{"role": "user", "content": [{"type": "image", "path": "images/0007.png"},
                                                {"type": "text", "text": "What color is the shape?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}

Image paths are relative to the data file. One row in ten is text-only (a question about
shapes that needs no image), so batches mix text-only and image rows.

Files written (relative to --out-dir, default examples/data/vision):

* images/NNNN.png   32x32 RGB images
* train.jsonl       training rows
* test.jsonl        held-out rows, on images that are not in train.jsonl

Usage: python scripts/make_vision_data.py [--out-dir DIR] [--train 600] [--test 100] [--seed 7]
Running it twice writes byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("What color is the shape?", "Which color is it?"),
    "shape": ("What shape is this?", "Which shape is in the picture?"),
}
TEXT_ONLY: tuple[tuple[str, str], ...] = (
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("How many corners does a circle have?", "none"),
)


def draw(shape: str, color: str, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), background)
    d = ImageDraw.Draw(img)
    side = rng.randint(26, 32)
    x0, y0 = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[color])
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(x0 + side // 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=fill)
    return img


def image_row(path: str, question: str, answer: str) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "path": path}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}


def text_row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def make(out: Path, n_train: int, n_test: int, seed: int) -> None:
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    index = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            if split == "train" and i % 10 == 9:
                splits[split].append(text_row(*rng.choice(TEXT_ONLY)))
                continue
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            path = f"images/{index:04d}.png"
            index += 1
            draw(shape, color, rng).save(out / path, optimize=True)
            kind = rng.choice(tuple(QUESTIONS))
            answer = color if kind == "color" else shape
            splits[split].append(image_row(path, rng.choice(QUESTIONS[kind]), answer))
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "examples" / "data" / "vision")
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    make(args.out_dir, args.train, args.test, args.seed)
    print(f"wrote {args.train} train and {args.test} test rows to {args.out_dir}")


if __name__ == "__main__":
    main()
