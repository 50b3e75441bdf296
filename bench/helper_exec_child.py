"""The helper's operation process as it was before the zygote, for bench.helper_round_trip:
`python -m bench.helper_exec_child OP TIMEOUT`, a fresh interpreter per operation, the request on
stdin, the reply on stdout (what `python -m helper.child` did)."""

from __future__ import annotations

import logging
import signal
import sys

from helper import capabilities
from helper.logs import configure_logging
from helper.operations import CAPABILITIES
from helper.zygote import answer


def main(argv: list[str]) -> int:
    op, timeout = argv[0], float(argv[1])
    capabilities.die_with_parent(signal.SIGKILL)
    capabilities.limit_to(CAPABILITIES[op])
    configure_logging(logging.WARNING)
    sys.stdout.write(answer(op, sys.stdin.buffer.read(), timeout, None).model_dump_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
