"""Credentials in image URLs never stay in Redis: results, journals, references and records
keep only the redacted URL; the raw one lives in the task message while the operation runs."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from domain.core.errors import SourceNotFound
from tests.conftest import write_raw_image
from tests.integration.conftest import ClusterFactory, unique
from tests.support.waiting import wait_for
from worker.cli.demo.image_server import ImageServer

MiB = 2**20
SECRETS = (b"secret", b"token=abc")


def values_of(client: redis.Redis, key: bytes) -> list[Any]:
    """Every value stored under `key`, whatever its type."""
    kind = client.type(key)
    if kind == b"string":
        value = client.get(key)
        return [value] if value is not None else []
    if kind == b"hash":
        return [item for pair in client.hgetall(key).items() for item in pair]
    if kind == b"list":
        return list(client.lrange(key, 0, -1))
    if kind == b"set":
        return list(client.smembers(key))
    if kind == b"zset":
        return [pair[0] for pair in client.zrange(key, 0, -1, withscores=True)]
    return []


def keys_holding_secrets(client: redis.Redis) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key in client.scan_iter(count=1000):
        for value in values_of(client, key):
            hits = [s.decode() for s in SECRETS if s in value]
            if hits:
                found.setdefault(key.decode(), []).extend(hits)
    return found


def secret_url(image_server: ImageServer, name: str) -> str:
    return f"http://user:secret@127.0.0.1:{image_server.port}/{name}?token=abc"


def prepare_payload(url: str) -> dict[str, object]:
    return {
        "image": {"url": url, "image_id": unique("img")},
        "disk": {"instance_id": unique("vm"), "size_bytes": 64 * MiB},
    }


def test_no_credentials_stay_in_redis_after_a_prepare(
    cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given a cluster with a Redis of its own (every key in it is this test's), and an image
    # behind a URL with user info and a token in its query string
    cluster = cluster_factory("credentials")
    cluster.add_worker("creds")
    name = unique("creds") + ".raw"
    write_raw_image(image_server.root / name, size=4 * MiB, data=b"creds" * 100)
    payload = prepare_payload(secret_url(image_server, name))

    # When it is prepared (and a second time, a cache hit), and when a missing image behind
    # the same kind of URL fails
    done = [cluster.client.send("imgprep.prepare_disk", payload) for _ in range(2)]
    for result in done:
        result.get(timeout=120)
    missing = cluster.client.send(
        "imgprep.prepare_disk", prepare_payload(secret_url(image_server, unique("absent")))
    )
    with pytest.raises(SourceNotFound):
        missing.get(timeout=120)

    # Then, once the operations ended, no value of any Redis key holds the password or the
    # token: results (args included), journals, references, queues
    client = cluster.redis
    wait_for(
        lambda: not client.hlen("unacked"), timeout=30, what="every message to be acknowledged"
    )
    assert keys_holding_secrets(client) == {}
    # while the results still name the image, by its redacted URL
    assert image_server.url(name).encode() in (client.get(f"celery-task-meta-{done[0].id}") or b"")
    cluster.assert_clean()
