"""Wire models of pre-caching (imgprep.precache): images into the caches of hosts before any
instance asks for them (Nova's aggregate image pre-cache).

Like domain.core.models: frozen, unknown fields refused, changed only by adding optional fields.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from domain.core.models import (
    API_VERSION,
    FROM_JSON_ARRAY,
    ApiVersion,
    HostId,
    ImageSource,
    WireModel,
)

MAX_PRECACHE_IMAGES = 64
MAX_PRECACHE_HOSTS = 4096

Outcome = Literal["cached", "already_cached", "failed"]


class PrecacheRequest(WireModel):
    """imgprep.precache: put these images into the cache of these hosts."""

    api_version: ApiVersion = API_VERSION
    images: Annotated[tuple[ImageSource, ...], FROM_JSON_ARRAY] = Field(
        max_length=MAX_PRECACHE_IMAGES, description="At least one image."
    )
    hosts: Annotated[tuple[HostId, ...], FROM_JSON_ARRAY] | None = Field(
        default=None,
        max_length=MAX_PRECACHE_HOSTS,
        description="Hosts whose caches get the images; default (null): every live host.",
    )

    @model_validator(mode="after")
    def _something_to_do(self) -> PrecacheRequest:
        if not self.images:
            raise ValueError("images must name at least one image")
        if self.hosts is not None and not self.hosts:
            raise ValueError("hosts must name at least one host, or be null for every live host")
        return self


class PrecacheHostRequest(WireModel):
    """The step imgprep.precache_host: the images into one host's cache."""

    api_version: ApiVersion = API_VERSION
    images: Annotated[tuple[ImageSource, ...], FROM_JSON_ARRAY] = Field(
        max_length=MAX_PRECACHE_IMAGES
    )
    host: HostId


class PrecacheOutcome(WireModel):
    """What became of one image on one host."""

    host: HostId
    image_id: str
    key: str
    outcome: Outcome
    error_class: str | None = None
    error_message: str | None = None


class PrecacheReport(WireModel):
    """The result of imgprep.precache (and of each host's step): one outcome per host and
    image. A failed image does not fail the operation; its outcome names the error."""

    kind: Literal["precache_report"] = "precache_report"
    api_version: ApiVersion = API_VERSION
    results: list[PrecacheOutcome]
