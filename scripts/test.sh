#!/usr/bin/env bash
# Install what the tests need (scripts/install.sh), then lint, type-check and run the suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k locks.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
echo "== ruff"
.venv/bin/ruff check domain worker tasks tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/pytest "$@"
