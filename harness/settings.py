"""The settings a process started with a given environment loads, for the tests, benchmarks and
fault campaign that start workers with an environment of their own."""

from __future__ import annotations

import os
from collections.abc import Mapping

from worker.settings import Settings


def settings_for_env(env: Mapping[str, str]) -> Settings:
    """The settings a process whose whole environment is `env` loads; an invalid combination
    fails here, not in the process. os.environ is swapped for the call: not for threads."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
