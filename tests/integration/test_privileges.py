"""Privilege separation on real processes: workers run as the unprivileged user `imgprep`
without capabilities, and every privileged operation goes through the helper, which refuses
(and logs) what is not its business and leaves nothing behind when it is killed."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from domain.core.errors import HelperUnavailable, PrivilegeRefused
from domain.core.models import ImageSource, PrepareRequest
from harness.privileges import (
    WORKER_USER,
    HelperProcess,
    open_directory,
    privileged_overrides,
    unprivileged_user,
)
from helper import capabilities
from tests.integration.conftest import Cluster, ClusterFactory, unique
from tests.integration.devices import MOTD, need_devices
from tests.support.guests import MiB, build_guest, read_guest_file
from tests.support.processes import children, running
from tests.support.waiting import wait_for
from worker.cli.demo.image_server import ImageServer
from worker.cli.run import EXIT_HELPER_EXITED
from worker.privileges.helper_client import HelperClient

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _needs_devices() -> None:
    need_devices()


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A directory the workers' user can reach (pytest's tmp_path is root's alone)."""
    with open_directory("privsep") as root:
        yield root


@pytest.fixture
def separated(open_root: Path, cluster_factory: ClusterFactory) -> Cluster:
    """A cluster whose worker starts the helper as root and runs as `imgprep`."""
    unprivileged_user()
    cluster_factory.root = open_root
    made = cluster_factory("separated", privileged_overrides(open_root))
    made.add_worker("sep", concurrency=2)
    return made


def helper_log(cluster: Cluster) -> list[dict[str, object]]:
    """The helper's JSON log lines (it writes to its worker's log)."""
    lines = []
    for worker in cluster.workers:
        for line in worker.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"event": "' in line:
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return lines


def events(cluster: Cluster, name: str) -> list[dict[str, object]]:
    return [line for line in helper_log(cluster) if line.get("event") == name]


def injecting(image_server: ImageServer, backend: str) -> PrepareRequest:
    name = unique("guest") + ".raw"
    build_guest(image_server.root / name, "mbr")
    return PrepareRequest.model_validate(
        {
            "image": ImageSource(url=image_server.url(name), image_id=unique("img")),
            "disk": {"instance_id": unique("vm"), "size_bytes": 64 * MiB, "backend": backend},
            "inject": [MOTD],
        }
    )


def test_pool_processes_run_unprivileged_and_only_the_helper_is_root(separated: Cluster) -> None:
    # Given a worker started as root with privileges.user and privileges.helper_socket
    worker = separated.workers[0]
    expected = pwd.getpwnam(WORKER_USER).pw_uid

    # Then its main process and every pool process run as that user, with no capabilities
    pool = worker.pool_pids()
    assert len(pool) == 2
    for pid in [worker.pid, *pool]:
        assert capabilities.uids(pid) == (expected,) * 4, pid
        sets = capabilities.sets(pid)
        assert sets["CapEff"] == sets["CapPrm"] == sets["CapAmb"] == 0, (pid, sets)
    # and the helper it started is root, serving the socket only to root and that user
    (helper,) = worker.helper_pids()
    assert capabilities.uids(helper) == (0, 0, 0, 0)
    sock = Path(separated.env["IMGPREP_PRIVILEGES__HELPER_SOCKET"])
    assert sock.stat().st_mode & 0o777 == 0o660
    assert sock.stat().st_gid == pwd.getpwnam(WORKER_USER).pw_gid


@pytest.mark.parametrize("backend", ["raw", "qcow2"])
def test_injection_goes_through_the_helper(
    separated: Cluster, image_server: ImageServer, backend: str
) -> None:
    # Given an unprivileged worker and its helper
    request = injecting(image_server, backend)

    # When a disk is prepared with a file to inject
    prepared = separated.client.wait_prepared(separated.client.prepare_disk(request), timeout=180)

    # Then the file is in the guest, owned by root, with its mode
    found = read_guest_file(Path(prepared.disk.path), backend, 1 * MiB, MOTD.path)
    assert found is not None and (found.content, found.mode, found.uid) == (
        MOTD.data(),
        MOTD.mode,
        0,
    )
    # and the mount, the writes and the unmount were the helper's, each with its capabilities
    ran = {str(line["op"]): line for line in events(separated, "operation_run") if line["ok"]}
    assert {"mount_fuse2fs", "write_files", "unmount"} <= set(ran)
    assert ran["write_files"]["capabilities"] == ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER"]
    # (fuse2fs itself runs as the workers' user: the child only mounts, and drops it to them)
    assert ran["mount_fuse2fs"]["capabilities"] == ["CAP_SETGID", "CAP_SETUID", "CAP_SYS_ADMIN"]
    # (the bounding set too: what the forked child executes cannot regain the rest)
    assert all(line["bounding"] == line["capabilities"] for line in ran.values())
    if backend == "qcow2":
        assert "start_storage_daemon" in ran and "stop_daemons" in ran
    # and the instance disk belongs to the workers' user
    assert Path(prepared.disk.path).stat().st_uid == pwd.getpwnam(WORKER_USER).pw_uid
    # and the work area (mount point, export, pid file) was the helper's, in root's own tree
    assert {"make_work_area", "remove_work_area"} <= set(ran)
    devices = separated.settings.devices_dir
    assert devices.is_relative_to(separated.settings.privileges.helper_state_dir)
    assert (devices.stat().st_uid, devices.stat().st_mode & 0o7777) == (0, 0o755)
    assert not (separated.settings.state_dir / "devices" / prepared.disk.instance_id).exists()
    separated.assert_clean()


def test_the_helper_refuses_and_logs_what_is_not_its_business(
    separated: Cluster, open_root: Path
) -> None:
    client = HelperClient(Path(separated.env["IMGPREP_PRIVILEGES__HELPER_SOCKET"]))
    outside = open_root / "elsewhere"
    outside.mkdir()

    # When a caller asks it to unmount, mount onto or write into a path outside its roots
    with pytest.raises(PrivilegeRefused, match="outside"):
        client.unmount(Path("/proc"))
    with pytest.raises(PrivilegeRefused, match="outside"):
        client.mount_fuse2fs(outside / "disk", outside, offset=0)
    with pytest.raises(PrivilegeRefused):
        client.write_files(outside, [MOTD], disk="vm/disk")
    # or to detach a loop device it did not attach (one over a file in the instances dir)
    disk = separated.settings.instances_dir / "stranger"
    disk.write_bytes(b"\0" * MiB)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(disk)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        with pytest.raises(PrivilegeRefused, match="not a loop device this helper attached"):
            client.detach_loop(device)
        assert Path(f"/sys/block/{Path(device).name}/loop/backing_file").exists()
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)
        disk.unlink()
    # or to run an operation it does not know
    with socket.socket(socket.AF_UNIX) as connection:
        connection.connect(str(client.socket_path))
        connection.sendall(b'{"op": "run_command", "argv": ["sh"]}\n')
        connection.shutdown(socket.SHUT_WR)
        reply = json.loads(connection.recv(65536))
    assert reply["ok"] is False and reply["error"]["error_class"] == "PrivilegeRefused"

    # Then each refusal is logged with the operation, the reason and the caller
    refused = events(separated, "request_refused")
    reasons = {(str(line["op"]), str(line["reason"])) for line in refused}
    devices = separated.settings.devices_dir.resolve()
    assert ("unmount", f"/proc is outside the device work areas ({devices})") in reasons
    assert any(op == "detach_loop" and "not a loop device" in reason for op, reason in reasons)
    assert any(op == "run_command" and "unknown operation" in reason for op, reason in reasons)
    assert all(line["caller_uid"] == 0 for line in refused)
    separated.assert_clean()


def test_helper_killed_mid_operation_leaves_nothing_once_restarted(
    separated: Cluster, image_server: ImageServer
) -> None:
    # Given a prepare with injection running on the unprivileged worker
    worker = separated.workers[0]
    (helper,) = worker.helper_pids()
    task = separated.client.prepare_disk(injecting(image_server, "qcow2"))

    # When the helper is SIGKILLed while one of its operations runs (a child of its zygote)
    (zygote,) = children(helper)  # the helper forks it at start; it forks the operations

    def operation_running() -> list[int]:
        return children(zygote)

    operations = wait_for(operation_running, timeout=120, what="an operation of the helper")
    os.kill(helper, signal.SIGKILL)

    # Then the zygote and the operation's process die with it (none outlives the helper)
    wait_for(
        lambda: not any(running(pid) for pid in (zygote, *operations)),
        timeout=60,
        what="the helper's zygote and operation to end",
    )
    # Then its worker, which cannot start a root helper again, says so and stops with a failure
    # status of its own (a shutdown that fails would be 1)
    status = worker.process.wait(timeout=120)
    assert status == EXIT_HELPER_EXITED, worker.log_path.read_text()[-3000:]
    assert "privileged_helper_exited" in worker.log_path.read_text()
    separated.workers.remove(worker)
    worker.kill()  # its pool, if anything of it is left
    # and once it is started again (with a new helper), the operation ends, done or failed
    separated.add_worker("sep-again")
    wait_for(task.ready, timeout=180, what="the operation to end")
    # and the janitor has released everything the killed operation held
    wait_for(
        lambda: not separated.redis.keys("imgprep:devices:*"),
        timeout=120,
        what="the janitor to release the devices",
    )
    separated.assert_clean()


def test_a_worker_without_its_helper_says_so_and_fails_device_steps_as_transient(
    open_root: Path, cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given a worker told to use a helper that is not running
    cluster_factory.root = open_root
    overrides = {
        "IMGPREP_PRIVILEGES__HELPER_SOCKET": str(open_root / "nobody.sock"),
        "IMGPREP_PRIVILEGES__START_HELPER": "false",
    }
    lonely = cluster_factory("lonely", overrides)
    worker = lonely.add_worker("lonely")

    # Then it said so when it started
    assert "privileged_helper_unreachable" in worker.log_path.read_text()
    # and a prepare with injection fails with the transient HelperUnavailable, retries spent
    task = lonely.client.prepare_disk(injecting(image_server, "raw"))
    with pytest.raises(HelperUnavailable, match="did not answer"):
        lonely.client.wait_prepared(task, timeout=180)
    lonely.assert_clean()


def test_a_standalone_helper_refuses_callers_it_does_not_serve(open_root: Path) -> None:
    # Given a helper run on its own, serving only root and `imgprep`
    unprivileged_user()
    with HelperProcess.start(open_root) as helper:
        # When a process of another user reaches its socket anyway (0660: it cannot connect)
        probe = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n print('denied')\n"
        )
        done = subprocess.run(
            ["python3", "-c", probe, str(helper.socket_path)],
            user="nobody",
            capture_output=True,
            text=True,
            check=True,
        )
        # Then the socket's mode keeps it out
        assert done.stdout.strip() == "denied"
