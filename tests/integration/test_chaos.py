"""Chaos: kill pool processes and whole workers with SIGKILL while an image downloads.

Every request must end, the cache must hold exactly one intact entry, and nothing may be left
locked, mounted or attached. CI runs one round; the longer run is

    IMGPREP_CHAOS_ROUNDS=10 .venv/bin/pytest tests/integration/test_chaos.py -s

which prints one line per round and a summary (kills, requests, finished, corrupt entries,
leftovers).
"""

from __future__ import annotations

import hashlib
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from domain.cache.directory import cache_key
from domain.core.models import DiskSpec, ImageSource, PreparedDisk, PrepareRequest
from tests.conftest import write_raw_image
from tests.integration.conftest import Cluster, ClusterFactory, unique
from tests.support.waiting import wait_for
from worker.cli.demo.image_server import ImageServer
from worker.cli.demo.worker_processes import WorkerProcess
from worker.stores.redis_locks import LOCK_PREFIX
from worker.stores.replies import text

MiB = 2**20
ROUNDS = int(os.environ.get("IMGPREP_CHAOS_ROUNDS", "1"))
REQUESTS_PER_ROUND = 6

CHAOS_SETTINGS = {
    # a whole worker's messages come back after the visibility timeout: keep it short here
    "IMGPREP_VISIBILITY_TIMEOUT": "20",
    "IMGPREP_STEP_TIME_LIMIT": "15",
    "IMGPREP_LOCK__LEASE_SECONDS": "3",
    "IMGPREP_LOCK__RENEW_SECONDS": "1",
    "IMGPREP_LOCK__WAIT_SECONDS": "10",
    "IMGPREP_RETRY__MAX_RETRIES": "10",
}


@dataclass
class Tally:
    kills: int = 0
    requests: int = 0
    finished: int = 0
    corrupt: int = 0
    leftovers: list[str] = field(default_factory=list)


def lock_holder_pid(cluster: Cluster, key: str) -> int | None:
    """The pid in the token of the process holding `cache:<key>` (tokens are host:pid:uuid)."""
    token = cluster.redis.get(f"{LOCK_PREFIX}cache:{key}")
    if not token:
        return None
    return int(text(token).split(":")[1])


def downloading(
    cluster: Cluster, server: ImageServer, name: str, key: str, attempt: int
) -> int | None:
    """The lock holder's pid once download number `attempt` has reached the server and written
    bytes (a new holder removes every earlier holder's `<key>.part.<fence>` before it sends its
    request)."""
    pid = lock_holder_pid(cluster, key)
    if (
        pid is not None
        and server.gets(name) >= attempt
        and any(
            part.stat().st_size > 0 for part in cluster.settings.cache_dir.glob(f"{key}.part.*")
        )
    ):
        return pid
    return None


def worker_of(cluster: Cluster, pid: int) -> WorkerProcess | None:
    return next((w for w in cluster.workers if pid in w.pool_pids()), None)


def chaos_round(cluster: Cluster, image_server: ImageServer, tally: Tally, number: int) -> None:
    # Given a 48 MiB image served at 12 MiB/s and several requests for it
    name = unique("chaos") + ".raw"
    source = write_raw_image(image_server.root / name, size=48 * MiB, data=os.urandom(8 * MiB))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    image_id = unique("img")
    key = cache_key(image_id)
    image_server.bytes_per_second = 12 * MiB
    results = [
        cluster.client.prepare_disk(
            PrepareRequest(
                image=ImageSource(
                    url=image_server.url(name), image_id=image_id, checksum=f"sha256:{digest}"
                ),
                disk=DiskSpec(instance_id=unique("vm"), size_bytes=64 * MiB),
            )
        )
        for _ in range(REQUESTS_PER_ROUND)
    ]
    tally.requests += len(results)

    # When the pool process downloading it is killed...
    first = wait_for(
        lambda: downloading(cluster, image_server, name, key, 1), timeout=60, what="a download"
    )
    os.kill(first, signal.SIGKILL)
    tally.kills += 1
    # ... and then the whole worker (main process and pool) that downloads it next
    second = wait_for(
        lambda: downloading(cluster, image_server, name, key, 2),
        timeout=60,
        what="a second download",
    )
    victim = worker_of(cluster, second)
    if victim is not None:
        victim.kill()
        cluster.workers.remove(victim)
        tally.kills += 1
    # and a new worker takes its place
    cluster.add_worker(f"replacement{number}")

    # Then every request ends with its disk, on one intact cache entry
    def wait(result: object) -> PreparedDisk | None:
        try:
            return cluster.client.wait_prepared(result, timeout=180)
        except Exception as error:  # counted, and reported by the assertion below
            print(f"round {number}: request failed: {type(error).__name__}: {error}")
            return None

    with ThreadPoolExecutor(len(results)) as pool:
        outcomes = list(pool.map(wait, results))
    done = [o for o in outcomes if o is not None]
    tally.finished += len(done)
    entries = sorted(p.name for p in cluster.settings.cache_dir.iterdir() if p.name.startswith(key))
    entry = cluster.settings.cache_dir / key
    intact = entry.is_file() and hashlib.sha256(entry.read_bytes()).hexdigest() == digest
    tally.corrupt += 0 if intact else 1
    left = {kind: items for kind, items in cluster.leftovers().items() if items}
    tally.leftovers += [f"{kind}: {items}" for kind, items in left.items()]
    print(
        f"round {number}: kills={tally.kills} finished={len(done)}/{len(results)} "
        f"entries={entries} intact={intact} leftovers={left or 'none'} "
        f"downloads={image_server.gets(name)}"
    )
    assert len(done) == len(results)
    assert entries == [key, f"{key}.json"]
    assert intact
    assert not left
    for prepared in done:
        assert prepared.base.path == str(entry)
        assert Path(prepared.disk.path).is_file()


def test_kills_lose_nothing(cluster_factory: ClusterFactory, image_server: ImageServer) -> None:
    cluster = cluster_factory("chaos", CHAOS_SETTINGS)
    cluster.add_worker("alpha")
    cluster.add_worker("beta")
    tally = Tally()
    try:
        for number in range(1, ROUNDS + 1):
            chaos_round(cluster, image_server, tally, number)
    finally:
        image_server.bytes_per_second = None
        print(
            f"chaos summary: rounds={ROUNDS} kills={tally.kills} requests={tally.requests} "
            f"finished={tally.finished} corrupt_entries={tally.corrupt} "
            f"leftovers={len(tally.leftovers)}"
        )
    assert tally.finished == tally.requests
    assert tally.corrupt == 0
