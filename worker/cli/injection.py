"""Parsing `imgprep prepare --inject GUEST_PATH=LOCAL_FILE` and `--partition N|auto|none`.

The CLI reads each local file and sends its bytes as base64, with the local file's permission
bits as the guest file's mode; the request model checks paths and sizes.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

import click


class InjectionType(click.ParamType[dict[str, Any]]):
    """GUEST_PATH=LOCAL_FILE → one entry of the request's `inject` list."""

    name = "GUEST_PATH=LOCAL_FILE"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        guest, sep, local = str(value).partition("=")
        if not sep or not guest or not local:
            self.fail(f"{value!r} is not GUEST_PATH=LOCAL_FILE", param, ctx)
        path = Path(local)
        try:
            with open(path, "rb") as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode):
                    self.fail(f"{local} is not a regular file", param, ctx)
                data = handle.read()
        except OSError as error:
            self.fail(f"cannot read {local}: {error.strerror}", param, ctx)
        return {
            "path": guest,
            "content": base64.b64encode(data).decode("ascii"),
            "encoding": "base64",
            "mode": stat.S_IMODE(info.st_mode),
        }


class PartitionType(click.ParamType[object]):
    """A partition number, `auto` or `none`."""

    name = "N|auto|none"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> object:
        text = str(value).strip().lower()
        if text in ("auto", "none"):
            return text
        if text.isdigit() and int(text) > 0:
            return int(text)
        self.fail(f"{value!r} is not a partition number, auto or none", param, ctx)
