#!/usr/bin/env bash
# Install what the tests need (scripts/install.sh), then lint, check the import contracts,
# type-check and run the suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k locks.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
echo "== constraints.txt matches pyproject.toml, and .venv holds exactly its pins"
.venv/bin/python scripts/lock.py check --installed
echo "== ruff"
.venv/bin/ruff check domain worker tasks helper harness tests bench scripts
echo "== import contracts (tasks → worker → domain)"
.venv/bin/lint-imports --no-logo
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/pytest "$@"
