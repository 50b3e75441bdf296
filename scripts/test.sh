#!/usr/bin/env bash
# The project's tests, in two tiers (CONTRIBUTING.md):
#
#   scripts/test.sh unit [pytest args]   the fast tier, under a minute, without root: ruff, mypy
#                                        and the unit tests that need neither root nor a real
#                                        redis-server (`-m "not root"`), in the checkout's .venv
#                                        as it is (nothing installed)
#   scripts/test.sh [pytest args]        the whole suite, as CI runs it, as root: install what is
#                                        missing (scripts/install.sh), check the lock, ruff,
#                                        import contracts, mypy, the documentation site (mkdocs
#                                        build --strict), then every test in parallel processes
#                                        (pytest-xdist), then any marked `serial`, alone
#
# Extra arguments go to pytest, e.g. scripts/test.sh -k locks. IMGPREP_TEST_JOBS sets how many
# test processes run at once (default 6: the tests mostly wait on subprocesses, so more processes
# than cores pay).
set -euo pipefail
cd "$(dirname "$0")/.."

lint() {
  echo "== ruff"
  .venv/bin/ruff check domain worker tasks helper harness tests bench scripts docs/hooks
}

typecheck() {
  echo "== mypy"
  .venv/bin/mypy
}

if [[ ${1:-} == unit ]]; then
  shift
  if [[ ! -x .venv/bin/pytest ]]; then
    echo "scripts/test.sh unit: no .venv with the test tools here; make one with" >&2
    echo "  python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[dev]'" >&2
    echo "(or run scripts/install.sh as root, which also installs what the whole suite needs)" >&2
    exit 1
  fi
  pytest_options=()
  if [[ ! -w . ]]; then  # a checkout this user cannot write: caches go to a directory of its own
    caches=$(mktemp -d)
    trap 'rm -rf "$caches"' EXIT
    export MYPY_CACHE_DIR=$caches/mypy RUFF_CACHE_DIR=$caches/ruff
    pytest_options+=(-p no:cacheprovider)
  fi
  started=$SECONDS
  lint
  typecheck
  echo "== pytest tests/unit -m 'not root'"
  .venv/bin/pytest "${pytest_options[@]}" -q -n 4 -m "not root" tests/unit "$@"
  echo "== fast tier passed in $((SECONDS - started)) s"
  exit 0
fi

./scripts/install.sh
echo "== constraints.txt matches pyproject.toml, and .venv holds exactly its pins"
.venv/bin/python scripts/lock.py check --installed
lint
echo "== import contracts (tasks → worker → domain)"
.venv/bin/lint-imports --no-logo
typecheck
echo "== docs: mkdocs build --strict (broken links, anchors, pages left out of the nav fail)"
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir site

jobs=${IMGPREP_TEST_JOBS:-6}
# A selection of the caller's own (-m) runs once, in parallel; otherwise the tests marked serial
# run after the others, one at a time. Which tests one process runs together, which go first and
# which run alone: tests/support/parallel.py.
for argument in "$@"; do
  if [[ $argument == -m || $argument == -m* ]]; then
    echo "== pytest -n $jobs (the caller's selection)"
    exec .venv/bin/pytest -n "$jobs" --dist loadgroup --no-loadscope-reorder "$@"
  fi
done
# pytest's exit status 5: the arguments selected no test of that phase
passed_or_empty() { [[ $1 -eq 0 || $1 -eq 5 ]]; }
started=$SECONDS
echo "== pytest -n $jobs -m 'not serial'"
status=0
.venv/bin/pytest -n "$jobs" --dist loadgroup --no-loadscope-reorder -m "not serial" --durations=25 "$@" || status=$?
passed_or_empty $status || exit $status
echo "== pytest -m serial"
serial=0
.venv/bin/pytest -m serial --durations=10 "$@" || serial=$?
passed_or_empty $serial || exit $serial
if [[ $status -eq 5 && $serial -eq 5 ]]; then
  exit 5
fi
echo "== suite passed in $((SECONDS - started)) s"
