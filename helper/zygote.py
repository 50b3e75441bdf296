"""The helper's zygote: one pre-forked process that forks a child for each operation.

A child used to be a fresh interpreter (`python -m helper.child`): 50-250 ms of interpreter start
and imports per operation, about ten of them per prepare with injection. The zygote is forked by
the helper once, at start, before the helper starts any thread (so the fork copies no lock
another thread holds); it is single-threaded and has helper.operations, the domain and pydantic
imported already, so a child costs one fork.

How a request runs (`Zygote.run`, called by the server's threads, concurrently):

1. The server thread makes a new socketpair and sends one end to the zygote over the control
   socket (SOCK_SEQPACKET: one message per request, so concurrent sends never interleave), with
   the operation's name as the message. The zygote forks a child, closes its copy of the end, and
   waits for the next message. It never reads a request: it only forks.
2. The child (`_child`): dies with the zygote (PR_SET_PDEATHSIG, which dies with the helper the
   same way), sends the server thread a pidfd of itself, drops to the operation's capabilities
   (helper.operations.CAPABILITIES, bounding set included), then reads the request, runs it
   (helper.operations.run) and writes the reply, with the capabilities it held, straight to the
   server thread, and exits.
3. The server thread waits for the reply until `limit`; past it, it kills the child through the
   pidfd (a pidfd names that process only: no pid that was reused can be hit) and reports it.
   The request is sent only once the child's pidfd is in: a child that starts after the server
   gave up finds its end closed and runs nothing.

No zombies: the zygote sets SIGCHLD to SIG_IGN, so the kernel reaps its children as they exit
(each child sets it back to the default before it runs any tool, whose exit it waits for).

When the zygote dies the helper exits with a failure (`check`, from the server's main loop); it
does not restart it. A new zygote could only be forked from the helper's main thread while
handler threads run (a fork of a threaded process may copy a lock another thread holds, and the
parent-death signal follows the thread that forked, so a handler thread cannot do it), or be
exec'd as a fresh interpreter: a second way to start it, for a case that only happens when
something killed a root process of ours. The helper's supervisor already restarts it whole
(the worker that started it stops with it, as it does when the helper dies; systemd's and
compose's restart), and the janitor releases what the operations of the old one held.

Not multiprocessing's forkserver: its server is a fresh interpreter with the preloaded modules,
but a request goes through Process objects, pickled arguments, a sentinel pipe and the resource
tracker; the capability drop, the parent-death signal, the reply socket to the server thread and
the kill on timeout would still be ours to add on top. This module is the whole mechanism.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
import traceback
from typing import NoReturn

from pydantic import ValidationError

from domain.core.errors import ImgprepError
from domain.core.runner import CommandError
from helper import capabilities, operations
from helper.logs import configure_logging
from helper.operations import Workers
from helper.protocol import REQUEST, ErrorReply, Reply, Request

EXIT_ZYGOTE_EXITED = 3  # the helper's exit status when its zygote died


class ZygoteExited(RuntimeError):
    """The helper's zygote is gone: the helper stops and its supervisor starts it again."""


class Zygote:
    """The helper's handle on its zygote: `run` a request in a child of it."""

    def __init__(self, pid: int, control: socket.socket, limit: float) -> None:
        self.pid = pid
        self._control = control
        self.limit = limit
        self.exit_status: int | None = None

    @classmethod
    def start(cls, workers: Workers | None, timeout: float, limit: float | None = None) -> Zygote:
        """Fork the zygote. Call it before this process starts any thread.

        `timeout`: the operations' own limit on each tool they run; `limit`: how long the server
        waits for a reply before it kills the child (a little longer than `timeout`).
        `workers`: the workers' user (the owner of FUSE exports, the FUSE daemons' user)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        helper = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the zygote
            status = 1
            try:
                ours.close()
                _serve(theirs, helper, timeout, workers)
                status = 0
            except BaseException:  # it must never return into the helper's code
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(status)
        theirs.close()
        return cls(pid, ours, timeout + 30 if limit is None else limit)

    def run(self, request: Request) -> Reply:
        """Run `request` in a new child of the zygote and return its reply."""
        deadline = time.monotonic() + self.limit
        mine, theirs = socket.socketpair()
        with mine:
            try:
                socket.send_fds(self._control, [request.op.encode()], [theirs.fileno()])
            except OSError as error:
                return _error(f"{request.op} did not start: the helper's zygote is gone ({error})")
            finally:
                theirs.close()
            pidfd = -1
            try:
                _time_left(mine, deadline)
                _, fds, _, _ = socket.recv_fds(mine, 1, 1)
                if not fds:
                    return _error(f"{request.op} failed in the helper: its process did not start")
                pidfd = fds[0]
                _time_left(mine, deadline)
                mine.sendall(request.model_dump_json().encode())
                mine.shutdown(socket.SHUT_WR)
                raw = _read_all(mine, deadline)
            except TimeoutError:
                if pidfd >= 0:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                return _error(
                    f"{request.op} did not finish within the helper's limit ({self.limit:g} s): "
                    "its process was killed"
                )
            except OSError as error:
                return _error(f"{request.op} failed in the helper: {error}")
            finally:
                if pidfd >= 0:
                    os.close(pidfd)
        try:
            return Reply.model_validate_json(raw)
        except ValidationError:
            return _error(
                f"{request.op} failed in the helper: its process ended without a reply "
                "(the helper's log has its traceback)"
            )

    def check(self) -> None:
        """Raise ZygoteExited if the zygote has exited (and reap it)."""
        if self.exit_status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == 0:
                return
            self.exit_status = status
        raise ZygoteExited(
            f"the helper's zygote {self.pid} exited ({_describe_status(self.exit_status)})"
        )

    def close(self) -> None:
        """Stop the zygote (its running children get SIGKILL with it) and reap it."""
        self._control.close()
        if self.exit_status is None:
            with contextlib.suppress(ChildProcessError):
                self.exit_status = os.waitpid(self.pid, 0)[1]


def _serve(control: socket.socket, helper: int, timeout: float, workers: Workers | None) -> None:
    """The zygote's loop: a child per message, until the helper closes its end."""
    capabilities.die_with_parent(signal.SIGKILL)
    if os.getppid() != helper:  # the helper died before the line above
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    os.chdir("/")  # as the children always ran: no directory of the caller's kept busy
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # what the children run reads nothing of the helper's stdin
    os.close(null)
    zygote = os.getpid()
    while True:
        message, fds, _, _ = socket.recv_fds(control, 64, 1)
        if not message:
            return  # the helper closed the control socket: it is stopping
        if not fds:
            continue
        try:
            pid = os.fork()
        except OSError:
            traceback.print_exc()  # the server thread sees the end close: "did not start"
            pid = -1
        if pid == 0:
            _child(
                message.decode(),
                fds[0],
                control=control,
                zygote=zygote,
                timeout=timeout,
                workers=workers,
            )
        os.close(fds[0])


def _child(
    op: str,
    fd: int,
    *,
    control: socket.socket,
    zygote: int,
    timeout: float,
    workers: Workers | None,
) -> NoReturn:
    """Run one operation in this (forked) process; never returns into the zygote's loop."""
    status = 1
    try:
        capabilities.die_with_parent(signal.SIGKILL)
        if os.getppid() != zygote:  # the zygote died before the line above
            os._exit(1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # its tools are waited for
        control.close()
        with socket.socket(fileno=fd) as connection:
            pidfd = os.pidfd_open(os.getpid())
            socket.send_fds(connection, [b"p"], [pidfd])
            os.close(pidfd)
            capabilities.limit_to(operations.CAPABILITIES[op])
            configure_logging(logging.WARNING)  # the server logs the run
            raw = _read_all(connection, None)
            reply = answer(op, raw, timeout, workers)
            connection.sendall(reply.model_dump_json().encode())
        status = 0
    except BaseException:  # the traceback goes to the helper's log
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(status)


def answer(op: str, raw: bytes, timeout: float, workers: Workers | None) -> Reply:
    """The reply to the request `raw` (of `op`), with the capabilities this process holds."""
    request = REQUEST.validate_json(raw)
    if request.op != op:
        raise ValueError(f"the request is {request.op}, not {op}")
    try:
        reply = operations.run(request, timeout, workers)
    except CommandError as error:
        reply = Reply(ok=False, error=ErrorReply(error_class="CommandError", message=str(error)))
    except ImgprepError as error:
        reply = Reply(
            ok=False, error=ErrorReply(error_class=type(error).__name__, message=str(error))
        )
    except OSError as error:
        reply = _error(f"{op} failed: {error}")
    held = capabilities.sets()
    return reply.model_copy(
        update={
            "capabilities": {
                "effective": capabilities.describe(held["CapEff"]),
                "bounding": capabilities.describe(held["CapBnd"]),
            }
        }
    )


def _read_all(connection: socket.socket, deadline: float | None) -> bytes:
    chunks: list[bytes] = []
    while True:
        if deadline is not None:
            _time_left(connection, deadline)
        chunk = connection.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _time_left(connection: socket.socket, deadline: float) -> None:
    """Let the next call on `connection` wait until `deadline` at most (TimeoutError past it)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    connection.settimeout(left)


def _error(message: str) -> Reply:
    return Reply(ok=False, error=ErrorReply(error_class="DeviceError", message=message))


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"status {os.waitstatus_to_exitcode(status)}"
