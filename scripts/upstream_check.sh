#!/usr/bin/env bash
# Before moving requirements.lock forward: in a throwaway venv, the newest releases of
# transformers, peft, trl, accelerate and datasets (everything else as locked), then every patch's
# exactness tests and the packing and family tests, and one table: library, locked, newest,
# patches whose upstream code changed, exactness held or not. Exit 0 when every patch held.
#   scripts/upstream_check.sh [--output report.md]
set -euo pipefail
cd "$(dirname "$0")/.."
UPGRADED="transformers peft trl accelerate datasets"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
pattern="^($(echo "$UPGRADED" | tr ' ' '|'))=="
# torchao is the optim extra's pin, not part of the tested .[test] stack
grep -viE "$pattern" requirements.lock | grep -v -e '^-e ' -e '^torchao==' > "$work/rest.lock"
pip install --quiet torch==2.13.0
pip install --quiet -r "$work/rest.lock"
pip install --quiet --upgrade $UPGRADED  # newest releases, past pyproject's caps
pip install --quiet --no-deps -e .
python scripts/upstream_check.py "$@"
