#!/usr/bin/env python
"""Write archtune's bundled example data sets (deterministic, seeded).

The task family is "word lists": a prompt holds a short list of words taken from a fixed
vocabulary of 64 words in 8 categories, and the answer follows from the prompt by a simple
rule that generalises to unseen lists:

* category: "cat apple red"  -> "animal fruit color"
* reverse:  "cat apple red"  -> "red apple cat"

The quickstart (alpaca) set is the category task on lists of exactly three words; the chat
and completion sets mix both operations on lists of three to five words. Because the word list is small and fixed, archtune's bundled BPE tokenizer (trained on these
files, see scripts/train_tokenizer.py) holds every word as a single token, and a tiny random
model learns the task from scratch on CPU in a minute or two.

Files written (relative to the repository root):

* examples/data/quickstart/train.jsonl  alpaca rows (instruction, input, output); 1 in 5 has
                                        the words in the instruction and an empty input
* examples/data/quickstart/test.jsonl   alpaca rows; no word list of test occurs in train
* examples/data/chat.jsonl              {"messages": [...]} rows, some multi-turn, some with a system turn
* examples/data/completion.jsonl        {"text": ...} rows
* examples/data/corpus.txt              extra plain text for tokenizer training

Usage: python scripts/make_data.py [--out-dir examples/data] [--seed 1234]
Running it twice writes byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CATEGORIES: dict[str, list[str]] = {
    "animal": ["cat", "dog", "horse", "mouse", "bird", "fish", "cow", "sheep"],
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "pear", "plum"],
    "color": ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"],
    "tool": ["hammer", "saw", "drill", "wrench", "shovel", "rake", "knife", "axe"],
    "vehicle": ["car", "bus", "train", "bike", "truck", "boat", "plane", "ship"],
    "drink": ["water", "milk", "tea", "coffee", "juice", "soda", "wine", "beer"],
    "body": ["hand", "foot", "head", "nose", "ear", "eye", "knee", "arm"],
    "weather": ["rain", "snow", "wind", "fog", "storm", "sun", "cloud", "hail"],
}
WORDS: list[str] = [w for ws in CATEGORIES.values() for w in ws]
CATEGORY_OF: dict[str, str] = {w: c for c, ws in CATEGORIES.items() for w in ws}

# Instruction phrasings per operation. The `with_colon` forms carry the words in the
# instruction itself (alpaca rows with an empty input).
INSTRUCTIONS: dict[str, list[str]] = {
    "reverse": [
        "Reverse the order of the words.",
        "Write the words in reverse order.",
        "List the words backwards.",
    ],
    "category": [
        "Give the category of each word.",
        "Name the category of each word.",
        "Say what kind of thing each word is.",
    ],
}
INLINE_INSTRUCTIONS: dict[str, list[str]] = {
    "reverse": ["Reverse the order of these words:", "Write these words backwards:"],
    "category": ["Give the category of each of these words:", "Name the category of these words:"],
}
# The quickstart is the category task on lists of exactly QUICKSTART_WORDS words: with a fixed
# length every answer word sits at the same distance from its input word, which a tiny random
# model picks up within a few hundred steps. Lists of varying length, or a mix of operations,
# take it several times longer (measured: see the docstring of `quickstart`).
QUICKSTART_OPERATIONS = ("category",)
QUICKSTART_WORDS = 3
# chat.jsonl and completion.jsonl: both operations, 3 to 5 words.
OPERATIONS = ("reverse", "category")
MIN_WORDS, MAX_WORDS = 3, 5

N_TRAIN, N_TEST, N_CHAT, N_COMPLETION = 3000, 150, 200, 200

SYSTEM_PROMPTS = [
    "You are a helpful assistant that works with short lists of words.",
    "Answer with the words only, separated by spaces.",
    "You sort words into categories and rewrite word lists.",
]


def answer(op: str, words: list[str]) -> str:
    if op == "reverse":
        return " ".join(reversed(words))
    if op == "category":
        return " ".join(CATEGORY_OF[w] for w in words)
    raise ValueError(op)


def random_words(rng: random.Random, n: int | None = None) -> tuple[str, ...]:
    if n is None:
        n = rng.randint(MIN_WORDS, MAX_WORDS)
    return tuple(rng.choice(WORDS) for _ in range(n))


def alpaca_row(rng: random.Random, words: tuple[str, ...]) -> dict[str, str]:
    op = rng.choice(QUICKSTART_OPERATIONS)
    text = " ".join(words)
    if rng.random() < 0.2:
        instruction, inp = f"{rng.choice(INLINE_INSTRUCTIONS[op])} {text}", ""
    else:
        instruction, inp = rng.choice(INSTRUCTIONS[op]), text
    return {"instruction": instruction, "input": inp, "output": answer(op, list(words))}


def quickstart(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Alpaca train and test rows; no word list of a test row occurs in train.

    Measured with archtune's tiny:gemma4-moe (hidden 64, 4 layers, full fine-tuning, AdamW
    lr 1e-3 betas (0.9, 0.999), 40 warmup steps then cosine, batch 16, CPU): the category task
    on 3-word lists is learned (held-out greedy answers right for 124-150 of 150 rows, over 4
    seeds) within 600-800 steps, and the held-out answer loss falls from 7.6 to below 0.2.
    The same task on 3-5 words, or reverse and category mixed, was still mostly wrong after
    600-1200 steps; lr 3e-3 or more often sat for 500+ steps on the plateau where the model
    only knows the category frequencies (loss ~1.56).
    """
    # Test word lists first, so that train can avoid them entirely.
    test_lists: list[tuple[str, ...]] = []
    seen: set[tuple[str, ...]] = set()
    while len(test_lists) < N_TEST:
        ws = random_words(rng, QUICKSTART_WORDS)
        if ws not in seen:
            seen.add(ws)
            test_lists.append(ws)
    train_lists: list[tuple[str, ...]] = []
    while len(train_lists) < N_TRAIN:
        ws = random_words(rng, QUICKSTART_WORDS)
        if ws not in seen:  # also keeps train lists unique
            seen.add(ws)
            train_lists.append(ws)
    train = [alpaca_row(rng, ws) for ws in train_lists]
    test = [alpaca_row(rng, ws) for ws in test_lists]
    return train, test


def user_turn(rng: random.Random, op: str, words: tuple[str, ...]) -> str:
    text = " ".join(words)
    if rng.random() < 0.5:
        return f"{rng.choice(INLINE_INSTRUCTIONS[op])} {text}"
    return f"{rng.choice(INSTRUCTIONS[op])}\n{text}"


def chat_rows(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(N_CHAT):
        messages: list[dict[str, str]] = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        turns = rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
        for _ in range(turns):
            op = rng.choice(OPERATIONS)
            words = random_words(rng)
            messages.append({"role": "user", "content": user_turn(rng, op, words)})
            messages.append({"role": "assistant", "content": answer(op, list(words))})
        rows.append({"messages": messages})
    return rows


def completion_rows(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(N_COMPLETION):
        words = list(random_words(rng))
        lines = [f"Words: {' '.join(words)}"]
        ops = list(OPERATIONS)
        rng.shuffle(ops)
        for op in ops[: rng.randint(1, len(ops))]:
            label = {"reverse": "Reversed", "category": "Categories"}[op]
            lines.append(f"{label}: {answer(op, words)}")
        rows.append({"text": "\n".join(lines)})
    return rows


# Plain English for the tokenizer corpus, so the bundled tokenizer also has merges for
# ordinary text (documentation, user prompts), not only for the word-list task.
CORPUS_PARAGRAPHS = [
    "archtune fine-tunes language models on a single machine or on several. It reads a YAML "
    "config, checks it against what the model family needs, prepares the data set, and then "
    "trains with full weights, LoRA or QLoRA. Every run writes its resolved config, its logs "
    "and a small report next to the checkpoints.",
    "A tokenizer turns text into a sequence of integer ids. This one is a byte-level BPE: any "
    "string can be encoded, because every byte has its own token, and frequent pieces of text "
    "are merged into longer tokens. Special tokens such as the start and end of a turn are "
    "never split and have fixed ids.",
    "The quickstart trains a tiny model with random weights. It is not meant to be useful; it "
    "shows that the whole pipeline works on a laptop in a couple of minutes. The loss on the "
    "held-out test set should fall to less than half of its starting value, and the model "
    "should learn to reverse a list of words or to name the category of each word.",
    "When the model is large, the same config runs on one or more GPUs. Mixed precision, "
    "gradient checkpointing, sequence packing and sharded data parallel training are turned "
    "on with a single key each. Mixture of experts layers need special care: the router, the "
    "load balancing loss and the expert weights all have their own settings.",
    "Chat data holds a list of messages. Each message has a role, which is system, user or "
    "assistant, and the content of the turn. Only the assistant turns are trained on by "
    "default; the prompt tokens are masked so that they do not add to the loss.",
    "Evaluation runs on a separate split. The mean cross entropy over the answer tokens is "
    "reported after every evaluation step, together with the perplexity, the learning rate, "
    "the gradient norm and the number of tokens seen so far.",
    "Good data matters more than clever settings. Start with a small learning rate, a modest "
    "batch size and a few hundred steps, look at the samples the model generates, and only "
    "then scale up. Save often, and keep the config that produced each checkpoint.",
]

EXTRA_WORDS = (
    "the of and to in is was for that with as on by at from this be are or which an it not "
    "have has had were but all their they there been one two three four five six seven eight "
    "nine ten first second new other more some time only also can will would could should may "
    "must into than then them these those its about after before over under between through "
    "during without within while where when what who whom whose why how each every both few "
    "many most much such same own very just now here again once because until against above "
    "below up down out off further any no nor so too yes if else true false none null value "
    "number string list dict key file path name size step steps epoch epochs batch loss rate "
    "learning warmup schedule cosine linear optimizer adam weight decay gradient norm clip "
    "model models layer layers head heads hidden attention expert experts router token tokens "
    "vocabulary embedding embeddings sequence length context window position rotary norm "
    "train training eval evaluation test validation split dataset datasets sample samples "
    "prompt prompts answer answers question questions instruction instructions input output "
    "user assistant system message messages role content turn turns template chat completion "
    "text image audio video vision language small large tiny big long short fast slow good bad "
    "high low left right early late open close start end begin finish read write load save "
    "run runs make build check fix find use used using give gives take takes show shows keep "
    "work works help helps need needs want try call return set get put add remove change "
    "move copy reverse sort filter count merge split join order kind type class group part "
    "world people person house home school water food money day days week year years life "
    "city country state company family friend child children man woman hand eye face place "
    "thing things way ways point points problem problems idea ideas fact facts example examples "
    "reason result results level levels case cases system systems process program programs "
    "computer machine machines memory disk network server client device devices processor "
    "config configs option options setting settings default defaults error errors warning "
    "warnings report reports check checks log logs metric metrics plot plots chart charts "
    "python code script scripts function functions module modules package packages library "
    "install version versions release releases update updates change changes feature features "
    "january february march april may june july august september october november december "
    "monday tuesday wednesday thursday friday saturday sunday morning evening night today "
    "tomorrow yesterday always never often sometimes usually already still yet soon later "
    "quick quickly simple simply clear clearly easy easily hard hardly real really full fully "
    "north south east west spring summer autumn winter garden river mountain forest ocean "
    "island bridge road street station market library museum hospital office kitchen room "
    "table chair window door floor wall roof bed book paper pen letter word words sentence "
    "story song music art game games sport team player players ball goal score win lose"
)


def corpus_text(rng: random.Random) -> str:
    vocab = EXTRA_WORDS.split()
    lines = list(CORPUS_PARAGRAPHS)
    for _ in range(400):
        n = rng.randint(6, 14)
        ws = [rng.choice(vocab) for _ in range(n)]
        if rng.random() < 0.5:
            ws[0] = ws[0].capitalize()
        punct = rng.choice([".", ".", ".", "?", "!", ":"])
        lines.append(" ".join(ws) + punct)
    lines.append(" ".join(str(i) for i in range(0, 101)) + " 128 256 512 1000 1024 2048 4096.")
    # Every task word capitalised and in upper case once, for case variants.
    lines.append(" ".join(w.capitalize() for w in WORDS) + ".")
    lines.append(" ".join(w.upper() for w in WORDS) + ".")
    return "\n".join(lines) + "\n"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "examples" / "data")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    out: Path = args.out_dir

    # One generator per file, so that changing one file's size leaves the others unchanged.
    train, test = quickstart(random.Random(f"{args.seed}-quickstart"))
    write_jsonl(out / "quickstart" / "train.jsonl", train)
    write_jsonl(out / "quickstart" / "test.jsonl", test)
    write_jsonl(out / "chat.jsonl", chat_rows(random.Random(f"{args.seed}-chat")))
    write_jsonl(out / "completion.jsonl", completion_rows(random.Random(f"{args.seed}-completion")))
    (out / "corpus.txt").write_text(corpus_text(random.Random(f"{args.seed}-corpus")), encoding="utf-8", newline="\n")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(out)}  {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
