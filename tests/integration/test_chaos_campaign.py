"""The randomized fault campaign (bench.chaos), short: 75 s of faults with a fixed seed.

Real redis-server with AOF, three real workers on two host ids, an image server with fast, slow
and stalling sources, mixed operations from a plain client, and a nemesis that kills pool
processes and whole workers, pauses lock holders past their lease, restarts Redis and stalls
sources; the workers are separated as every test cluster is (conftest), and the nemesis also
kills their privileged helpers. The checker must find every request ended (nothing lost) and
no invariant violated, and the nemesis must have injected every kind of fault. The long run is
documented in RELIABILITY.md.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.chaos.nemesis import KINDS, PRIVSEP_KINDS
from harness.machine import loop_devices_backed_by, mounts_under
from tests.conftest import need_tools
from tests.integration.conftest import PRIVSEP

REPO = Path(__file__).resolve().parents[2]
SEED = 11
DURATION = 75
OP_TIMEOUT = 180
LINE = re.compile(
    r"^chaos: seed=(\d+) operations=(\d+) faults=(\d+) ended=(\d+) lost=(\d+) violations=(\d+)$"
)


@pytest.mark.slow
@pytest.mark.timeout(DURATION + OP_TIMEOUT + 300)
def test_fault_campaign_loses_nothing_and_breaks_no_promise(tmp_path: Path) -> None:
    need_tools(
        "redis-server",
        "qemu-img",
        "qemu-storage-daemon",
        "fuse2fs",
        "mkfs.ext4",
        "sfdisk",
        "debugfs",
    )
    report = tmp_path / "report.json"

    # Given a cluster under a seeded nemesis, when the campaign runs to its end
    argv = [
        sys.executable, "-m", "bench.chaos",
        "--seed", str(SEED),
        "--duration", str(DURATION),
        "--op-timeout", str(OP_TIMEOUT),
        "--root", str(tmp_path),
        "--report", str(report),
        *(["--privsep"] if PRIVSEP else []),
    ]  # fmt: skip
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        output, _ = process.communicate(timeout=DURATION + OP_TIMEOUT + 240)
    finally:
        if process.poll() is None:  # interrupted: let the campaign stop what it started
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
    print(output)

    # Then the campaign left nothing behind: no process, mount, loop device or directory
    assert not processes_under(tmp_path)
    assert not mounts_under(tmp_path)
    assert not loop_devices_backed_by(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("imgprep-chaos-")]

    # and it ended with its one-line verdict, and the report says the same
    last = output.strip().splitlines()[-1]
    match = LINE.match(last)
    assert match, f"no final line; the campaign failed:\n{output[-3000:]}"
    summary = json.loads(report.read_text())["summary"]
    seed, operations, faults, ended, lost, violations = (int(g) for g in match.groups())
    assert (seed, operations, faults) == (SEED, summary["operations"], summary["faults"])
    assert operations >= 50, "too few operations for the campaign to mean anything"

    # every kind of fault was injected
    kinds = PRIVSEP_KINDS if PRIVSEP else KINDS
    missing = [kind for kind in kinds if not summary["faults_by_kind"].get(kind)]
    assert not missing, f"fault kinds never injected: {missing}"

    # every request ended, and no promise was broken
    described = "\n".join(f"[{v['invariant']}] {v['text']}" for v in summary["violations"])
    assert lost == 0, f"{lost} requests never ended:\n{output[-3000:]}"
    assert violations == 0, f"{violations} violations:\n{described}"
    assert ended == operations
    assert process.returncode == 0


def processes_under(root: Path) -> list[str]:
    """Processes whose command line or environment names `root`: redis-server, workers (their
    IMGPREP_*_DIR), helper daemons."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
                environ = (proc / "environ").read_bytes()
            except OSError:
                continue
            if str(root).encode() in cmdline + environ:
                found.append(f"{proc.name}: {cmdline[:200]!r}")
    return found
