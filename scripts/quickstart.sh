#!/usr/bin/env bash
# README's first command: install archtune (CPU torch 2.13.0 first) and run the main job,
# a real fine-tune of the embedded tiny Gemma-4-MoE-shaped model on the bundled data.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install --quiet torch==2.13.0
pip install --quiet -e ".[test]" -c requirements.lock  # exactly the stack the tests passed with
archtune train examples/quickstart.yaml overwrite_output_dir=true  # a second run replaces the first
# Held-out prompts (not in the training data): the answer is the category of each word.
archtune generate examples/quickstart.yaml --prompt "Give the category of each word." --input "cloud apple dog"
archtune generate examples/quickstart.yaml --prompt "Give the category of each word." --input "ship mouse pear"
