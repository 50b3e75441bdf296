"""The helper's server: a Unix socket, one request per connection, each run in its own child.

The socket is mode 0660, owned by root and the group of the workers' user; on top of that each
connection's peer is read with SO_PEERCRED, and only root and the workers' uid are served. A
request is parsed strictly (helper.protocol), checked against the roots (helper.checks), run in
a child process that holds only its operation's capabilities (forked by helper.zygote), and
answered.
Every refusal is logged as `request_refused` with the operation, the reason and the caller.

Connections are bounded before anything is parsed: at most MAX_CONNECTIONS are served at once
(beyond, a connection is answered `HelperUnavailable`, transient, and closed without a thread
of its own), a caller whose uid is not served is answered before its request is read, and a
request must arrive whole within REQUEST_SECONDS (an idle or trickling caller is answered
PrivilegeRefused and closed). So the workers' user, the only other uid the socket lets in,
cannot hold the root process's threads or memory with idle connections.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import socketserver
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from domain.core.errors import HelperUnavailable, PrivilegeRefused
from helper.checks import Refused, Roots
from helper.loop_ledger import LoopLedger
from helper.operations import Checked, Workers, check
from helper.protocol import MAX_REQUEST_BYTES, OPERATIONS, REQUEST, ErrorReply, Reply, Request
from helper.zygote import Zygote

log = structlog.get_logger(__name__)

OPERATION_TIMEOUT = 300.0  # the longest any one tool call may take (mounts wait up to 120 s)
OPERATION_LIMIT = OPERATION_TIMEOUT + 30  # then the operation's process is killed
MAX_CONNECTIONS = 64  # served at once (a worker holds one per step it runs on the host)
REQUEST_SECONDS = 10.0  # for the whole request to arrive (a worker sends it at once)
BUSY_LOG_SECONDS = 10.0  # connections turned away are logged at most this often


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class HelperConfig:
    socket_path: Path
    roots: Roots
    state_dir: Path  # the helper's own (root, 0700): its loop ledger
    allowed_uids: frozenset[int]
    socket_gid: int
    worker: tuple[int, int] | None = None  # the workers' uid and gid: owner of FUSE exports
    handoff: Path | None = None  # fuse_as_user's fusermount script, for the FUSE daemons

    @property
    def workers(self) -> Workers | None:
        """The workers' user as the operations see it (None: a helper serving root only)."""
        if self.worker is None or self.handoff is None:
            return None
        return Workers(*self.worker, handoff=self.handoff)


class Helper:
    """Checks and runs requests; the transport is HelperServer."""

    def __init__(self, config: HelperConfig, zygote: Zygote | None = None) -> None:
        """`zygote`: where operations run (None: a helper that only checks, in unit tests)."""
        self.config = config
        self.loops = LoopLedger(config.state_dir)
        self.zygote = zygote

    def refuse_peer(self, peer: Peer) -> Reply | None:
        """The refusal of a caller whose uid is not served (before its request is read)."""
        if peer.uid not in self.config.allowed_uids:
            return self._refuse("?", f"uid {peer.uid} is not served by this helper", peer)
        return None

    def handle(self, raw: bytes, peer: Peer) -> Reply:
        refused = self.refuse_peer(peer)
        if refused is not None:
            return refused
        parsed = self._parse(raw, peer)
        if isinstance(parsed, Reply):
            return parsed
        return self._run_checked(parsed, peer)

    def _parse(self, raw: bytes, peer: Peer) -> Checked | Reply:
        """The request, parsed strictly and checked against the roots; or its refusal."""
        op = "?"
        try:
            document = json.loads(raw)
            if isinstance(document, dict):
                op = str(document.get("op", "?"))
            if op not in OPERATIONS:
                return self._refuse(op, f"unknown operation {op!r}", peer)
            request = REQUEST.validate_json(raw)
            return check(request, self.config.roots, self.loops)
        except ValidationError as error:
            return self._refuse(op, f"malformed request: {_describe(error)}", peer)
        except RecursionError:  # JSON nested deeper than the parser goes
            return self._refuse(op, "malformed request: nested too deeply", peer)
        except ValueError as error:
            return self._refuse(op, f"malformed request: {error}", peer)
        except Refused as error:
            return self._refuse(op, str(error), peer)

    def _run_checked(self, checked: Checked, peer: Peer) -> Reply:
        request = checked.request
        if request.op == "ping":
            roots = self.config.roots
            return Reply(
                ok=True,
                result={
                    "cache_dir": str(roots.cache_dir),
                    "instances_dir": str(roots.instances_dir),
                    "state_dir": str(roots.state_dir),
                    "devices_dir": str(roots.devices_dir),
                },
            )
        if request.op == "attach_loop" and checked.loop:
            self.loops.intend(*checked.loop)
        reply = self._run_child(request, peer)
        if checked.loop and request.op == "attach_loop":
            if reply.ok and isinstance(reply.result, str):
                self.loops.attached(*checked.loop, reply.result)
            else:
                self.loops.forget(*checked.loop)
        if checked.loop and request.op == "detach_loop" and reply.ok:
            self.loops.forget(*checked.loop)
        return reply

    def _run_child(self, request: Request, peer: Peer) -> Reply:
        started = time.monotonic()
        if self.zygote is None:
            reply = _error("DeviceError", f"{request.op}: this helper runs no operations")
        else:
            reply = self.zygote.run(request)
        log.info(
            "operation_run",
            op=request.op,
            ok=reply.ok,
            error_class=reply.error.error_class if reply.error else None,
            capabilities=(reply.capabilities or {}).get("effective"),
            bounding=(reply.capabilities or {}).get("bounding"),
            caller_uid=peer.uid,
            caller_pid=peer.pid,
            seconds=round(time.monotonic() - started, 4),
        )
        if reply.error is not None and reply.error.error_class == PrivilegeRefused.__name__:
            # refused by the operation itself, on what it found (a link where a disk was, a
            # qcow2 header that names another file): logged like the server's own refusals
            log.warning(
                "request_refused",
                op=request.op,
                reason=reply.error.message,
                caller_uid=peer.uid,
                caller_pid=peer.pid,
            )
        return reply

    def _refuse(self, op: str, reason: str, peer: Peer) -> Reply:
        log.warning(
            "request_refused", op=op, reason=reason, caller_uid=peer.uid, caller_pid=peer.pid
        )
        return _error(PrivilegeRefused.__name__, f"the privileged helper refused {op}: {reason}")


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"][1:]) or "request"
    return f"{where}: {first['msg']}"


def _error(error_class: str, message: str) -> Reply:
    return Reply(ok=False, error=ErrorReply(error_class=error_class, message=message))


def peer_of(connection: socket.socket) -> Peer:
    raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def read_request(connection: socket.socket, seconds: float = REQUEST_SECONDS) -> bytes:
    """One request: everything up to the first newline (or the end), at most MAX_REQUEST_BYTES,
    arrived within `seconds` (ValueError otherwise)."""
    deadline = time.monotonic() + seconds
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ValueError(f"no complete request within {seconds:g} s")
        connection.settimeout(left)
        try:
            chunk = connection.recv(65536)
        except TimeoutError:
            raise ValueError(f"no complete request within {seconds:g} s") from None
        if not chunk:
            break
        newline = chunk.find(b"\n")
        if newline >= 0:
            chunks.append(chunk[:newline])
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise ValueError(f"request larger than {MAX_REQUEST_BYTES} bytes")
    return b"".join(chunks)


class _Handler(socketserver.BaseRequestHandler):
    server: HelperServer

    def handle(self) -> None:
        connection: socket.socket = self.request
        peer = peer_of(connection)
        reply = self.server.helper.refuse_peer(peer)
        if reply is None:
            try:
                raw = read_request(connection)
            except (OSError, ValueError) as error:
                reply = self.server.helper._refuse("?", str(error), peer)
            else:
                reply = self.server.helper.handle(raw, peer)
        _answer(connection, reply)


def _answer(connection: socket.socket, reply: Reply) -> None:
    connection.settimeout(REQUEST_SECONDS)  # a caller that does not read its answer is dropped
    with contextlib.suppress(OSError):  # the caller gave up (its step ended)
        connection.sendall(reply.model_dump_json().encode() + b"\n")


class SocketInUse(OSError):
    """A live helper serves the socket this one was told to serve (EADDRINUSE)."""


def _answers(path: Path) -> bool:
    """Whether a process listens on the Unix socket at `path` (a dead helper's socket refuses
    connections). A listener is asked for a ping, so that it logs no malformed request."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        with contextlib.suppress(OSError):
            probe.sendall(b'{"op": "ping"}\n')
            probe.shutdown(socket.SHUT_WR)
            probe.recv(65536)
        return True


class HelperServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 128  # listen(2) backlog: callers beyond the served ones wait here

    def __init__(self, helper: Helper, max_connections: int = MAX_CONNECTIONS) -> None:
        self.helper = helper
        self.slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        self._turned_away = 0
        self._turned_away_logged = 0.0
        path = helper.config.socket_path
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                if _answers(path):
                    raise SocketInUse(
                        errno.EADDRINUSE,
                        "another helper is already serving this socket; refusing to take it "
                        "over (stop that helper first, or give this one another socket)",
                        str(path),
                    )
                path.unlink()  # a socket a dead helper left; anything else is an error below
        old_umask = os.umask(0o177)
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old_umask)
        os.chown(path, 0, helper.config.socket_gid)
        os.chmod(path, 0o660)

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(FileNotFoundError):
            self.helper.config.socket_path.unlink()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in a thread of its own if a slot is free; else answer it at
        once, from this (the accepting) thread, and close it."""
        if not self.slots.acquire(blocking=False):
            self._turn_away(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _turn_away(self, connection: socket.socket) -> None:
        self._turned_away += 1
        now = time.monotonic()
        if now - self._turned_away_logged >= BUSY_LOG_SECONDS:
            log.warning(
                "connections_turned_away",
                count=self._turned_away,
                serving=self.max_connections,
                reason="as many connections as the helper serves at once are open",
            )
            self._turned_away, self._turned_away_logged = 0, now
        busy = _error(
            HelperUnavailable.__name__,
            f"the privileged helper is serving {self.max_connections} connections; try again",
        )
        connection.setblocking(False)  # never wait on this caller in the accepting thread
        with contextlib.suppress(OSError):
            connection.send(busy.model_dump_json().encode() + b"\n")
        self.shutdown_request(connection)

    def service_actions(self) -> None:
        """Between requests, in serve_forever's (main) thread: stop if the zygote died."""
        if self.helper.zygote is not None:
            self.helper.zygote.check()


def start_zygote(config: HelperConfig) -> Zygote:
    """The helper's zygote (helper.zygote), forked: before the helper starts any thread."""
    if threading.active_count() > 1:
        raise RuntimeError("the helper's zygote must be forked before the helper starts a thread")
    return Zygote.start(config.workers, OPERATION_TIMEOUT, OPERATION_LIMIT)


def serve(config: HelperConfig, zygote: Zygote, **context: Any) -> None:
    """Serve until SIGTERM/SIGINT, or until the zygote dies (ZygoteExited)."""
    server = HelperServer(Helper(config, zygote))
    log.info(
        "helper_started",
        socket=str(config.socket_path),
        uids=sorted(config.allowed_uids),
        state_dir=str(config.roots.state_dir),
        **context,
    )
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        zygote.close()
