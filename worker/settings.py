"""Typed settings: code defaults, then config/imgprep.toml, then IMGPREP_* environment variables.

Settings are loaded once at the edge (CLI, Celery app) with `get_settings()` and passed down;
domain code receives the group it needs, never this module.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    RedisDsn,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from domain.cache.networks import (
    DEFAULT_DENIED_NETWORKS,
    DEFAULT_PEER_NETWORKS,
    NEVER_PEER_NETWORKS,
)
from domain.core.models import HostId
from worker.stores.redis_urls import is_sentinel, normalised

ENV_PREFIX = "IMGPREP_"
NESTED_DELIMITER = "__"
CONFIG_ENV = "IMGPREP_CONFIG"
REPO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "imgprep.toml"
# This host's settings, written by scripts/install.sh (privilege separation on).
HOST_CONFIG = Path("/etc/imgprep/imgprep.toml")

PositiveSeconds = Annotated[float, Field(gt=0)]

_REDIS_DSN: TypeAdapter[RedisDsn] = TypeAdapter(RedisDsn)


def _redis_url(value: str) -> str:
    """A `redis://`, `rediss://` or `unix://` URL (normalised as pydantic's RedisDsn does), or
    Sentinels in Celery's form `sentinel://h1:26379;sentinel://h2:26379/0`."""
    if is_sentinel(value):
        return normalised(value)
    return str(_REDIS_DSN.validate_python(value))


# Where Redis is: one server, or the Sentinels of a replicated one (redis.master_name).
RedisUrl = Annotated[str, AfterValidator(_redis_url)]


class _Group(BaseModel):
    # Each field's docstring is its description (docs/settings.md is generated from them).
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class LockSettings(_Group):
    """Redis lease locks that guard cache entries and instance disks."""

    lease_seconds: PositiveSeconds = 30.0
    """A lock's lease: a holder that dies loses the lock after at most this long."""
    renew_seconds: PositiveSeconds = 10.0
    """How often the holder renews its lease (at most half the lease)."""
    wait_seconds: PositiveSeconds = 900.0
    """How long a step waits for a busy lock before it retries later (`LockBusy`, transient);
    shorter than `step_time_limit`."""
    replica_ack_seconds: float = Field(default=1.0, ge=0)
    """After taking a lock, wait up to this long for a replica to confirm it (`WAIT 1`), so a
    failover right after is less likely to forget it; only while the master has replicas.
    0: never wait."""

    @model_validator(mode="after")
    def _renew_within_lease(self) -> LockSettings:
        if self.renew_seconds * 2 > self.lease_seconds:
            raise ValueError("renew_seconds must be at most half of lease_seconds")
        return self


class FetchSettings(_Group):
    """Where images may come from and how they are downloaded."""

    allowed_schemes: tuple[Literal["http", "https", "file"], ...] = ("http", "https")
    """URL schemes images may come from."""
    file_roots: tuple[Path, ...] = ()
    """Directories `file://` URLs may read from (absolute paths; empty: none)."""
    denied_networks: tuple[IPvAnyNetwork, ...] = tuple(
        ipaddress.ip_network(network) for network in DEFAULT_DENIED_NETWORKS
    )
    """Networks downloads never connect to, checked on the address each connection uses (after
    DNS, on every redirect); refused with `SourceNotAllowed`. Default: loopback, link-local
    (cloud metadata services), unspecified and multicast, IPv4 and IPv6. Add your control
    plane's networks; allow loopback only where images are served on the worker's host."""
    connect_timeout_seconds: PositiveSeconds = 10.0
    """HTTP connect timeout."""
    read_timeout_seconds: PositiveSeconds = 60.0
    """HTTP read timeout."""
    min_bytes_per_second: int = Field(default=64 * 2**10, ge=0)
    """A download bringing fewer bytes per second than this over the last
    `rate_window_seconds` is stopped with `SourceTooSlow` (retried); 0: no minimum."""
    rate_window_seconds: PositiveSeconds = 60.0
    """The window the minimum download rate is measured over."""
    max_image_bytes: int = Field(default=256 * 2**30, gt=0)
    """Largest image accepted, in bytes."""
    force_raw: bool = True
    """Convert non-raw images to raw in the cache (Nova's `force_raw_images`)."""

    @field_validator("file_roots")
    @classmethod
    def _absolute_roots(cls, roots: tuple[Path, ...]) -> tuple[Path, ...]:
        for root in roots:
            if not root.is_absolute():
                raise ValueError(f"file root {root} must be an absolute path")
        return roots


class QemuSettings(_Group):
    """Limits for qemu-img, which parses untrusted image headers."""

    info_cpu_seconds: int = Field(default=30, gt=0)
    """CPU limit of `qemu-img info` on an untrusted image (Nova's `images_cpu_time_limit`)."""
    info_address_space_bytes: int = Field(default=2 * 2**30, gt=0)
    """Address-space limit of `qemu-img info` (Nova's `images_address_space_limit`)."""
    command_timeout_seconds: PositiveSeconds = 1800.0
    """Wall-clock limit of any qemu-img command."""


class MountSettings(_Group):
    """Mapping, mounting and file injection of guest disks (domain.guest.mapping and
    domain.guest.mounting)."""

    allowed_filesystems: tuple[str, ...] = ("ext2", "ext3", "ext4", "xfs", "btrfs", "vfat")
    """Guest filesystems that may be mounted for injection (blkid type names)."""
    kernel_mount: Literal["never", "fallback", "always"] = "never"
    """`never`: userspace mounts only (fuse2fs for ext2/3/4), the safe choice for untrusted
    guests; `fallback`: the kernel mounts (`nosuid,nodev,noexec`) filesystems without a
    userspace driver; `always`: the kernel mounts every filesystem."""
    device_wait_seconds: PositiveSeconds = 30.0
    """How long mapping waits for a free loop device before retrying later (Nova's
    `MAX_DEVICE_WAIT`)."""
    stop_timeout_seconds: PositiveSeconds = 30.0
    """How long teardown waits for fuse2fs and qemu-storage-daemon to write back and exit."""


class RetrySettings(_Group):
    """Backoff for transient errors: delay = min(max, base * 2**retries), half of it random
    (equal jitter)."""

    max_retries: int = Field(default=8, ge=0)
    """Retries of a transient error before the step fails with it."""
    backoff_seconds: PositiveSeconds = 1.0
    """The first backoff; each retry doubles it, half of it random."""
    backoff_max_seconds: PositiveSeconds = 120.0
    """The longest backoff."""


class ImageCacheSettings(_Group):
    """The cache manager: which unused base images it removes, and how often it runs."""

    remove_unused_original_minimum_age_seconds: float = Field(default=86400.0, ge=0)
    """A cached base no instance disk on any host uses is removed once it has been unused this
    long (Nova's option of the same name)."""
    max_bytes: int = Field(default=0, ge=0)
    """Size cap of the cache in bytes (0: none); over it, unused bases go least recently used
    first."""
    min_idle_seconds: float = Field(default=600.0, ge=0)
    """A base used more recently than this is never removed to meet the size cap."""
    manager_interval_seconds: PositiveSeconds = 2400.0
    """How often `imgprep beat` sends `imgprep.evict_cache` (Nova's
    `image_cache_manager_interval`)."""
    scope: Literal["shared", "host"] = "shared"
    """`shared`: one cache directory every host mounts (one lock, one set of references, any
    worker fetches); `host`: each host keeps its own cache, fetches on its own queue, and takes
    images from peers that have them (`[peer]`) instead of the origin."""


class PeerSettings(_Group):
    """Host scope: each host serves its cache read-only to the other hosts
    (worker.fleet.peer_server) and takes images from them (domain.cache.fleet)."""

    address: str = ""
    """The address other hosts reach this host's peer server on, and its listen address
    (`""`: the host id, which must resolve; the server then listens on every address and
    answers only clients in `allowed_networks`)."""
    port: int = Field(default=9809, ge=1, le=65535)
    """Port of the peer server."""
    secret: str = ""
    """The fleet's shared key: peer requests carry an HMAC of method, path, range and time with
    it, and the peer registry's records in Redis an HMAC of their fields, key and host
    (required in host scope)."""
    allowed_networks: tuple[IPvAnyNetwork, ...] = tuple(
        ipaddress.ip_network(network) for network in DEFAULT_PEER_NETWORKS
    )
    """The networks the fleet's hosts are on: peers are connected to only at addresses in them,
    and the peer server answers only clients from them. Never link-local, unspecified or
    multicast, whatever this says; add `127.0.0.0/8` only for a fleet on one machine."""
    max_bytes_per_second: int = Field(default=0, ge=0)
    """Upload rate limit of this host's peer server, all transfers together (0: none)."""
    max_connections: int = Field(default=8, gt=0)
    """Transfers the peer server serves at once (503 beyond)."""
    max_unauthenticated_connections: int = Field(default=32, gt=0)
    """Connections whose request is not yet read and authenticated; more are closed as they
    are accepted, before any thread is started."""
    header_timeout_seconds: PositiveSeconds = 5.0
    """A client must send its whole request line and headers (at most 16 KiB) within this
    long, in all."""
    send_timeout_seconds: PositiveSeconds = 10.0
    """A client that takes less than 256 KiB of a response in this long is cut off and its
    transfer slot freed."""
    stall_seconds: PositiveSeconds = 10.0
    """A peer that brings no byte for this long is dropped; another peer or the origin resumes
    from that byte."""
    connect_timeout_seconds: PositiveSeconds = 3.0
    """Connect timeout to a peer."""

    @field_validator("allowed_networks")
    @classmethod
    def _never_where_no_peer_is(
        cls, networks: tuple[IPvAnyNetwork, ...]
    ) -> tuple[IPvAnyNetwork, ...]:
        for network in networks:
            for never in map(ipaddress.ip_network, NEVER_PEER_NETWORKS):
                if network.version == never.version and network.subnet_of(never):  # type: ignore[arg-type]
                    raise ValueError(
                        f"{network} is in {never}, where no peer is ever reached (link-local, "
                        "unspecified, multicast)"
                    )
        return networks


class HostSettings(_Group):
    """Which hosts have live workers (worker.delivery.hosts): heartbeats, and when a host's work is
    refused or abandoned."""

    heartbeat_seconds: PositiveSeconds = 10.0
    """How often each worker that consumes its host's queue announces the host in Redis."""
    silent_after_seconds: PositiveSeconds = 30.0
    """A host unheard of this long (or never) is refused at once: entry tasks fail a request
    for it with `HostUnavailable` before anything is queued."""
    abandon_after_seconds: PositiveSeconds = 300.0
    """Work queued for a host silent this long, or held by its dead workers, is failed with
    `HostUnavailable` by the live workers, and its pins on cached bases released."""

    @model_validator(mode="after")
    def _beats_before_silence(self) -> HostSettings:
        if self.heartbeat_seconds * 2 > self.silent_after_seconds:
            raise ValueError("silent_after_seconds must be at least twice heartbeat_seconds")
        if self.abandon_after_seconds < self.silent_after_seconds:
            raise ValueError("abandon_after_seconds must not be shorter than silent_after_seconds")
        return self


class RedisSettings(_Group):
    """A replicated Redis behind Sentinel (the URLs are `sentinel://...`), and passwords."""

    master_name: str = ""
    """The name the Sentinels know the master by (their `sentinel monitor <name> ...`);
    required with a `sentinel://` URL (`""` otherwise)."""
    password: SecretStr = SecretStr("")
    """Password of the Redis servers (master and replicas), when the URLs carry none
    (`""`: none). Better set in the environment than in a file."""
    sentinel_password: SecretStr = SecretStr("")
    """Password of the Sentinels themselves (their `requirepass`; `""`: none)."""
    sentinel_timeout_seconds: PositiveSeconds = 5.0
    """How long a Sentinel may take to answer which server is the master."""


class MetricsSettings(_Group):
    """The Prometheus endpoint each worker serves."""

    enabled: bool = True
    """Serve Prometheus metrics from each worker."""
    address: str = "0.0.0.0"  # noqa: S104 - scraped from other hosts by design
    """Address of the metrics endpoint."""
    port: int = Field(default=9808, ge=1, le=65535)
    """Port of the metrics endpoint (`/metrics`)."""


class PrivilegeSettings(_Group):
    """Privilege separation (helper/): who runs the workers, and where the privileged helper
    listens. Both empty: today's behaviour, one root process does everything."""

    helper_socket: str = ""
    """The Unix socket of the privileged helper; empty: device steps run their privileged
    operations (loop devices, mounts, FUSE daemons, files written as root into guests) in the
    worker's own process, which must then run as root."""
    user: str = ""
    """The unprivileged user `imgprep worker`, started as root, runs the worker as (after
    starting the helper, when `helper_socket` is set); empty: the worker keeps the user it was
    started as."""
    helper_state_dir: Path = Path("/run/imgprep-helper")
    """The helper's own state (its ledger of the loop devices it attached), root's; with the
    helper, the device work areas live in its `devices` (`Settings.devices_dir`)."""
    start_helper: bool = True
    """Whether `imgprep worker`, started as root, starts the helper itself (`false`: the helper
    is a service of its own, `imgprep helper`)."""


class RbdSettings(_Group):
    """The rbd backend (domain.rbd): the Ceph cluster this host's rbd disks live in. Many hosts
    may name the same cluster; imported images are shared by all of them."""

    conf: Path = Path("/etc/ceph/ceph.conf")
    """The clients' ceph.conf of this host's Ceph cluster (monitor addresses,
    authentication)."""
    user: str = ""
    """The cephx user without `client.` (Nova's `rbd_user`); `""`: Ceph's default,
    `client.admin`."""
    keyring: str = ""
    """The user's keyring, readable by the workers' user; `""`: Ceph's default search
    (`/etc/ceph/ceph.client.<user>.keyring`, ...)."""
    pool: str = "vms"
    """Pool of instance disks (Nova's `images_rbd_pool`)."""
    images_pool: str = "images"
    """Pool of the images imported once per cluster."""
    connect_timeout_seconds: PositiveSeconds = 30.0
    """How long a Ceph tool waits for the monitors (`client_mount_timeout`); then
    `CephUnavailable` (retried)."""
    command_timeout_seconds: PositiveSeconds = 120.0
    """Wall-clock limit of one metadata operation (clone, resize, rename, snapshot)."""
    transfer_timeout_seconds: PositiveSeconds = 1800.0
    """Wall-clock limit of an import, flatten, removal or extract."""
    age_images: bool = False
    """Whether `imgprep.evict_cache` (sent by beat) also ages this cluster's imported images
    out: those without clones unused for
    `image_cache.remove_unused_original_minimum_age_seconds`."""

    @field_validator("pool", "images_pool")
    @classmethod
    def _pool_name(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "._-" for c in value):
            raise ValueError(f"{value!r} is not a pool name (letters, digits, '.', '_', '-')")
        return value


class Settings(BaseSettings):
    """Every setting imgprep reads: IMGPREP_<NAME>, and IMGPREP_<GROUP>__<NAME> for groups."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,  # each field's docstring is its description
    )

    redis_url: RedisUrl = "redis://localhost:6379/0"
    """Broker, results and locks: `redis://`, `rediss://`, `unix://`, or Sentinels
    `sentinel://h1:26379;sentinel://h2:26379/0` (with `redis.master_name`)."""
    broker_url: RedisUrl | None = None
    """The broker, when it is not `redis_url`."""
    result_backend: RedisUrl | None = None
    """The result backend, when it is not `redis_url`."""
    cache_dir: Path = Path("/var/lib/imgprep/cache")
    """The base-image cache (in shared scope, one directory every host mounts)."""
    instances_dir: Path = Path("/var/lib/imgprep/instances")
    """Instance disks: `<instances_dir>/<instance id>/<disk name>`."""
    state_dir: Path = Path("/var/lib/imgprep/state")
    """Host-local state: temporary files, mount directories (without the helper), demo
    files."""
    snapshots_dir: Path = Path("/var/lib/imgprep/snapshots")
    """Images written by `imgprep.snapshot`: targets must lie under it."""
    preallocate_images: Literal["none", "space"] = "none"
    """`none` keeps instance disks sparse; `space` reserves each disk's full size with
    `fallocate` where the filesystem supports it (probed once per filesystem; Nova's
    `preallocate_images`)."""
    host_id: HostId = Field(default_factory=socket.gethostname)
    """This host's name: its queue is `imgprep.host.<host_id>`. Default: the hostname."""
    visibility_timeout: int = Field(default=3600, gt=0)
    """Seconds before Redis re-delivers an unacknowledged message; must exceed
    `step_time_limit` plus `retry.backoff_max_seconds`, or a long step would run twice."""
    step_time_limit: int = Field(default=3000, gt=0)
    """Hard time limit of every step, in seconds (the soft limit, when a step cleans up and
    fails with `StepTimedOut`, is 30 s or 10 % earlier)."""
    result_expires: int = Field(default=86400, gt=0)
    """Seconds results and step journals are kept."""
    redis_outage_seconds: PositiveSeconds = 120.0
    """How long a worker rides out a Redis outage (a restart, a failover): publishing a retry,
    the next step or a canvas, and writing a result, each wait this long for Redis to answer
    (a step's waits still end at its time limit)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of workers."""
    log_format: Literal["auto", "json", "console"] = "auto"
    """`json` lines, `console` rendering, or `auto`: console on a terminal, JSON otherwise."""
    lock: LockSettings = LockSettings()
    fetch: FetchSettings = FetchSettings()
    qemu: QemuSettings = QemuSettings()
    retry: RetrySettings = RetrySettings()
    image_cache: ImageCacheSettings = ImageCacheSettings()
    metrics: MetricsSettings = MetricsSettings()
    mount: MountSettings = MountSettings()
    hosts: HostSettings = HostSettings()
    privileges: PrivilegeSettings = PrivilegeSettings()
    redis: RedisSettings = RedisSettings()
    peer: PeerSettings = PeerSettings()
    rbd: RbdSettings = RbdSettings()
    precache_concurrency: int = Field(default=1, gt=0)
    """`imgprep.precache` fetches at most this many images from their origin at once,
    fleet-wide (Nova's `image_cache.precache_concurrency`)."""

    @property
    def devices_dir(self) -> Path:
        """Where the device work areas (mount points, FUSE exports, pid files) live. With the
        privileged helper: `<privileges.helper_state_dir>/devices`, a tree only root can change,
        so nothing root does there can be redirected by the unprivileged worker; without it
        (one root process does everything): `<state_dir>/devices`, as always."""
        if self.privileges.helper_socket:
            return self.privileges.helper_state_dir / "devices"
        return self.state_dir / "devices"

    @field_validator("cache_dir", "instances_dir", "state_dir", "snapshots_dir")
    @classmethod
    def _absolute_dir(cls, path: Path) -> Path:
        if not path.is_absolute():
            raise ValueError(f"{path} must be an absolute path")
        return path

    @model_validator(mode="after")
    def _steps_end_before_redelivery(self) -> Settings:
        # The Redis transport re-delivers an unacknowledged message after the visibility
        # timeout even while its task still runs. A message is unacknowledged while a retry
        # waits out its countdown (up to backoff_max_seconds) and while its step runs (killed
        # at step_time_limit): both together must end before the visibility timeout.
        longest = self.step_time_limit + self.retry.backoff_max_seconds
        if longest >= self.visibility_timeout:
            raise ValueError(
                f"visibility_timeout ({self.visibility_timeout} s) must exceed step_time_limit "
                f"plus retry.backoff_max_seconds ({longest:.0f} s), or a long step would be "
                "delivered twice"
            )
        if self.lock.wait_seconds >= self.step_time_limit:
            raise ValueError("lock.wait_seconds must be shorter than step_time_limit")
        if self.image_cache.scope == "host" and not self.peer.secret:
            raise ValueError(
                "image_cache.scope host needs peer.secret (IMGPREP_PEER__SECRET), the key "
                "every host signs its peer requests with"
            )
        return self

    @model_validator(mode="after")
    def _sentinel_has_master(self) -> Settings:
        named = [
            env
            for env, url in (
                ("IMGPREP_REDIS_URL", self.redis_url),
                ("IMGPREP_BROKER_URL", self.broker_url),
                ("IMGPREP_RESULT_BACKEND", self.result_backend),
            )
            if url and is_sentinel(url)
        ]
        if named and not self.redis.master_name:
            raise ValueError(
                f"{named[0]} names Sentinels: set IMGPREP_REDIS__MASTER_NAME to the name they "
                "monitor the master by (their 'sentinel monitor <name> ...')"
            )
        return self

    @property
    def sentinel(self) -> bool:
        """Whether any of the URLs is a Sentinel URL."""
        return any(is_sentinel(url) for url in (self.broker, self.results, self.coordination))

    @property
    def cache_namespace(self) -> str:
        """Prefixed to cache lock names and reference keys: "<host>/" in host scope, where each
        host's cache is its own; "" in shared scope."""
        return f"{self.host_id}/" if self.image_cache.scope == "host" else ""

    @property
    def peer_url(self) -> str:
        """The base URL other hosts reach this host's peer server at."""
        address = self.peer.address or self.host_id
        if ":" in address:
            address = f"[{address}]"
        return f"http://{address}:{self.peer.port}"

    @property
    def soft_time_limit(self) -> float:
        """When a step is told to stop (SoftTimeLimitExceeded) and clean up before the kill."""
        return max(self.step_time_limit - 30, self.step_time_limit * 0.9)

    @property
    def broker(self) -> str:
        return str(self.broker_url or self.redis_url)

    @property
    def results(self) -> str:
        return str(self.result_backend or self.redis_url)

    @property
    def coordination(self) -> str:
        """Redis for locks, step journals and device records."""
        return str(self.redis_url)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_file())
        return (init_settings, env_settings, toml)


def config_file() -> Path | None:
    """The TOML file of settings: $IMGPREP_CONFIG, else this host's /etc/imgprep/imgprep.toml,
    else the checkout's config/imgprep.toml (settings it does not name keep their defaults)."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        return Path(named)
    for candidate in (HOST_CONFIG, REPO_CONFIG):
        if candidate.is_file():
            return candidate
    return None


class InvalidSettingError(SystemExit):
    """Raised (as a clean exit) when a setting does not validate."""


def env_name(location: tuple[Any, ...]) -> str:
    """The environment variable that sets the field at `location` of a validation error."""
    parts = [str(part) for part in location if not isinstance(part, int)]
    if not parts:
        return ENV_PREFIX.rstrip("_")
    return ENV_PREFIX + NESTED_DELIMITER.join(parts).upper()


def describe(error: ValidationError) -> str:
    """One line naming the first invalid setting and why it was refused."""
    first = error.errors()[0]
    return f"invalid setting {env_name(first['loc'])}: {first['msg']}"


def load_settings(**overrides: Any) -> Settings:
    """Build settings; an invalid one exits with one line that names it."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise InvalidSettingError(f"imgprep: {describe(error)}") from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, loaded once."""
    return load_settings()


def ensure_directories(settings: Settings) -> None:
    """Create the cache, instances, state and snapshots directories a worker writes to."""
    for path in (
        settings.cache_dir,
        settings.instances_dir,
        settings.state_dir,
        settings.snapshots_dir,
    ):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            print(f"imgprep: cannot create {path}: {error.strerror}", file=sys.stderr)
            raise SystemExit(2) from None
