"""constraints.txt: exactly what an install of imgprep gets, resolved from pyproject.toml.

    python scripts/lock.py refresh            # resolve again (scripts/lock.sh): uv pip compile
    python scripts/lock.py check              # constraints.txt still matches pyproject.toml
    python scripts/lock.py check --installed  # ... and this environment holds exactly its pins
    python scripts/lock.py prune              # uninstall what this environment holds beyond them

`scripts/install.sh` installs with `pip install -c constraints.txt` (pip's own constraints), so
the tests, CI, the Dockerfile and the demo get the versions the suite last passed with, whatever
has been released since. The file is resolved for every platform (`uv pip compile --universal`)
at the lowest Python pyproject.toml allows, and records the sha256 of the inputs it was resolved
from (the dependency tables and the build requirements): `check` fails when pyproject.toml has
changed them since, or when a pin no longer satisfies a requirement, and tells to run
scripts/lock.sh. Refreshing takes the newest releases inside pyproject.toml's ranges; run the
whole suite before committing the result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TypedDict

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "constraints.txt"
INPUTS_LINE = "# inputs-sha256: "
PROJECT = "imgprep"


@dataclass(frozen=True)
class Pin:
    """One line of constraints.txt: a package at one version, where its marker holds."""

    name: str
    version: str
    marker: Marker | None

    def applies(self) -> bool:
        """Whether this pin is for the running interpreter and platform."""
        return self.marker is None or self.marker.evaluate()


class Inputs(TypedDict):
    """What the resolution depends on: the dependency tables and the build requirements."""

    python: str
    dependencies: list[str]
    extras: dict[str, list[str]]
    build: list[str]


def inputs(pyproject: Path = PYPROJECT) -> Inputs:
    """The inputs of the resolution, as pyproject.toml has them now."""
    data = tomllib.loads(pyproject.read_text())
    project = data["project"]
    return Inputs(
        python=project.get("requires-python", ""),
        dependencies=project.get("dependencies", []),
        extras=project.get("optional-dependencies", {}),
        build=data.get("build-system", {}).get("requires", []),
    )


def inputs_digest(pyproject: Path = PYPROJECT) -> str:
    """The sha256 of `inputs` in a canonical JSON form."""
    canonical = json.dumps(inputs(pyproject), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def requirements(pyproject: Path = PYPROJECT) -> list[Requirement]:
    """Every requirement an install may ask for: runtime, every extra, the build backend."""
    found = inputs(pyproject)
    listed = [*found["dependencies"], *found["build"]]
    for extra in found["extras"].values():
        listed.extend(extra)
    wanted = [Requirement(text) for text in listed]
    return [r for r in wanted if canonicalize_name(r.name) != PROJECT]


def pins(constraints: Path = CONSTRAINTS) -> list[Pin]:
    """The pins of constraints.txt (comments, hashes and continuation lines skipped)."""
    found = []
    for raw in constraints.read_text().splitlines():
        line = raw.split("#", 1)[0].strip().rstrip("\\").strip()
        if not line or line.startswith("-"):
            continue
        requirement = Requirement(line)
        versions = [s.version for s in requirement.specifier if s.operator == "=="]
        if len(versions) != 1:
            raise ValueError(f"constraints.txt: {raw.strip()!r} is not pinned with ==")
        found.append(Pin(canonicalize_name(requirement.name), versions[0], requirement.marker))
    return found


def recorded_digest(constraints: Path = CONSTRAINTS) -> str | None:
    """The inputs digest constraints.txt was resolved from, as its header records it."""
    for line in constraints.read_text().splitlines():
        if line.startswith(INPUTS_LINE):
            return line.removeprefix(INPUTS_LINE).strip()
    return None


def problems(pyproject: Path = PYPROJECT, constraints: Path = CONSTRAINTS) -> list[str]:
    """Why constraints.txt does not match pyproject.toml (empty when it does)."""
    if not constraints.exists():
        return [f"{constraints.name} is missing"]
    found: list[str] = []
    if recorded_digest(constraints) != inputs_digest(pyproject):
        found.append(
            f"{constraints.name} was resolved from other dependencies than pyproject.toml has now"
        )
    applicable: dict[str, str] = {p.name: p.version for p in pins(constraints) if p.applies()}
    for requirement in requirements(pyproject):
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        version = applicable.get(name)
        if version is None:
            found.append(f"{requirement} has no pin in {constraints.name}")
        elif not requirement.specifier.contains(version, prereleases=True):
            found.append(f"{requirement} is not satisfied by the pin {name}=={version}")
    return found


def installed_problems(constraints: Path = CONSTRAINTS) -> list[str]:
    """How this environment differs from the pins: versions, and packages nobody pinned."""
    applicable = {p.name: p.version for p in pins(constraints) if p.applies()}
    found = []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name == PROJECT:
            continue
        pinned = applicable.get(name)
        if pinned is None:
            found.append(f"{name} {dist.version} is installed but not in {constraints.name}")
        elif dist.version != pinned:
            found.append(f"{name} {dist.version} is installed; {constraints.name} pins {pinned}")
    return found


def refresh(pyproject: Path = PYPROJECT, constraints: Path = CONSTRAINTS) -> None:
    """Resolve constraints.txt again with uv, from pyproject.toml's ranges."""
    # the build requirements, and pip itself: the installer is pinned like what it installs
    build = "\n".join([*inputs(pyproject)["build"], "pip"]) + "\n"
    python = re.sub(r"[^0-9.]", "", inputs(pyproject)["python"])
    command = [
        str(Path(sys.executable).with_name("uv")),
        "pip",
        "compile",
        "--quiet",
        "--universal",
        "--python-version",
        python,
        "--extra",
        "dev",
        "--no-header",
        "--no-annotate",
        "--index-url",
        "https://pypi.org/simple",
        str(pyproject.relative_to(pyproject.parent)),
        "-",  # `build`, from stdin
    ]
    resolved = subprocess.run(
        command, input=build, capture_output=True, text=True, check=True, cwd=pyproject.parent
    ).stdout
    lines = [line for line in resolved.splitlines() if not line.startswith("-e ")]
    header = [
        "# What an install of imgprep gets, for pip's -c (scripts/install.sh). Generated from",
        "# pyproject.toml by scripts/lock.sh (uv pip compile --universal --extra dev, with the",
        "# build requirements and pip); do not edit by hand. The test command fails when it no",
        "# longer matches pyproject.toml.",
        f"{INPUTS_LINE}{inputs_digest(pyproject)}",
    ]
    constraints.write_text("\n".join([*header, *lines]) + "\n")


def prune(constraints: Path = CONSTRAINTS) -> list[str]:
    """Uninstall the distributions nobody pinned (left from an earlier resolution)."""
    applicable = {p.name for p in pins(constraints) if p.applies()}
    extra: list[str] = sorted(
        canonicalize_name(d.metadata["Name"])
        for d in metadata.distributions()
        if canonicalize_name(d.metadata["Name"]) not in applicable | {PROJECT}
    )
    if extra:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *extra], check=True)
    return extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("refresh", help="resolve constraints.txt again from pyproject.toml")
    check = commands.add_parser("check", help="fail when constraints.txt no longer matches")
    check.add_argument("--installed", action="store_true", help="also check this environment")
    commands.add_parser("prune", help="uninstall what constraints.txt does not pin")
    args = parser.parse_args(argv)
    if args.command == "refresh":
        refresh()
        print(f"{CONSTRAINTS.name}: {len(pins())} pins")
        return 0
    if args.command == "prune":
        for name in prune():
            print(f"uninstalled {name} (not in {CONSTRAINTS.name})")
        return 0
    stale = problems()
    drifted = installed_problems() if args.installed and not stale else []
    for problem in stale + drifted:
        print(f"scripts/lock.py: {problem}", file=sys.stderr)
    if stale:
        print("scripts/lock.py: run scripts/lock.sh to resolve it again", file=sys.stderr)
    elif drifted:
        print("scripts/lock.py: run scripts/install.sh to install the pins", file=sys.stderr)
    return 1 if stale or drifted else 0


if __name__ == "__main__":
    sys.exit(main())
