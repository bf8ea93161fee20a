#!/usr/bin/env bash
# The whole test suite (README's test command). Two workers: CI machines have 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
exec python -m pytest -n 2 --dist loadfile -q -p no:cacheprovider tests "$@"
