"""Imports run one way, tasks → worker → domain: the import-linter contracts of pyproject.toml
hold on the whole import graph (the domain imports no Celery, kombu, Redis, runtime or task
code; the runtime imports nothing of tasks/; the domain's features are layered over domain.core,
and no import cycle runs among the domain's modules)."""

from __future__ import annotations

import ast
from pathlib import Path

from importlinter.cli import EXIT_STATUS_SUCCESS, lint_imports

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN_IN_DOMAIN = ("celery", "kombu", "redis", "billiard", "flower", "worker", "tasks")


def test_the_import_contracts_are_kept() -> None:
    status = lint_imports(config_filename=str(REPO / "pyproject.toml"), no_logo=True, no_cache=True)
    assert status == EXIT_STATUS_SUCCESS


def imported(path: Path) -> set[str]:
    """Every module a file imports (at any depth, lazily or not)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{path.relative_to(REPO)} imports {name}"
        for path in (REPO / package).rglob("*.py")
        for name in imported(path)
        if name.split(".")[0] in forbidden
    )


def test_no_domain_module_imports_celery_redis_the_runtime_or_the_tasks() -> None:
    assert offenders("domain", FORBIDDEN_IN_DOMAIN) == []


def test_the_runtime_imports_no_task_module() -> None:
    assert offenders("worker", ("tasks",)) == []


def test_benchmarks_import_no_test_code() -> None:
    assert offenders("bench", ("tests",)) == []
