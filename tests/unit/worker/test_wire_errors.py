"""Errors keep their wire module name, tasks.errors, although they live in domain.core.errors."""

from __future__ import annotations

from celery import Celery
from celery.backends.redis import RedisBackend

from domain.core import errors
from worker.app.results import ERRORS_WIRE_MODULE, RedactingRedisBackend

URL = "redis://127.0.0.1:1/0"  # never connected to: only (de)serialization is used


def test_a_stored_failure_names_tasks_errors_and_reads_back_as_the_domain_class() -> None:
    # Given imgprep's result backend
    backend = RedactingRedisBackend(app=Celery(set_as_current=False), url=URL)

    # When a domain error is prepared for storage and read back
    stored = backend.prepare_exception(errors.ChecksumMismatch("sha256 differs"))
    rebuilt = backend.exception_to_python(stored)

    # Then the stored record names the wire module, and the error comes back as its class
    assert stored["exc_module"] == ERRORS_WIRE_MODULE == "tasks.errors"
    assert stored["exc_type"] == "ChecksumMismatch"
    assert type(rebuilt) is errors.ChecksumMismatch and str(rebuilt) == "sha256 differs"


def test_a_client_on_celerys_own_backend_rebuilds_the_class_through_the_alias() -> None:
    # Given a plain Celery client that imported the alias module, and a stored failure
    import tasks.errors

    plain = RedisBackend(app=Celery(set_as_current=False), url=URL)
    stored = {"exc_type": "DiskFull", "exc_message": ["no space"], "exc_module": "tasks.errors"}

    # When it reads the failure, it gets imgprep's class
    rebuilt = plain.exception_to_python(stored)
    assert type(rebuilt) is errors.DiskFull is tasks.errors.DiskFull
    assert isinstance(rebuilt, errors.PermanentError)
