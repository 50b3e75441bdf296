"""A throwaway one-node Ceph cluster of our own, for the tests, the benchmarks, the fault
campaign and the demo: a monitor and one OSD as plain processes (Debian 12's ceph-mon and
ceph-osd, 16.2), their files in one directory, bound to 127.0.0.1, ended by the pids that
started them (the OSD before the monitor).

Fast on purpose (measured here: the monitor answers in about 1 s, two initialised pools in
about 2 s, about 225 MiB): a `memstore` OSD (objects in memory; gone when the OSD stops) unless
`persistent` (bluestore on a file, for the tests that kill the OSD and start it again), pools of
one replica, and the monitor's paxos intervals shortened. The monitor stops itself when the
disk is less free than `mon data avail crit`: 0 here, so a full test machine does not take
the cluster down. No ceph-mgr: nothing imgprep does needs one.

With `cephx` the cluster authenticates: an admin key for the harness, and `client.<user>` with
the capabilities an operator gives Nova's user (`profile rbd` on the monitor and the OSDs); the
client's ceph.conf and keyring are readable by the workers' user, the daemons' files are not.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from worker.cli.demo.ports import free_port

DAEMON_BINARIES = ("ceph-mon", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rbd")


@dataclass
class CephCluster:
    """A one-node Ceph cluster we started: its directory, its monitor port, its daemons."""

    directory: Path
    cephx: bool = False
    persistent: bool = False  # bluestore on a file: the OSD can be killed and started again
    user: str = "imgprep"
    watch_timeout: int = 5  # seconds (Ceph's default: 30)
    fsid: str = field(default_factory=lambda: str(uuid.uuid4()))
    port: int = 0
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # --- what clients use ----------------------------------------------------------------------

    @property
    def conf(self) -> Path:
        """The clients' ceph.conf (the monitor's address, authentication, no daemon files)."""
        return self.directory / "client" / "ceph.conf"

    @property
    def keyring(self) -> Path | None:
        """The keyring of client.<user> (None without cephx)."""
        return (
            self.directory / "client" / f"ceph.client.{self.user}.keyring" if self.cephx else None
        )

    def env(self, *, pool: str = "vms", images_pool: str = "images") -> dict[str, str]:
        """The settings a worker needs to use this cluster with these pools."""
        return {
            "IMGPREP_RBD__CONF": str(self.conf),
            "IMGPREP_RBD__USER": self.user if self.cephx else "",
            "IMGPREP_RBD__KEYRING": str(self.keyring or ""),
            "IMGPREP_RBD__POOL": pool,
            "IMGPREP_RBD__IMAGES_POOL": images_pool,
        }

    # --- the harness's own commands (as the admin) -------------------------------------------

    @property
    def _admin_conf(self) -> Path:
        return self.directory / "ceph.conf"

    def admin_args(self) -> list[str]:
        args = ["--conf", str(self._admin_conf)]
        if self.cephx:
            args += ["--name", "client.admin", "--keyring", str(self.directory / "admin.keyring")]
        return args

    def ceph(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        """`ceph ARGS` as the admin; its standard output."""
        return self._run(["ceph", *self.admin_args(), *args], timeout=timeout, check=check)

    def rbd(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        """`rbd ARGS` as the admin; its standard output."""
        return self._run(["rbd", *self.admin_args(), *args], timeout=timeout, check=check)

    def rbd_json(self, *args: str) -> object:
        return json.loads(self.rbd(*args, "--format", "json") or "null")

    def images(self, pool: str) -> list[str]:
        """Every image in `pool` (its names, sorted)."""
        listed = self.rbd_json("ls", "--pool", pool)
        return sorted(str(name) for name in listed) if isinstance(listed, list) else []

    def snapshots(self, pool: str, image: str) -> list[dict[str, object]]:
        listed = self.rbd_json("snap", "ls", f"{pool}/{image}")
        return list(listed) if isinstance(listed, list) else []

    def create_pool(self, name: str) -> None:
        """A replicated pool of one replica, initialised for RBD."""
        self.ceph("osd", "pool", "create", name, "8")
        self.rbd("pool", "init", name)

    def delete_pool(self, name: str) -> None:
        self.ceph("osd", "pool", "rm", name, name, "--yes-i-really-really-mean-it")

    @staticmethod
    def _run(argv: Sequence[str], *, timeout: float, check: bool) -> str:
        """The command's standard output; with `check`, a failure (or no answer within
        `timeout`) is a RuntimeError, without it an empty output."""
        try:
            done = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            if check:
                raise RuntimeError(
                    f"{' '.join(argv[:3])} ... did not answer in {timeout} s"
                ) from None
            return ""
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} ... exited {done.returncode}: {done.stderr}")
        return done.stdout

    # --- starting and stopping ---------------------------------------------------------------

    def start(self, pools: Sequence[str] = ("vms", "images"), timeout: float = 60.0) -> CephCluster:
        """Make the cluster's files, start the monitor and the OSD, create `pools`; a cluster
        that does not come up is stopped again."""
        missing = [tool for tool in DAEMON_BINARIES if shutil.which(tool) is None]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not installed: run scripts/install.sh")
        self.port = self.port or free_port()
        try:
            self._make_files()
            self._start_monitor(timeout)
            self._make_osd()
            self.start_osd(timeout)
            for pool in pools:
                self.create_pool(pool)
            if self.cephx:
                self._make_client()
        except BaseException:
            self.stop()
            raise
        return self

    def _make_files(self) -> None:
        for sub in ("run", "log", "mon.a", "osd.0", "client"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        auth = "cephx" if self.cephx else "none"
        mon_host = f"v2:127.0.0.1:{self.port}"
        common = [
            "[global]",
            f"fsid = {self.fsid}",
            f"mon host = {mon_host}",
            f"auth cluster required = {auth}",
            f"auth service required = {auth}",
            f"auth client required = {auth}",
            "ms bind ipv4 = true",
            "ms bind ipv6 = false",
        ]
        store = (
            [
                "osd objectstore = bluestore",
                "bluestore block create = true",
                "bluestore block size = 2147483648",
                "bluestore block db create = false",
                "bluestore block wal create = false",
                "bluestore fsck on mount = false",
                "bluestore cache size = 67108864",
            ]
            if self.persistent
            else ["osd objectstore = memstore", "memstore device bytes = 2147483648"]
        )
        d = self.directory
        daemon = [
            *common,
            "public addr = 127.0.0.1",
            "osd pool default size = 1",
            "osd pool default min size = 1",
            "osd pool default pg autoscale mode = off",
            "mon allow pool size one = true",
            "mon allow pool delete = true",
            "mon warn on pool no redundancy = false",
            "osd crush chooseleaf type = 0",
            "paxos propose interval = 0.05",
            "paxos min wait = 0.01",
            "mon data avail crit = 0",
            "mon data avail warn = 1",
            "osd memory target = 268435456",
            # a client killed with an image open keeps its watch this long, and removing the
            # image waits for it (30 s by default): the tests kill importers on purpose
            f"osd client watch timeout = {self.watch_timeout}",
            *store,
            f"run dir = {d / 'run'}",
            f"admin socket = {d / 'run'}/$name.asok",
            f"log file = {d / 'log'}/$name.log",
            f"pid file = {d / 'run'}/$name.pid",
            "[mon.a]",
            f"mon data = {d / 'mon.a'}",
            "[osd.0]",
            f"osd data = {d / 'osd.0'}",
            "[client]",
            "log file = /dev/null",
            "admin socket =",
        ]
        self._admin_conf.write_text("\n".join(daemon) + "\n")
        # The clients' file: nothing in it names the daemons' files.
        self.conf.write_text(
            "\n".join([*common, "[client]", "log file = /dev/null", "admin socket ="]) + "\n"
        )
        self.conf.chmod(0o644)
        (d / "client").chmod(0o755)
        if self.cephx:
            self._tool(
                [
                    "ceph-authtool",
                    "--create-keyring",
                    str(d / "mon.keyring"),
                    "--gen-key",
                    "-n",
                    "mon.",
                    "--cap",
                    "mon",
                    "allow *",
                ]
            )
            self._tool(
                [
                    "ceph-authtool",
                    "--create-keyring",
                    str(d / "admin.keyring"),
                    "--gen-key",
                    "-n",
                    "client.admin",
                    "--cap",
                    "mon",
                    "allow *",
                    "--cap",
                    "osd",
                    "allow *",
                    "--cap",
                    "mgr",
                    "allow *",
                ]
            )
            self._tool(
                [
                    "ceph-authtool",
                    str(d / "mon.keyring"),
                    "--import-keyring",
                    str(d / "admin.keyring"),
                ]
            )
        self._tool(
            [
                "monmaptool",
                "--create",
                "--add",
                "a",
                mon_host,
                "--fsid",
                self.fsid,
                str(d / "monmap"),
            ]
        )
        keyring = ["--keyring", str(d / "mon.keyring")] if self.cephx else []
        self._tool(
            [
                "ceph-mon",
                "--conf",
                str(self._admin_conf),
                "--mkfs",
                "-i",
                "a",
                "--monmap",
                str(d / "monmap"),
                *keyring,
            ]
        )

    def _start_monitor(self, timeout: float) -> None:
        self._spawn("mon.a", ["ceph-mon", "--conf", str(self._admin_conf), "-i", "a", "-f"])
        self._wait(
            lambda: self.ceph("mon", "stat", timeout=10, check=False) != "", timeout, "the monitor"
        )

    def _make_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        self.ceph("osd", "new", osd_uuid)
        if self.cephx:
            keyring = str(self.directory / "osd.0" / "keyring")
            self._tool(["ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "osd.0"])
            self.ceph(
                "auth", "add", "osd.0", "osd", "allow *", "mon", "allow profile osd", "-i", keyring
            )
        self._tool(
            [
                "ceph-osd",
                "--conf",
                str(self._admin_conf),
                "-i",
                "0",
                "--mkfs",
                "--osd-uuid",
                osd_uuid,
            ]
        )

    def start_osd(self, timeout: float = 60.0) -> None:
        """Start the OSD (again) and wait until the monitor counts it up."""
        self._spawn("osd.0", ["ceph-osd", "--conf", str(self._admin_conf), "-i", "0", "-f"])
        self._wait(self._osd_up, timeout, "the OSD")

    def _osd_up(self) -> bool:
        out = self.ceph("osd", "dump", "--format", "json", timeout=10, check=False)
        with contextlib.suppress(ValueError):
            return any(osd.get("up") == 1 for osd in json.loads(out).get("osds", []))
        return False

    def _make_client(self) -> None:
        assert self.keyring is not None
        self.ceph(
            "auth",
            "get-or-create",
            f"client.{self.user}",
            "mon",
            "profile rbd",
            "osd",
            "profile rbd",
            "-o",
            str(self.keyring),
        )
        self.keyring.chmod(0o644)

    def kill_osd(self) -> None:
        """SIGKILL the OSD, as a storage host that dies (its memstore objects die with it)."""
        self._end("osd.0", kill=True)

    def stop_osd(self) -> None:
        self._end("osd.0")

    def kill_monitor(self) -> None:
        self._end("mon.a", kill=True)

    def start_monitor(self, timeout: float = 60.0) -> None:
        self._start_monitor(timeout)

    def stop(self) -> None:
        """The OSD first (it reports to the monitor as it goes), then the monitor."""
        self._end("osd.0")
        self._end("mon.a")

    @property
    def running(self) -> bool:
        return any(process.poll() is None for process in self.processes.values())

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.directory / "log" / f"{name}.out").open("ab")
        with log:
            self.processes[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def _end(self, name: str, *, kill: bool = False) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def _wait(self, ready: object, timeout: float, what: str) -> None:
        assert callable(ready)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            for name, process in self.processes.items():
                if process.poll() is not None:
                    tail = (self.directory / "log" / f"{name}.out").read_text(errors="replace")
                    raise RuntimeError(f"{name} exited: {tail[-800:]}")
            time.sleep(0.1)
        raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")

    def _tool(self, argv: list[str]) -> None:
        self._run(argv, timeout=60, check=True)

    def __enter__(self) -> CephCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def ceph_cluster(directory: Path, **options: object) -> Iterator[CephCluster]:
    """A started cluster, stopped (by its pids) when the block ends."""
    cluster = CephCluster(directory, **options)  # type: ignore[arg-type]
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
