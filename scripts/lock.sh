#!/usr/bin/env bash
# Resolve constraints.txt again from pyproject.toml's ranges (the newest releases inside them),
# then install exactly that into .venv. Run the whole suite (scripts/test.sh) before committing
# the new constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/uv ]] || ./scripts/install.sh
.venv/bin/python scripts/lock.py refresh
./scripts/install.sh
