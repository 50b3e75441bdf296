"""The privileged helper's per-operation cost: a child forked by the zygote against the fresh
interpreter per operation it replaced, both in this process, and what a caller sees through a
real helper's socket.

    .venv/bin/python -m bench.helper_round_trip [--runs 200] [--exec-runs 40]

The operation is `is_live_mount` of a work-area path nothing is mounted on (one statvfs(2): the
figure is the cost of running an operation at all). Measured, in milliseconds:

* `zygote`     — helper.zygote.Zygote.run: a socketpair to the zygote, a fork, the capability
                 drop, the request and the reply (what the helper's threads call);
* `exec`       — the same child as a fresh interpreter (`python -m bench.helper_exec_child`,
                 what `python -m helper.child` was): the baseline;
* `in_process` — helper.operations.run called directly (no process, no capability drop);
* `socket`     — HelperClient.is_live_mount against a real `python -m helper` (connect,
                 SO_PEERCRED, the checks against the roots, the zygote, the reply, the log line).

Target: the zygote's median at most a tenth of the exec baseline's. Needs root.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.report import Figure, percentile, report
from harness.privileges import HelperProcess, open_directory, unprivileged_user
from helper import operations
from helper.protocol import IsLiveMount
from helper.zygote import Zygote
from worker.logs import configure_logging
from worker.privileges.helper_client import HelperClient

TIMEOUT = 300.0


def timed(runs: int, once: Callable[[], object]) -> list[float]:
    """Milliseconds of each of `runs` calls of `once` (after one call not counted)."""
    once()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        once()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def exec_child(request: IsLiveMount) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.helper_exec_child", request.op, str(TIMEOUT)],
        input=request.model_dump_json().encode(),
        capture_output=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert b'"ok":true' in done.stdout, done.stdout


def summary(samples: list[float]) -> str:
    return f"median {percentile(samples, 0.5):.3f} ms, p90 {percentile(samples, 0.9):.3f} ms"


def run(runs: int, exec_runs: int) -> Figure:
    unprivileged_user()
    with tempfile.TemporaryDirectory() as scratch:
        request = IsLiveMount(target=str(Path(scratch) / "root"))
        zygote = Zygote.start(None, TIMEOUT)
        try:
            forked = timed(runs, lambda: zygote.run(request))
        finally:
            zygote.close()
        fresh = timed(exec_runs, lambda: exec_child(request))
        direct = timed(runs, lambda: operations.run(request, TIMEOUT))
    with open_directory("bench-helper") as root, HelperProcess.start(root) as helper:
        client = HelperClient(helper.socket_path)
        target = helper.devices_dir / "vm" / "disk" / "root"  # inside its work areas
        through = timed(runs, lambda: client.is_live_mount(target))
    ours, baseline = percentile(forked, 0.5), percentile(fresh, 0.5)
    return Figure(
        name="helper_round_trip",
        ours=ours,
        baseline=baseline,
        unit="ms",
        target="zygote median <= 0.1 x exec median",
        met=ours <= 0.1 * baseline,
        notes={
            "zygote (forked child)": summary(forked),
            "exec (fresh interpreter, the baseline)": summary(fresh),
            "in process (no child)": summary(direct),
            "through a real helper's socket": summary(through),
            "runs": f"{runs} ({exec_runs} for exec)",
        },
    )


def main() -> None:
    configure_logging("WARNING")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--exec-runs", type=int, default=40)
    args = parser.parse_args()
    report(run(args.runs, args.exec_runs))


if __name__ == "__main__":
    main()
