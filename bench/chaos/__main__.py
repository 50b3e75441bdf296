"""`.venv/bin/python -m bench.chaos --seed N --duration SECONDS [options]`: one campaign.

Prints a short summary (faults by kind, outcomes by class, every violation), then one line

    chaos: seed=N operations=N faults=N ended=N lost=0 violations=0

and exits 1 when a request was lost or an invariant violated (2 when the campaign itself failed).
The seed fixes the images, the stream of intents and the nemesis's schedule; timing does not
repeat, so two runs of one seed differ in which disks and processes they hit (RELIABILITY.md).
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from pathlib import Path
from types import FrameType

from bench.chaos.campaign import Options, run_campaign
from bench.chaos.cluster import Tuning
from bench.chaos.nemesis import KINDS, PRIVSEP_KINDS, RBD_KINDS, SENTINEL_KINDS, NemesisOptions
from bench.chaos.workload import WorkloadOptions


def parse(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True, help="seconds of faults")
    parser.add_argument("--hosts", type=int, default=2, help="host ids (default 2)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    parser.add_argument("--concurrency", type=int, default=2, help="pool size of each worker")
    parser.add_argument("--in-flight", type=int, default=8, help="operations at once")
    parser.add_argument(
        "--op-timeout", type=float, default=240.0, help="seconds before a request counts as late"
    )
    parser.add_argument(
        "--late-allowance",
        type=float,
        default=600.0,
        help="seconds a late request is still followed before it counts as lost",
    )
    parser.add_argument("--min-gap", type=float, default=2.0, help="seconds between faults, min")
    parser.add_argument("--max-gap", type=float, default=6.0, help="seconds between faults, max")
    parser.add_argument(
        "--faults",
        default=None,
        help=f"fault kinds to inject, or none (default {','.join(KINDS)}; with --sentinel "
        "failover instead of redis_restart)",
    )
    parser.add_argument(
        "--sentinel",
        action="store_true",
        help="Redis as a master, two replicas and three Sentinels; workers on the Sentinel URL",
    )
    parser.add_argument(
        "--privsep",
        action="store_true",
        help="workers run as the unprivileged user with a helper each; adds kill_helper",
    )
    parser.add_argument(
        "--rbd",
        action="store_true",
        help="a one-node Ceph cluster: a third of the prepares on the rbd backend, with their "
        "snapshots, deletes and agings; adds kill_osd and kill_mon",
    )
    parser.add_argument("--lease", type=float, default=6.0, help="lock.lease_seconds")
    parser.add_argument(
        "--no-hostile", action="store_true", help="no requests that must fail (bad checksum, …)"
    )
    parser.add_argument("--root", type=Path, default=Path("/var/tmp"), help="where to work")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--report", type=Path, help="write the summary and history as JSON")
    args = parser.parse_args(argv)
    known = (*PRIVSEP_KINDS, *SENTINEL_KINDS, *RBD_KINDS)
    default = [k for k in KINDS if k != "redis_restart"] + ["failover"] if args.sentinel else KINDS
    if args.privsep:
        default = [*default, "kill_helper"]
    if args.rbd:
        default = [*default, *RBD_KINDS]
    kinds = tuple(k for k in (args.faults or ",".join(default)).split(",") if k and k != "none")
    unknown = set(kinds) - set(known)
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(known)}")
    if not args.privsep and "kill_helper" in kinds:
        parser.error("the kill_helper fault needs --privsep (workers with a privileged helper)")
    if not args.sentinel and set(kinds) & set(SENTINEL_KINDS):
        parser.error("the failover fault needs --sentinel (Redis behind Sentinel)")
    if not args.rbd and set(kinds) & set(RBD_KINDS):
        parser.error("the kill_osd and kill_mon faults need --rbd (a Ceph cluster)")
    if args.sentinel and "redis_restart" in kinds:
        parser.error(
            "with --sentinel, Redis goes away by failover (redis_restart restarts one server)"
        )
    if args.hosts < 2 or args.workers < args.hosts:
        parser.error("a campaign needs two or more hosts and a worker on each")
    return Options(
        seed=args.seed,
        duration=args.duration,
        hosts=args.hosts,
        workers=args.workers,
        concurrency=args.concurrency,
        root=args.root,
        keep=args.keep,
        report=args.report,
        privsep=args.privsep,
        tuning=Tuning(lease_seconds=args.lease, renew_seconds=args.lease / 3),
        workload=WorkloadOptions(
            in_flight=args.in_flight,
            op_timeout=args.op_timeout,
            late_allowance=args.late_allowance,
            hostile=not args.no_hostile,
            rbd=args.rbd,
        ),
        nemesis=NemesisOptions(min_gap=args.min_gap, max_gap=args.max_gap, kinds=kinds),
        sentinel=args.sentinel,
        rbd=args.rbd,
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    # clean up as on Ctrl-C, also when started in the background (SIGINT ignored there)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        summary = run_campaign(options)
    except KeyboardInterrupt:
        print(f"chaos: seed={options.seed} interrupted; everything started was stopped")
        return 130
    except Exception:
        traceback.print_exc()
        print(f"chaos: seed={options.seed} the campaign itself failed (see above)")
        return 2
    print(summary.text())
    print(summary.line(), flush=True)
    return 0 if summary.passed else 1


if __name__ == "__main__":
    sys.exit(main())
