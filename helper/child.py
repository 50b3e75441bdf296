"""The child process that runs one checked operation:
`python -m helper.child OP TIMEOUT [UID GID]` (UID, GID: the workers' user, owner of exports).

First of all it drops to the operation's capabilities (helper.operations.CAPABILITIES); then it
reads the request (JSON) from stdin, runs it, and writes the reply (JSON) to stdout. It dies
with the helper that started it (PR_SET_PDEATHSIG), so killing the helper mid-operation ends the
operation too; what the operation had made is named in the device records and released by
teardown or the janitor.
"""

from __future__ import annotations

import logging
import signal
import sys

from domain.core.errors import ImgprepError
from domain.core.runner import CommandError
from helper import capabilities
from helper.logs import configure_logging
from helper.operations import CAPABILITIES, run
from helper.protocol import REQUEST, ErrorReply, Reply


def main(argv: list[str]) -> int:
    op, timeout = argv[0], float(argv[1])
    owner = (int(argv[2]), int(argv[3])) if len(argv) == 4 else None
    capabilities.die_with_parent(signal.SIGKILL)
    capabilities.limit_to(CAPABILITIES[op])
    configure_logging(logging.WARNING)  # stdout carries the reply; the server logs the run
    request = REQUEST.validate_json(sys.stdin.buffer.read())
    if request.op != op:
        raise SystemExit(f"the request is {request.op}, not {op}")
    try:
        reply = run(request, timeout, owner)
    except CommandError as error:
        reply = Reply(ok=False, error=ErrorReply(error_class="CommandError", message=str(error)))
    except ImgprepError as error:
        reply = Reply(
            ok=False, error=ErrorReply(error_class=type(error).__name__, message=str(error))
        )
    except OSError as error:
        reply = Reply(
            ok=False, error=ErrorReply(error_class="DeviceError", message=f"{op} failed: {error}")
        )
    held = capabilities.sets()
    reply = reply.model_copy(
        update={
            "capabilities": {
                "effective": capabilities.describe(held["CapEff"]),
                "bounding": capabilities.describe(held["CapBnd"]),
            }
        }
    )
    sys.stdout.write(reply.model_dump_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
