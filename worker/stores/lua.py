"""The Lua scripts of the Redis adapters, kept as `.lua` files beside the module that runs them
and shipped as package data, as dramatiq keeps its broker's.

Each file opens with comments naming every KEYS[i] and ARGV[i] its body uses
(tests/unit/worker/test_lua_scripts.py checks that, and that every file is loaded somewhere).
"""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def script(package: str, name: str) -> str:
    """The text of the script `name` (e.g. "beat.lua") of `package` (e.g. "worker.delivery")."""
    return resources.files(package).joinpath(name).read_text(encoding="utf-8")
