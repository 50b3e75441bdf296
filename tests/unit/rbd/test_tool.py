"""How failures of the Ceph tools become the project's errors: their exit codes and messages, as
measured against a real cluster (tests/integration/test_rbd_faults.py runs them for real)."""

from __future__ import annotations

import pytest

from domain.core.errors import CephConfigInvalid, CephUnavailable, CommandFailed, RbdImageBusy
from domain.core.runner import CommandError, CommandResult
from domain.rbd.tool import RbdExists, RbdNotFound, failure

CASES = [
    # the ceph CLI (python) with no monitor answering: exit 1, errno in brackets
    (1, "[errno 110] RADOS timed out (error connecting to the cluster)", CephUnavailable),
    # rbd with no monitor answering
    (110, "rbd: couldn't connect to the cluster!\nrbd: listing images failed: (110) Connection "
     "timed out", CephUnavailable),
    (2, "rbd: error opening pool 'nopool': (2) No such file or directory", CephConfigInvalid),
    (2, "auth: unable to find a keyring on /nonexist: (2) No such file or directory\n"
     "AuthRegistry no keyring found at /nonexist, disabling cephx\nrbd: couldn't connect to "
     "the cluster!", CephConfigInvalid),
    (13, "monclient(hunting): handle_auth_bad_method server allowed_methods [2] but i only "
     "support [2]\nrbd: couldn't connect to the cluster!\nrbd: listing images failed: (13) "
     "Permission denied", CephConfigInvalid),
    (1, "global_init: unable to open config file from search list /nonexist.conf",
     CephConfigInvalid),
    (2, "rbd: error opening image nothing: (2) No such file or directory", RbdNotFound),
    (17, "librbd::Operations: rbd image base already exists\nrbd: rename error: (17) File "
     "exists", RbdExists),
    (16, "rbd: error: image still has watchers", RbdImageBusy),
    (22, "rbd: shrinking an image is only allowed with the --allow-shrink flag", CommandFailed),
]  # fmt: skip


@pytest.mark.parametrize(("code", "stderr", "expected"), CASES)
def test_each_failure_has_its_class(code: int, stderr: str, expected: type[Exception]) -> None:
    result = CommandResult(("rbd", "ls"), code, "", stderr, 0.1)
    error = failure(CommandError("rbd ls failed", result), "rbd ls vms")
    assert type(error) is expected
    assert str(error).startswith("rbd ls vms: ")
