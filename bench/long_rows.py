"""Write the "longer rows" data shape of the speed comparisons: alpaca rows of 100-400 tokens.

    python bench/long_rows.py /tmp/long_rows.jsonl            # 210 rows, seed 0
    python bench/long_rows.py OUT.jsonl --rows 400 --seed 3

The rows are the bundled quickstart task (categories of a word list, scripts/make_data.py) on
long word lists: every word is one token of the bundled tokenizer, the answer has one word
per input word, so a list of n words gives a row of about 2n + 15 tokens. n is drawn
uniformly so that rows span 100 to 400 tokens (mean ~250): packed at 512, a row holds one
to four documents, unlike the quickstart's ~25-token rows (about twenty per packed row).
Deterministic: the same arguments write the same bytes.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_data import CATEGORY_OF, INSTRUCTIONS, WORDS  # noqa: E402

MIN_TOKENS, MAX_TOKENS = 100, 400
PROMPT_TOKENS = 15  # template + instruction, about


def row(rng: random.Random) -> dict[str, str]:
    n = rng.randint((MIN_TOKENS - PROMPT_TOKENS) // 2 + 1, (MAX_TOKENS - PROMPT_TOKENS) // 2)
    words = [rng.choice(WORDS) for _ in range(n)]
    return {"instruction": rng.choice(INSTRUCTIONS["category"]), "input": " ".join(words),
            "output": " ".join(CATEGORY_OF[w] for w in words)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=210)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for _ in range(args.rows):
            f.write(json.dumps(row(rng), sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
