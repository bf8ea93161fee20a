#!/usr/bin/env python
"""Held-out accuracy of a trained model: the fraction of evaluation rows whose answer greedy
decoding reproduces exactly.

The evaluation rows are the config's (test_datasets, else the validation split), prepared as
training prepares them; the model is the trained weights in output_dir, as `archtune generate`
loads them. A row counts when every answer token (and the end-of-turn after it) is the model's
most likely next token, which is exactly when greedy generation from the prompt returns the
answer; one forward per batch instead of a decoding loop.

Usage: python scripts/vision_accuracy.py examples/quickstart-vision.yaml [key=value ...]
       (any config: examples/quickstart-audio.yaml too)
Prints one JSON object: {"accuracy": float, "rows": int, "seconds": float}.
"""
from __future__ import annotations

import argparse
import json
import time


def heldout_accuracy(config: str, overrides: list[str]) -> dict:
    from archtune.config import load_config
    from archtune.data import prepare_data
    from archtune.models.load import load_trained
    from archtune.train.evaluation import greedy_exact_match
    from archtune.train.recipe import data_collator, plan_for

    cfg = load_config(config, overrides)
    setup = plan_for(cfg)
    data = prepare_data(setup.plan, setup.tokenizer, progress=False, media=setup.media)
    model, _ = load_trained(setup.plan, setup.tokenizer)
    start = time.perf_counter()
    result = greedy_exact_match(model, data.eval, data_collator(setup), cfg.micro_batch_size)
    return {"accuracy": result["exact_match"], "rows": result["rows"], "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print(json.dumps(heldout_accuracy(args.config, args.overrides)))


if __name__ == "__main__":
    main()
