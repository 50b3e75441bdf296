"""Run every benchmark (or the ones named), one after the other, then print the table of figures
that BENCHMARKS.md records:

    .venv/bin/python -m bench                       # all, with their default sizes
    .venv/bin/python -m bench lock_handoff burst    # some
    .venv/bin/python -m bench --table               # only the table of the last results

Each benchmark runs imgprep and its baseline in the same run, on the same machine, and reports the
ratio; results go to bench/results/<figure>.json. Nothing here is part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench.report import RESULTS

BENCHMARKS: dict[str, list[str]] = {
    "cache_hit": ["bench.cache_hit", "--count", "200", "--concurrency", "2"],
    "cache_hit_c4": ["bench.cache_hit", "--count", "200", "--concurrency", "4"],
    "burst": ["bench.burst"],
    "burst_dense": ["bench.burst", "--size-mib", "512", "--data-mib", "512"],
    "lock_handoff": ["bench.lock_handoff"],
    "fetch_throughput": ["bench.fetch_throughput", "--repeat", "7"],
    "sparse_convert": ["bench.sparse_convert"],
    "full_prepare": ["bench.full_prepare"],
    "mount_inject": ["bench.mount_inject", "--runs", "30"],
    "helper_round_trip": ["bench.helper_round_trip"],
    "scale": ["bench.scale"],
    "fleet": ["bench.fleet"],
    "latency": ["bench.latency"],
    "rbd": ["bench.rbd"],
    "guest_boot": ["bench.guest_boot"],
}


def table() -> str:
    rows = [
        "| figure | ours | baseline | ratio | target | met | date |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        rows.append(
            f"| {data['name']} | {data['ours']:.4g} {data['unit']} | "
            f"{data['baseline']:.4g} {data['unit']} | {data['ratio']:.3f} | {data['target']} | "
            f"{'yes' if data['met'] else 'no'} | {data['date'][:10]} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run: {', '.join(BENCHMARKS)}")
    parser.add_argument("--table", action="store_true", help="only print the table of results")
    args = parser.parse_args()
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; known: {', '.join(BENCHMARKS)}")
    if not args.table:
        for name in args.names or list(BENCHMARKS):
            print(f"== {name}", flush=True)
            subprocess.run([sys.executable, "-m", *BENCHMARKS[name]], check=True)
    print(table())


if __name__ == "__main__":
    main()
