"""Hostile wire input: URLs checked completely, strict JSON types, one type per concept."""

from __future__ import annotations

import json
from typing import Annotated, Any, get_origin

import pytest
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from domain.core.models import (
    CacheEvictionReport,
    DeletedDisk,
    DeleteDiskRequest,
    EvictCacheRequest,
    PreparedDisk,
    PrepareRequest,
    WireModel,
)
from domain.core.redaction import redacted
from domain.core.urls import redact
from domain.formats.snapshot_models import SnapshotRequest


def prepare(url: str = "http://images.example/x.raw", **disk: Any) -> dict[str, Any]:
    return {
        "image": {"url": url, "image_id": "x"},
        "disk": {"instance_id": "vm-1", "size_bytes": 2**30, **disk},
    }


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:99999/x", "Port out of range"),
        ("http://127.0.0.1:0/x", "port"),
        ("http://h:+80/x", "Port could not be cast"),
        ("http://[::1/x", "Invalid IPv6"),
        ("http:///x", "names no host"),
        ("https://?x", "absolute URL"),
        ("http://images .example/x", "whitespace"),
        ("http://h/x\r\nX-Injected: 1", "whitespace or control"),
        ("http://h/x\x00", "control"),
        ("http://h/x\u200b", "control"),
        ("http://h/x#@127.0.0.1/", "fragment"),
        ("http://evil.example\\@127.0.0.1/", "backslash"),
        ("http://a@b@127.0.0.1/x", "more than one '@'"),
        ("http://ex%61mple.com/x", "not a host name"),
        ("http://xn--bcher-kva.example:8080/" + "a" * 4096, "at most 4096"),
        ("ftp://h/x", "scheme 'ftp'"),
        ("gopher://h/x", "scheme 'gopher'"),
        ("file://remote.example/etc/passwd", "file URL"),
        ("image.qcow2", "absolute URL"),
    ],
)
def test_bad_urls_are_invalid_requests(url: str, reason: str) -> None:
    with pytest.raises(ValidationError, match=r"image\.url") as refused:
        PrepareRequest.model_validate(prepare(url))
    assert reason in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://user:pw@images.example:8443/ubuntu.qcow2?X-Amz-Signature=abc&e=1",
        "http://127.0.0.1:8080/x.raw",
        "http://[::1]:8080/x.raw",
        "HTTP://Images.Example/x",
        "http://xn--bcher-kva.example/x",
        "http://glance_api.internal./v2/images/1/file",
        "file:///var/lib/images/x.raw",
    ],
)
def test_good_urls_are_accepted(url: str) -> None:
    assert PrepareRequest.model_validate(prepare(url)).image.url == url


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:99999/x",
        "http://[::1/x?token=s3cret",
        "http://u:s3cret@[zz/x?token=s3cret",
        "::::",
        "",
        "http://u:s3cret@h:99999/p?token=s3cret",
    ],
)
def test_redaction_never_raises_and_never_shows_secrets(url: str) -> None:
    shown = redact(url)
    assert "s3cret" not in shown
    assert "s3cret" not in json.dumps(redacted({"image": {"url": url}}))


def test_redaction_keeps_ipv6_hosts_readable() -> None:
    assert redact("http://u:p@[::1]:8080/x?t=1") == "http://[::1]:8080/x"


@pytest.mark.parametrize(
    ("model", "payload", "field"),
    [
        (PrepareRequest, prepare(size_bytes=True), "disk.size_bytes"),
        (PrepareRequest, prepare(size_bytes="1073741824"), "disk.size_bytes"),
        (PrepareRequest, prepare(size_bytes=1073741824.0), "disk.size_bytes"),
        (PrepareRequest, {**prepare(), "api_version": True}, "api_version"),
        (PrepareRequest, {**prepare(), "partition": True}, "partition"),
        (PrepareRequest, {**prepare(), "inject": [{"path": "/a", "content": 1}]}, "content"),
        (
            PrepareRequest,
            {**prepare(), "inject": [{"path": "/a", "content": "", "mode": True}]},
            "mode",
        ),
        (PrepareRequest, {**prepare(), "host": 7}, "host"),
        (PrepareRequest, {**prepare(), "image": {"url": "http://h/x", "image_id": 7}}, "image_id"),
        (EvictCacheRequest, {"dry_run": "yes"}, "dry_run"),
        (EvictCacheRequest, {"dry_run": 1}, "dry_run"),
        (EvictCacheRequest, {"max_bytes": True}, "max_bytes"),
        (EvictCacheRequest, {"max_bytes": "10"}, "max_bytes"),
        (EvictCacheRequest, {"remove_unused_original_minimum_age_seconds": False}, "remove_unused"),
        (SnapshotRequest, {"instance_id": "vm", "target": "x", "compress": 1}, "compress"),
        (SnapshotRequest, {"instance_id": "vm", "target": "a\x00b"}, "target"),
        (DeleteDiskRequest, {"instance_id": 1}, "instance_id"),
    ],
)
def test_wire_types_are_strict(model: type[BaseModel], payload: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        model.model_validate(payload)


def test_strict_requests_still_parse_from_json() -> None:
    # Given a request as a control plane sends it: JSON arrays, octal strings, floats for seconds
    payload = {
        **prepare(),
        "inject": [{"path": "/etc/motd", "content": "hi", "mode": "0600"}],
        "partition": 1,
    }
    text = json.dumps(payload)
    # Then it parses from the decoded JSON (what a task receives) and from the text alike
    for parsed in (
        PrepareRequest.model_validate(json.loads(text)),
        PrepareRequest.model_validate_json(text),
    ):
        assert parsed.inject[0].mode == 0o600 and parsed.disk.size_bytes == 2**30
        assert PrepareRequest.model_validate(parsed.model_dump(mode="json")) == parsed
    assert (
        EvictCacheRequest.model_validate({"remove_unused_original_minimum_age_seconds": 60}).dry_run
        is False
    )


def test_delete_disk_refuses_the_reserved_names() -> None:
    for name in ("disk.info", "disk.part"):
        with pytest.raises(ValidationError, match="reserved"):
            DeleteDiskRequest.model_validate({"instance_id": "vm", "disk_name": name})


def _field_schema(model: type[BaseModel], path: tuple[str, ...]) -> dict[str, Any]:
    schema = model.model_json_schema()
    node: dict[str, Any] = schema
    for name in path:
        node = node["properties"][name]
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
    kept = {k: v for k, v in node.items() if k not in ("title", "default", "description")}
    if "anyOf" in kept:  # an optional field: the type of its value
        (kept,) = [option for option in kept["anyOf"] if option != {"type": "null"}]
    return kept


def test_every_wire_model_names_the_same_concept_with_the_same_type() -> None:
    # instance ids, disk names and hosts mean the same in every request and result, so they
    # validate alike
    places: dict[str, list[tuple[type[BaseModel], tuple[str, ...]]]] = {
        "instance_id": [
            (PrepareRequest, ("disk", "instance_id")),
            (SnapshotRequest, ("instance_id",)),
            (DeleteDiskRequest, ("instance_id",)),
            (PreparedDisk, ("disk", "instance_id")),
            (DeletedDisk, ("instance_id",)),
        ],
        "disk_name": [
            (PrepareRequest, ("disk", "disk_name")),
            (SnapshotRequest, ("disk_name",)),
            (DeleteDiskRequest, ("disk_name",)),
            (PreparedDisk, ("disk", "disk_name")),
            (DeletedDisk, ("disk_name",)),
        ],
        "host": [
            (PrepareRequest, ("host",)),
            (SnapshotRequest, ("host",)),
            (DeleteDiskRequest, ("host",)),
            (PreparedDisk, ("disk", "host")),
            (DeletedDisk, ("host",)),
            (CacheEvictionReport, ("host",)),
        ],
    }
    for concept, fields in places.items():
        schemas = [_field_schema(model, path) for model, path in fields]
        assert all(schema == schemas[0] for schema in schemas), concept
        assert "pattern" in json.dumps(schemas[0]), concept


def _wire_models() -> list[type[WireModel]]:
    import domain.cache.directory
    import domain.guest.context  # noqa: F401 - their wire models register as subclasses

    found: list[type[WireModel]] = []
    todo = list(WireModel.__subclasses__())
    while todo:
        model = todo.pop()
        found.append(model)
        todo.extend(model.__subclasses__())
    return found


def test_every_tuple_of_every_wire_model_takes_a_json_array() -> None:
    # Steps hand each other model dumps through JSON, where tuples arrive as lists
    tuples = [
        (model, name, field)
        for model in _wire_models()
        for name, field in model.model_fields.items()
        if get_origin(field.annotation) is tuple
    ]
    assert len(tuples) >= 3
    for model, name, field in tuples:
        adapter: TypeAdapter[Any] = TypeAdapter(
            Annotated[(field.annotation, *field.metadata)],  # type: ignore[arg-type]
            config=ConfigDict(strict=True),
        )
        assert adapter.validate_python([]) == (), f"{model.__name__}.{name}"
