"""How a benchmark reports: one line for people, one JSON file per benchmark for BENCHMARKS.md."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Figure:
    """One measured figure of ours against its baseline, measured in the same run."""

    name: str
    ours: float
    baseline: float
    unit: str
    target: str
    met: bool
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("inf")


def machine() -> str:
    cpus = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    system = f"{platform.system()} {platform.release()}"
    return f"{system}, {cpus} cores, Python {platform.python_version()}"


def report(figure: Figure) -> Figure:
    verdict = "met" if figure.met else "MISSED"
    print(
        f"{figure.name}: ours {figure.ours:.4g} {figure.unit}, baseline {figure.baseline:.4g} "
        f"{figure.unit}, ratio {figure.ratio:.3f} (target {figure.target}: {verdict})"
    )
    for key, value in figure.notes.items():
        print(f"  {key}: {value}")
    RESULTS.mkdir(exist_ok=True)
    record = {
        **asdict(figure),
        "ratio": figure.ratio,
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (RESULTS / f"{figure.name}.json").write_text(json.dumps(record, indent=2))
    return figure


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values)
