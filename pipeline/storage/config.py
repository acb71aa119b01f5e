"""How the pipeline reads and writes objects: endpoint, timeouts, cache, parallelism,
and the one retry policy every object-store call goes through. The object-store
client's own retries are turned off (``pipeline.storage.urls``), so these numbers
alone decide how long a failing call takes."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from infra.options import option, require, require_choice, require_non_negative, require_positive, require_text
from infra.redact import redact


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = option(8, "tries of a transient failure (5xx, reset, stall) before giving up")
    base_delay_s: float = option(0.25, "first backoff; doubles per attempt, full jitter")
    max_delay_s: float = option(20.0, "longest backoff between attempts")
    deadline_s: float = option(300.0, "one object operation, its retries included, starts no attempt after this")

    def __post_init__(self) -> None:
        require_positive(self, "max_attempts", "deadline_s", "max_delay_s")
        require_non_negative(self, "base_delay_s")
        require(0 <= self.base_delay_s <= self.max_delay_s, "base_delay_s",
                f"must be in [0, max_delay_s={self.max_delay_s}], got {self.base_delay_s}")

    def delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff for the attempt that just failed (1-based)."""
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)))


def endpoint_problem(endpoint: str) -> str | None:
    """Why an S3 endpoint URL cannot be used (None: it can). One with a user name or
    password is refused: botocore would send it as part of the host, and every
    request fail as a network error until the retry deadline."""
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 - raises on a port that is not a number or is out of range
    except ValueError as e:
        return f"is not a URL ({e})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be http://host[:port] or https://..."
    if parts.username is not None or parts.password is not None:
        return ("must not carry a user name or password: credentials come from AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, a profile or an instance role")
    return None


def require_endpoint(config: object, name: str) -> None:
    """An option holding an S3 endpoint URL (or None) is usable; the error never shows a password."""
    value = getattr(config, name)
    problem = endpoint_problem(value) if value is not None else None
    require(problem is None, name, f"{problem}, got {redact(str(value))!r}")


@dataclass(frozen=True)
class StorageConfig:
    """Where and how to read. Credentials come from the backend's standard chain
    (environment, profile, instance role), never from here."""

    endpoint_url: str | None = option(None, "S3-compatible endpoint (default: AWS_ENDPOINT_URL, else AWS)")
    cache_dir: str | None = option(None, "local shard cache (default ~/.cache/maescale/shards, or $MAESCALE_CACHE)")
    cache_limit_gb: float = option(20.0, "LRU size limit of the shard cache per node, GiB")
    cache_mode: str = option("disk", "'disk': shards go through the node-shared cache; 'memory': each reader keeps "
                                     "the shards it reads in RAM and writes nothing to disk (datasets read once "
                                     "per epoch, far larger than the cache; one reader per rank: the dali backend "
                                     "or cpu with num_workers <= 1, since every cpu worker fetches for itself)")
    checksum: str = option("xxh3", "'xxh3': verify each shard by the manifest's xxh3-128 (its sha256 where the "
                                   "manifest has none), ~9x less CPU per byte; 'sha256': also stops a deliberate "
                                   "collision by someone who can write shards but not the manifest")
    prefetch_shards: int = option(2, "shards fetched ahead of the reader")
    parallel_ranges: int = option(4, "concurrent ranged GETs per shard")
    range_mib: int = option(8, "size of one ranged GET, MiB")
    direct_ranges: bool = option(True, "S3: send each ranged GET over the client's HTTP session with a presigned "
                                       "URL (~0.4x the client CPU per request); false: through the S3 client's "
                                       "get_object. Requester-pays, SSE-C, ARN and S3 Express reads, and "
                                       "redirects, always use the client")
    connect_timeout_s: float = option(10.0, "a connection not made within this fails (and is retried)")
    read_timeout_s: float = option(30.0, "a request that receives nothing for this long fails (and is retried)")
    retry: RetryPolicy = option(factory=RetryPolicy, doc="")
    options: dict[str, Any] = option(factory=dict, doc="extra fsspec options, e.g. {client_kwargs: {region_name: ...}}")

    def __post_init__(self) -> None:
        require_positive(self, "cache_limit_gb", "parallel_ranges", "range_mib", "connect_timeout_s", "read_timeout_s")
        require(self.cache_limit_bytes >= 1, "cache_limit_gb", f"must be at least one byte, got {self.cache_limit_gb:g}")
        require_choice(self, "checksum", ("xxh3", "sha256"))
        require_choice(self, "cache_mode", ("disk", "memory"))
        require_endpoint(self, "endpoint_url")
        require(self.prefetch_shards >= 0, "prefetch_shards", f"must be >= 0, got {self.prefetch_shards}")
        require_text(self, "cache_dir")

    @property
    def range_bytes(self) -> int:
        return self.range_mib * 2**20

    @property
    def cache_limit_bytes(self) -> int:
        return int(self.cache_limit_gb * 2**30)

    def fsspec_options(self) -> dict[str, Any]:
        return {**self.options, **({"endpoint_url": self.endpoint_url} if self.endpoint_url else {})}
