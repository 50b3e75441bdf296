#!/usr/bin/env bash
# Install what the tests need (scripts/install.sh), then lint, check the import contracts,
# type-check, build the documentation site and run the suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k locks.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
echo "== constraints.txt matches pyproject.toml, and .venv holds exactly its pins"
.venv/bin/python scripts/lock.py check --installed
echo "== ruff"
.venv/bin/ruff check domain worker tasks helper harness tests bench scripts docs/hooks
echo "== import contracts (tasks → worker → domain)"
.venv/bin/lint-imports --no-logo
echo "== mypy"
.venv/bin/mypy
echo "== docs: mkdocs build --strict (broken links, anchors, pages left out of the nav fail)"
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir site
echo "== pytest"
exec .venv/bin/pytest "$@"
