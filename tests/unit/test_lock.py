"""constraints.txt pins what every install gets, and the check notices when it goes stale."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def load_lock() -> ModuleType:
    spec = importlib.util.spec_from_file_location("imgprep_lock", ROOT / "scripts" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


lock = load_lock()


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path]:
    pyproject = tmp_path / "pyproject.toml"
    constraints = tmp_path / "constraints.txt"
    shutil.copy(ROOT / "pyproject.toml", pyproject)
    shutil.copy(ROOT / "constraints.txt", constraints)
    return pyproject, constraints


def test_the_checked_in_constraints_match_pyproject() -> None:
    assert lock.problems() == []


def test_every_direct_requirement_is_pinned_inside_its_range() -> None:
    pinned = {p.name: p.version for p in lock.pins() if p.applies()}
    for requirement in lock.requirements():
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            assert requirement.specifier.contains(pinned[canonicalize_name(requirement.name)])


def test_a_changed_dependency_in_pyproject_makes_the_constraints_stale(
    project: tuple[Path, Path],
) -> None:
    # Given pyproject.toml asks for a dependency constraints.txt was not resolved with
    pyproject, constraints = project
    text = pyproject.read_text().replace('"rich>=14.0",', '"rich>=14.0",\n    "tomli-w>=1.0",')
    pyproject.write_text(text)
    # When the constraints are checked
    found = lock.problems(pyproject, constraints)
    # Then they are stale, and the new requirement has no pin
    assert any("resolved from other dependencies" in p for p in found)
    assert any(p.startswith("tomli-w>=1.0 has no pin") for p in found)


def test_a_pin_outside_the_range_is_named(project: tuple[Path, Path]) -> None:
    # Given constraints.txt was edited by hand to a kombu the range does not allow
    pyproject, constraints = project
    text = constraints.read_text()
    constraints.write_text(
        "\n".join(
            "kombu==5.8.0" if line.startswith("kombu==") else line for line in text.splitlines()
        )
    )
    # Then the check names the requirement and the pin
    found = lock.problems(pyproject, constraints)
    assert any("kombu" in p and "not satisfied by the pin kombu==5.8.0" in p for p in found)


def test_a_line_without_an_exact_pin_is_refused(project: tuple[Path, Path]) -> None:
    _, constraints = project
    constraints.write_text(constraints.read_text() + "redis>=8\n")
    with pytest.raises(ValueError, match="not pinned with =="):
        lock.pins(constraints)


def test_this_environment_holds_exactly_the_pins() -> None:
    # scripts/install.sh installs with -c constraints.txt and prunes the rest
    assert lock.installed_problems() == []
