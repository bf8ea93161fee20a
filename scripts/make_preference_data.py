#!/usr/bin/env python
"""Write archtune's bundled preference data (deterministic, seeded): the quickstart's category
task, with the correct answer preferred over a wrong one.

A prompt holds three words of the fixed 64-word vocabulary (scripts/make_data.py) and asks for
their categories; the correct answer names each word's category, the wrong one does the other
task of the bundled data (the words in reverse order), the mistake a model that has not learned
to follow the instruction makes. No word list of a test file occurs in a train file. The
difference is learnable within a few dozen steps by a tiny random model (categories are 8 words,
the vocabulary 64), which keeps the tests that train on it short.

Files written (relative to the repository root):

* examples/data/preference/train.jsonl, test.jsonl   paired rows for DPO, IPO, ORPO and SimPO
    (`type: chat_template.default`): {"messages": [{"role": "user", ...}],
    "chosen": {"role": "assistant", "content": ...}, "rejected": {...}}
* examples/data/preference/kto_train.jsonl, kto_test.jsonl   unpaired rows for KTO
    (`type: chat_template.default`, field_completion / field_label): {"messages": [...],
    "completion": "...", "label": true|false}; half of the rows desirable
* examples/data/preference/reward_train.jsonl, reward_test.jsonl   pairs for a reward model
    (`type: bradley_terry.chat_template`): {"input": ..., "chosen": ..., "rejected": ...}

Usage: python scripts/make_preference_data.py [--out-dir examples/data/preference] [--seed 4321]
Running it twice writes byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_data import QUICKSTART_WORDS, answer, random_words, user_turn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
N_TRAIN, N_TEST = 600, 64


def wrong_answer(words: tuple[str, ...]) -> str:
    """The answer to the other task: the words in reverse order."""
    return answer("reverse", list(words))


def word_lists(rng: random.Random) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """Unique 3-word lists for train and test; no test list occurs in train."""
    seen: set[tuple[str, ...]] = set()
    out: list[list[tuple[str, ...]]] = [[], []]
    for part, n in ((1, N_TEST), (0, N_TRAIN)):
        while len(out[part]) < n:
            ws = random_words(rng, QUICKSTART_WORDS)
            if ws not in seen:
                seen.add(ws)
                out[part].append(ws)
    return out[0], out[1]


def pair_row(rng: random.Random, words: tuple[str, ...]) -> dict:
    return {"messages": [{"role": "user", "content": user_turn(rng, "category", words)}],
            "chosen": {"role": "assistant", "content": answer("category", list(words))},
            "rejected": {"role": "assistant", "content": wrong_answer(words)}}


def kto_row(rng: random.Random, words: tuple[str, ...], desirable: bool) -> dict:
    completion = answer("category", list(words)) if desirable else wrong_answer(words)
    return {"messages": [{"role": "user", "content": user_turn(rng, "category", words)}],
            "completion": completion, "label": desirable}


def reward_row(rng: random.Random, words: tuple[str, ...]) -> dict:
    return {"input": user_turn(rng, "category", words), "chosen": answer("category", list(words)),
            "rejected": wrong_answer(words)}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "examples" / "data" / "preference")
    parser.add_argument("--seed", type=int, default=4321)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    train, test = word_lists(rng)
    out = args.out_dir
    write_jsonl(out / "train.jsonl", [pair_row(rng, ws) for ws in train])
    write_jsonl(out / "test.jsonl", [pair_row(rng, ws) for ws in test])
    write_jsonl(out / "kto_train.jsonl", [kto_row(rng, ws, i % 2 == 0) for i, ws in enumerate(train)])
    write_jsonl(out / "kto_test.jsonl", [kto_row(rng, ws, i % 2 == 0) for i, ws in enumerate(test)])
    write_jsonl(out / "reward_train.jsonl", [reward_row(rng, ws) for ws in train])
    write_jsonl(out / "reward_test.jsonl", [reward_row(rng, ws) for ws in test])
    print(f"wrote {len(train)} train and {len(test)} test rows per format to {out}")


if __name__ == "__main__":
    main()
