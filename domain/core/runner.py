"""One runner for every external command: argument lists, timeouts, resource limits, logging.

Domain code receives a `Runner` and calls tool modules (qemu_img, ...) with it, so a test can
pass another runner instead of patching. Commands never go through a shell.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from domain.core.errors import CommandFailed, CommandTimedOut

log = structlog.get_logger(__name__)

# Untrusted images are parsed by these tools: a fixed, predictable locale keeps their messages
# stable for the parsers below, and nothing from the worker's environment steers them.
BASE_ENV = {
    "LC_ALL": "C",
    "LANG": "C",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
}


@dataclass(frozen=True)
class Limits:
    """Resource limits applied with prlimit(1) before the command starts."""

    cpu_seconds: int | None = None
    address_space_bytes: int | None = None

    def prefix(self) -> list[str]:
        args = []
        if self.cpu_seconds is not None:
            args.append(f"--cpu={self.cpu_seconds}")
        if self.address_space_bytes is not None:
            args.append(f"--as={self.address_space_bytes}")
        return ["prlimit", *args, "--"] if args else []

    def environment(self) -> dict[str, str]:
        """What the limited command's environment gains: under an address-space limit, glibc
        may otherwise reserve a 64 MiB malloc arena for each thread the tool starts, so whether
        an image fits would depend on the tool's threads and the host's cores, not the image."""
        return {"MALLOC_ARENA_MAX": "2"} if self.address_space_bytes is not None else {}

    def describe(self) -> str:
        """`30 s CPU, 2048 MiB address space`, for messages."""
        parts = []
        if self.cpu_seconds is not None:
            parts.append(f"{self.cpu_seconds} s CPU")
        if self.address_space_bytes is not None:
            parts.append(f"{self.address_space_bytes // 2**20} MiB address space")
        return ", ".join(parts) or "no limits"


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def killed_by(self) -> str | None:
        """The signal that ended the command, if one did (SIGKILL, SIGXCPU under limits)."""
        if self.returncode < 0:
            return signal.Signals(-self.returncode).name
        return None


class CommandError(CommandFailed):
    """A command exited non-zero; carries the result for callers that map it further."""

    def __init__(self, message: str, result: CommandResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Runner:
    """Runs commands with a timeout and optional limits; raises typed errors."""

    default_timeout: float = 1800.0
    env: Mapping[str, str] = field(default_factory=lambda: dict(BASE_ENV))

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        limits: Limits | None = None,
        check: bool = True,
        stdin: str | None = None,
        pass_fds: Sequence[int] = (),
    ) -> CommandResult:
        """Run `argv`; `pass_fds`: descriptors the command inherits under the same numbers
        (a file opened for it, named `/proc/self/fd/N` on its command line)."""
        command = [*(limits.prefix() if limits else []), *argv]
        started = time.monotonic()
        try:
            completed = subprocess.run(
                command,
                input=stdin,
                capture_output=True,
                encoding="utf-8",
                errors="replace",
                timeout=timeout or self.default_timeout,
                env={**(limits.environment() if limits else {}), **self.env},
                check=False,
                pass_fds=tuple(pass_fds),
            )
        except subprocess.TimeoutExpired:
            log.warning(
                "command_timed_out", argv=list(argv), timeout=timeout or self.default_timeout
            )
            raise CommandTimedOut(
                f"{argv[0]} did not finish within {timeout or self.default_timeout:.0f} s"
            ) from None
        except FileNotFoundError:
            raise CommandFailed(
                f"{argv[0]} is not installed (looked on PATH {self.env.get('PATH', os.defpath)})"
            ) from None
        result = CommandResult(
            argv=tuple(argv),
            returncode=completed.returncode,
            stdout=completed.stdout,
            stderr=completed.stderr,
            seconds=time.monotonic() - started,
        )
        log.debug(
            "command_ran",
            argv=list(argv),
            returncode=result.returncode,
            seconds=round(result.seconds, 4),
        )
        if check and result.returncode != 0:
            raise CommandError(describe_failure(result), result)
        return result

    def stream(
        self,
        argv: Sequence[str],
        *,
        on_line: Callable[[str], None],
        timeout: float | None = None,
        limits: Limits | None = None,
    ) -> CommandResult:
        """Run a command that reports as it goes (qemu-img -p): each line of its standard
        output, split on newlines and carriage returns, is passed to `on_line` as it comes."""
        command = [*(limits.prefix() if limits else []), *argv]
        budget = timeout or self.default_timeout
        started = time.monotonic()
        with subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(self.env),
        ) as process:
            stdout, stderr = process.stdout, process.stderr
            assert stdout is not None and stderr is not None
            errors: list[bytes] = []
            drain = threading.Thread(target=lambda: errors.append(stderr.read()), daemon=True)
            drain.start()
            timer = threading.Timer(budget, process.kill)
            timer.start()
            output: list[str] = []
            try:
                pending = b""
                while chunk := os.read(stdout.fileno(), 4096):
                    pending += chunk
                    *lines, pending = re.split(rb"[\r\n]", pending)
                    for raw in lines:
                        line = raw.decode("utf-8", "replace").strip()
                        if line:
                            output.append(line)
                            on_line(line)
                returncode = process.wait()
            finally:
                timer.cancel()
                if process.poll() is None:
                    process.kill()
                    process.wait()
            drain.join()
        seconds = time.monotonic() - started
        if seconds >= budget and returncode < 0:
            raise CommandTimedOut(f"{argv[0]} did not finish within {budget:.0f} s")
        result = CommandResult(
            argv=tuple(argv),
            returncode=returncode,
            stdout="\n".join(output[-20:]),
            stderr=b"".join(errors).decode("utf-8", "replace"),
            seconds=seconds,
        )
        log.debug("command_ran", argv=list(argv), returncode=returncode, seconds=round(seconds, 4))
        if result.returncode != 0:
            raise CommandError(describe_failure(result), result)
        return result


def describe_failure(result: CommandResult) -> str:
    """A one-line account of a failed command: what ran, how it ended, its last words."""
    how = f"was killed by {result.killed_by}" if result.killed_by else f"exited {result.returncode}"
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "no error output"
    return (
        f"{result.argv[0]} {result.argv[1] if len(result.argv) > 1 else ''} {how}: {last}".replace(
            "  ", " "
        )
    )
