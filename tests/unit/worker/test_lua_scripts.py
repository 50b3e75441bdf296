"""The Lua scripts (worker/stores/lua.py): each `.lua` file's header names exactly the KEYS[i]
and ARGV[i] its body uses, every file is loaded by some module, and the wheel ships them."""

from __future__ import annotations

import ast
import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

from worker.stores.lua import script

ROOT = Path(__file__).resolve().parents[3]
WORKER = ROOT / "worker"
LUA_FILES = sorted(WORKER.rglob("*.lua"))
INDEX = re.compile(r"\b(KEYS|ARGV)\[([^\]]+)\]")
NAMED = re.compile(r"^--\s+((?:KEYS|ARGV)\[[^\]]+\])")


def package_of(path: Path) -> str:
    return ".".join(path.parent.relative_to(ROOT).parts)


def header_and_body(path: Path) -> tuple[list[str], list[str]]:
    lines = path.read_text().splitlines()
    header = 0
    while header < len(lines) and lines[header].startswith("--"):
        header += 1
    return lines[:header], lines[header:]


def normalised(name: str) -> str:
    return re.sub(r"\s+", "", name)


def named_in_header(header: list[str]) -> set[str]:
    return {normalised(m.group(1)) for line in header if (m := NAMED.match(line))}


def used_in_body(body: list[str]) -> set[str]:
    code = [line.split("--", 1)[0] for line in body]
    return {
        normalised(f"{m.group(1)}[{m.group(2)}]") for line in code for m in INDEX.finditer(line)
    }


def loaded_scripts() -> set[tuple[str, str]]:
    """Every `script("package", "name.lua")` call in the runtime's modules."""
    found = set()
    for module in WORKER.rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "script"
                and len(node.args) == 2
                and all(isinstance(a, ast.Constant) for a in node.args)
            ):
                package, name = (a.value for a in node.args)  # type: ignore[attr-defined]
                found.add((package, name))
    return found


def test_there_are_scripts() -> None:
    assert len(LUA_FILES) >= 10


@pytest.mark.parametrize("path", LUA_FILES, ids=lambda p: p.name)
def test_the_header_names_exactly_the_keys_and_arguments_the_body_uses(path: Path) -> None:
    header, body = header_and_body(path)
    assert header, f"{path.name} has no header comment"
    assert named_in_header(header) == used_in_body(body)


@pytest.mark.parametrize("path", LUA_FILES, ids=lambda p: p.name)
def test_every_script_is_loaded_by_a_module(path: Path) -> None:
    assert (package_of(path), path.name) in loaded_scripts()
    assert script(package_of(path), path.name) == path.read_text()


def test_every_loaded_script_exists() -> None:
    assert loaded_scripts() == {(package_of(p), p.name) for p in LUA_FILES}


def test_the_wheel_ships_every_script() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    for path in LUA_FILES:
        globs = package_data.get(package_of(path), [])
        assert any(fnmatch.fnmatch(path.name, g) for g in globs), path


def test_a_header_that_misses_an_index_is_found(tmp_path: Path) -> None:
    # Given a script whose header forgets ARGV[2]
    path = tmp_path / "bad.lua"
    path.write_text("-- KEYS[1]  a key\n-- ARGV[1]  a value\nreturn {KEYS[1], ARGV[1], ARGV[2]}\n")

    # Then the check tells them apart
    header, body = header_and_body(path)
    assert named_in_header(header) == {"KEYS[1]", "ARGV[1]"}
    assert used_in_body(body) == {"KEYS[1]", "ARGV[1]", "ARGV[2]"}
