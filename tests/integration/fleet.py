"""A fleet in host scope on one machine, for the fleet's tests: host ids, each with its own
worker process, its own cache, instances and state directories and its own peer port on
loopback; one Redis; an origin image server with a bandwidth limit that counts the bytes it
sends; and a peer of our own that serves whatever bytes it is given."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from celery.result import AsyncResult

from domain.cache.directory import ImageCache, cache_key
from harness.machine import leftovers
from tests.integration.conftest import Cluster, ClusterFactory, unique
from worker.app.routing import host_queue
from worker.cli.demo.image_server import ImageServer
from worker.cli.demo.ports import free_port
from worker.cli.demo.worker_processes import WorkerProcess
from worker.stores.redis_peers import RedisPeerRegistry

MiB = 2**20
SECRET = "fleet-test-secret"
HOSTS = ("h1", "h2", "h3", "h4")
# Peers are on 127.0.0.1 only: 127.0.0.2 stands for an address no peer may be at.
PEER_NETWORKS = '["127.0.0.1/32"]'


@dataclass
class Host:
    name: str
    root: Path
    port: int
    worker: WorkerProcess | None = None

    @property
    def cache(self) -> ImageCache:
        return ImageCache(self.root / "cache")

    def env(self) -> dict[str, str]:
        return {
            "IMGPREP_HOST_ID": self.name,
            "IMGPREP_CACHE_DIR": str(self.root / "cache"),
            "IMGPREP_INSTANCES_DIR": str(self.root / "instances"),
            "IMGPREP_STATE_DIR": str(self.root / "state"),
            "IMGPREP_PEER__PORT": str(self.port),
        }


@dataclass
class Fleet:
    cluster: Cluster
    hosts: dict[str, Host]
    origin: ImageServer

    @property
    def registry(self) -> RedisPeerRegistry:
        """The peer registry as a fleet host reads and writes it (with the fleet's secret)."""
        return RedisPeerRegistry(self.cluster.redis, 3600, SECRET)

    def start(self, host: Host) -> None:
        host.worker = self.cluster.add_worker(host.name, env=host.env())

    def prepare(
        self, name: str, image_id: str, host: str, checksum: str | None = None
    ) -> AsyncResult:
        image: dict[str, Any] = {"url": self.origin.url(name), "image_id": image_id}
        if checksum is not None:
            image["checksum"] = checksum
        request = {
            "image": image,
            "disk": {"instance_id": unique("vm"), "size_bytes": 64 * MiB},
            "host": host,
        }
        return self.cluster.client.send("imgprep.prepare_disk", request)

    def send(self, task: str, payload: dict[str, Any], host: str) -> Any:
        return self.cluster.app.send_task(task, args=[payload], queue=host_queue(host))

    def entry_sha256(self, host: str, image_id: str) -> str:
        path = self.hosts[host].cache.entry(cache_key(image_id))
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def logs(self, host: str) -> list[dict[str, Any]]:
        """The JSON lines the host's worker logged so far."""
        worker = self.hosts[host].worker
        assert worker is not None
        lines = []
        for line in worker.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                parsed = json.loads(line)
                if isinstance(parsed, dict):
                    lines.append(parsed)
        return lines

    def assert_clean(self) -> None:
        self.cluster.assert_clean()
        everywhere = self.cluster.root / "hosts"
        found = leftovers(
            client=self.cluster.redis,
            cache_dir=everywhere,
            instances_dir=everywhere,
            state_dir=everywhere,
        )
        assert not {kind: items for kind, items in found.items() if items}


def image_file(root: Path, name: str, size: int, seed: int) -> tuple[str, str]:
    """A raw image of random bytes (no format's magic: inspected as raw); (name, checksum)."""
    data = random.Random(seed).randbytes(size)  # noqa: S311 - test data, not secrets
    (root / name).write_bytes(data)
    return name, f"sha256:{hashlib.sha256(data).hexdigest()}"


@contextlib.contextmanager
def make_fleet(
    cluster_factory: ClusterFactory,
    tmp_path: Path,
    extra: dict[str, str] | None = None,
    hosts: tuple[str, ...] = HOSTS,
) -> Iterator[Fleet]:
    """`hosts`, each with one worker, on one Redis; `extra` settings over the fleet's."""
    overrides = {
        "IMGPREP_IMAGE_CACHE__SCOPE": "host",
        "IMGPREP_PEER__SECRET": SECRET,
        "IMGPREP_PEER__ADDRESS": "127.0.0.1",
        "IMGPREP_PEER__ALLOWED_NETWORKS": PEER_NETWORKS,
        "IMGPREP_PEER__STALL_SECONDS": "3",
        "IMGPREP_PEER__CONNECT_TIMEOUT_SECONDS": "2",
        "IMGPREP_LOCK__LEASE_SECONDS": "4",
        "IMGPREP_LOCK__RENEW_SECONDS": "1",
        "IMGPREP_HOSTS__HEARTBEAT_SECONDS": "1",
        "IMGPREP_HOSTS__SILENT_AFTER_SECONDS": "30",
        **(extra or {}),
    }
    cluster = cluster_factory("fleet", overrides)
    made_hosts = {}
    for name in hosts:
        root = cluster.root / "hosts" / name
        for sub in ("cache", "instances", "state"):
            (root / sub).mkdir(parents=True)
        made_hosts[name] = Host(name, root, free_port())
    served = tmp_path / "origin"
    served.mkdir()
    with ImageServer(served) as origin:
        made = Fleet(cluster, made_hosts, origin)
        started = cluster.add_workers(*[(host.name, host.env()) for host in made_hosts.values()])
        for host, worker in zip(made_hosts.values(), started, strict=True):
            host.worker = worker
        yield made


class FakePeer:
    """A peer server on loopback that answers every range with `data`'s bytes there (wrong
    bytes of the right length: 0x5a without `data`), whatever the signature: it does not check.
    It counts the requests it gets."""

    def __init__(self, data: bytes | None = None, host: str = "127.0.0.1") -> None:
        self.requests = 0
        self.connections = 0
        fake = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request: Any, client_address: Any) -> None:
                fake.connections += 1
                super().process_request(request, client_address)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return

            def do_GET(self) -> None:
                fake.requests += 1
                spec = self.headers.get("Range", "bytes=0-0").removeprefix("bytes=")
                first, _, last = spec.partition("-")
                start, end = int(first), int(last) + 1
                if data is not None:
                    end = min(end, len(data))
                body = data[start:end] if data is not None else b"\x5a" * (end - start)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/*")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = Server((host, 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
