"""The wire side of injection: request validation, the canvas it builds, the result it keeps."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from pydantic import ValidationError

from domain.core.models import MAX_INJECT_BYTES, PreparedDisk, PrepareRequest


def request(**extra: Any) -> dict[str, Any]:
    return {
        "image": {"url": "http://images/x.raw", "image_id": "x"},
        "disk": {"instance_id": "vm-1", "size_bytes": 2**30},
        **extra,
    }


def test_files_decode_from_text_and_base64_with_octal_modes() -> None:
    parsed = PrepareRequest.model_validate(
        request(
            inject=[
                {"path": "/etc/motd", "content": "hello\n"},
                {
                    "path": "/root/key",
                    "content": base64.b64encode(b"\x00\x01").decode(),
                    "encoding": "base64",
                    "mode": "0600",
                },
            ],
            partition=2,
        )
    )
    assert [f.data() for f in parsed.inject] == [b"hello\n", b"\x00\x01"]
    assert [f.mode for f in parsed.inject] == [0o644, 0o600]
    assert parsed.partition == 2


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"inject": [{"path": "etc/motd", "content": ""}]}, "inject.0.path"),
        ({"inject": [{"path": "/etc/../shadow", "content": ""}]}, "inject.0.path"),
        ({"inject": [{"path": "/etc//motd", "content": ""}]}, "inject.0.path"),
        ({"inject": [{"path": "/etc/motd", "content": "%%", "encoding": "base64"}]}, "inject.0"),
        ({"inject": [{"path": "/etc/motd", "content": "", "mode": 0o10000}]}, "inject.0.mode"),
        ({"inject": [{"path": "/a", "content": ""}, {"path": "/a", "content": ""}]}, "twice"),
        ({"inject": [{"path": "/a", "content": "x" * (MAX_INJECT_BYTES + 1)}]}, "at most"),
        ({"partition": 0}, "partition"),
        ({"partition": "3"}, "partition"),
        ({"partition": "largest"}, "partition"),
    ],
)
def test_bad_injections_are_refused_naming_the_field(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        PrepareRequest.model_validate(request(**extra))


def test_results_without_the_new_fields_still_parse() -> None:
    old = {
        "kind": "prepared_disk",
        "api_version": 1,
        "disk": {
            "kind": "instance_disk",
            "host": "h",
            "instance_id": "vm",
            "disk_name": "disk",
            "path": "/i/vm/disk",
            "format": "qcow2",
            "virtual_size": 1,
        },
        "base": {
            "kind": "cached_image",
            "key": "k",
            "image_id": "i",
            "path": "/c/k",
            "format": "raw",
            "virtual_size": 1,
            "source_sha256": "0",
        },
    }
    parsed = PreparedDisk.model_validate(old)
    assert parsed.guest is None and parsed.injected == ()
