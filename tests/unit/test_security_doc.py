"""SECURITY.md backs every "cannot" with a named test: each file and test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `file.py::test_name`, `::test_name` (same file as the last one named), or `file.py` alone
REFERENCE = re.compile(r"`((?:unit/)?[\w/]+\.py)?(?:::(test_\w+))?`")


def references(text: str) -> list[tuple[Path, str | None]]:
    found: list[tuple[Path, str | None]] = []
    current: Path | None = None
    for match in REFERENCE.finditer(text):
        name, test = match.groups()
        if name is None and test is None:
            continue
        if name is not None:
            if not (name.startswith("unit/") or name.startswith("test_")):
                continue  # a module of the package, named for what it does
            relative = name if name.startswith("unit/") else f"integration/{name}"
            current = ROOT / "tests" / relative
        if current is None:
            raise AssertionError(f"`::{test}` names no file before it")
        found.append((current, test))
    return found


def test_every_test_security_md_names_exists() -> None:
    text = (ROOT / "SECURITY.md").read_text()
    named = references(text)
    assert len(named) > 40
    missing = []
    for path, test in named:
        if not path.exists():
            missing.append(str(path.relative_to(ROOT)))
        elif test is not None and not re.search(rf"^def {test}\(", path.read_text(), re.M):
            missing.append(f"{path.relative_to(ROOT)}::{test}")
    assert missing == []
