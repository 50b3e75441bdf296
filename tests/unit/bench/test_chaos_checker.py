"""The fault campaign's checker (bench.chaos) catches what it claims to: errors no fault explains,
evictions of bases in use, wrong or partial cache entries, temporaries."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bench.chaos.catalogue import SourceImage
from bench.chaos.checker import World, check_error, check_evictions, check_result
from bench.chaos.cluster import Host
from bench.chaos.final_state import check_cache
from bench.chaos.history import History, Op

SIZE = 4096


def image(data: bytes) -> SourceImage:
    digest = hashlib.sha256(data).hexdigest()
    return SourceImage(
        name="img.raw",
        image_id="img-1",
        format="raw",
        rate=None,
        checksum=False,
        guest=False,
        size=len(data),
        sha256=digest,
        virtual_size=len(data),
        cached_sha256=digest,
    )


def world(tmp_path: Path, source: SourceImage) -> World:
    host = Host("h0", tmp_path / "i", tmp_path / "s", tmp_path / "n")
    return World(catalogue={source.name: source}, hosts={"h0": host}, cache_dir=tmp_path)


def op(history: History, kind: str, *, start: float, end: float, **fields: Any) -> Op:
    made = history.add_op(
        Op(
            index=len(history.ops),
            id=f"id-{len(history.ops)}",
            kind=kind,
            task="imgprep.x",
            request=fields.pop("request", {}),
            invoke=start,
            deadline=start + 100,
            **fields,
        )
    )
    made.complete = end
    made.outcome = "ok" if "error_class" not in fields else "error"
    return made


def fault(history: History, kind: str, start: float, end: float) -> None:
    made = history.begin_fault(kind, "target")
    made.start, made.end = start, end


def test_an_error_is_acceptable_only_under_a_fault_that_causes_it() -> None:
    history = History(seed=1)
    fault(history, "redis_restart", 10, 15)
    during: dict[str, Any] = dict(start=9.0, end=20.0, error_module="tasks.errors")
    # a transient error after retries ran out, under the fault that causes it: acceptable
    assert not check_error(
        op(history, "prepare", **during, error_class="CoordinationUnavailable"), history
    )
    # the same error while Redis was up (a lock waiter's socket timeout): a violation
    calm: dict[str, Any] = dict(start=40.0, end=50.0, error_module="tasks.errors")
    assert check_error(
        op(history, "prepare", **calm, error_class="CoordinationUnavailable"), history
    )
    # an untyped error is never acceptable, whatever the faults
    rejected = op(
        history,
        "prepare",
        start=9.0,
        end=20.0,
        error_class="Reject",
        error_module="celery.exceptions",
    )
    assert check_error(rejected, history)


def test_a_request_that_must_fail_must_fail_with_its_own_class() -> None:
    history = History(seed=1)
    expect_permanent = {"expect": ["<PermanentError>"]}
    good = op(history, "unknown_host", start=0, end=1, error_class="InvalidRequest",
              error_module="tasks.errors", context=expect_permanent)  # fmt: skip
    transient = op(history, "unknown_host", start=0, end=1, error_class="LockBusy",
                   error_module="tasks.errors", context=expect_permanent)  # fmt: skip
    assert not check_error(good, history)
    assert check_error(transient, history)


def test_evicting_the_base_of_a_qcow2_disk_in_use_is_a_violation(tmp_path: Path) -> None:
    source = image(b"x" * SIZE)
    history = History(seed=1)
    request = {"disk": {"backend": "qcow2"}}
    op(history, "prepare", start=0, end=1, disk="h0/vm/disk", image=source.name, request=request)
    evicted = {"evicted": [{"key": source.key}]}
    eviction = op(history, "evict", start=2, end=3)
    eviction.result = evicted
    found = check_evictions(history, world(tmp_path, source))
    assert [v.invariant for v in found] == ["no-base-in-use-evicted"]

    # once a delete of the disk was sent, its base may go
    op(history, "delete", start=4, end=5, disk="h0/vm/disk")
    later = op(history, "evict", start=6, end=7)
    later.result = evicted
    assert [v.op for v in check_evictions(history, world(tmp_path, source))] == [eviction.index]


def test_a_partial_entry_a_lone_record_and_a_temporary_are_violations(tmp_path: Path) -> None:
    data = b"y" * SIZE
    source = image(data)
    (tmp_path / source.key).write_bytes(data[: SIZE // 2])  # a partial publish
    entry = {
        "key": source.key,
        "image_id": source.image_id,
        "path": str(tmp_path / source.key),
        "format": "raw",
        "virtual_size": SIZE,
        "source_sha256": source.sha256,
    }
    record = {
        "image": entry,
        "source": "http://x/",
        "source_format": "raw",
        "source_bytes": SIZE,
        "fence": 1,
        "fetched_at": "2024-01-01T00:00:00Z",
    }
    (tmp_path / f"{source.key}.json").write_text(json.dumps(record))
    (tmp_path / f"{source.key}.part").write_bytes(b"")
    (tmp_path / f"{'0' * 40}.json").write_text("{}")

    found = {v.invariant for v in check_cache(world(tmp_path, source))}

    assert found == {"cache-entry", "cache-record", "no-temporary"}


def test_a_delete_that_finds_no_disk_is_explained_only_by_a_fault_that_reruns_steps(
    tmp_path: Path,
) -> None:
    history = History(seed=1)
    places = world(tmp_path, image(b"x" * SIZE))
    deleted = {
        "host": "h0",
        "instance_id": "vm-1",
        "disk_name": "disk",
        "path": str(tmp_path / "i" / "vm-1" / "disk"),
        "existed": False,
        "released_bases": [],
    }

    def delete(start: float, end: float) -> Op:
        made = op(history, "delete", start=start, end=end, result=deleted)
        made.context["state_before"] = "present"
        return made

    fault(history, "kill_worker", 10, 11)
    # a delete of a disk a prepare made, that found nothing while Redis and workers were up
    assert [v.invariant for v in check_result(delete(40, 50), places, history)] == [
        "prepared-disk-exists"
    ]
    # the same under a worker kill: its first run removed the disk, a second run found nothing
    assert not check_result(delete(9, 20), places, history)
