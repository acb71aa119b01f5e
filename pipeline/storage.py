"""Object-store access through fsspec: URLs, retries, verified shard fetches.

Shards are streamed with large sequential reads into a local on-disk cache
(``pipeline.cache``), hashed on the way, and only handed out once the whole shard
matches its manifest sha256 — so a read that fails halfway is resumed or redone
and never yields a partial or duplicated sample. Transient failures (5xx, 503
SlowDown, resets, truncated bodies, stalls) are retried with exponential backoff
and full jitter; permanent ones (missing object, denied credentials, checksum
mismatch after retries) raise ``ShardFetchError`` naming the shard and the cause.

Credentials come from the standard chain of the backend (env, profile, instance
role); they are never logged and are scrubbed from every error message.
"""

from __future__ import annotations

import asyncio
import fcntl
import concurrent.futures as cf
import hashlib
import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
from tqdm import tqdm

from infra.metrics import sink
from pipeline.cache import ShardCache
from pipeline.manifest import MANIFEST_NAME, ShardInfo, ShardManifest

log = logging.getLogger(__name__)
READ_BLOCK = 8 * 2**20  # local sequential reads
RANGE_BYTES = 8 * 2**20  # one ranged GET per 8 MiB, several in flight per shard


class ShardFetchError(OSError):
    """A shard could not be fetched; permanent, or transient after all retries."""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_delay_s: float = 0.25
    max_delay_s: float = 20.0

    def delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff for the attempt that just failed (1-based)."""
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)))


@dataclass(frozen=True)
class StorageConfig:
    """Where and how to read. ``options`` go to fsspec (e.g. ``endpoint_url``);
    credentials belong in the standard chain, not here."""

    options: Mapping[str, Any] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    read_timeout_s: float | None = None  # per read; a stalled stream fails after this
    cache_dir: str | None = None
    cache_limit_bytes: int = 20 * 2**30
    prefetch_shards: int = 2
    parallel_ranges: int = 4  # concurrent ranged GETs per shard
    backend_retries: int | None = None  # s3fs's own retry count (None: its default); ours come on top


# ----------------------------------------------------------------- URLs
def split_url(url: str) -> tuple[str, str]:
    """'s3://b/x' -> ('s3', 'b/x'); plain paths and file:// -> ('file', abs path)."""
    protocol, path = fsspec.core.split_protocol(str(url))
    if protocol in (None, "file", "local"):
        return "file", os.path.abspath(os.path.expanduser(path))
    return protocol, path.rstrip("/")


def filesystem(url: str, config: StorageConfig | None = None, fresh: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a URL and the path within it. ``fresh`` skips
    fsspec's instance cache (needed after fork: s3fs's event loop is not fork-safe)."""
    config = config or StorageConfig()
    protocol, path = split_url(url)
    options = dict(config.options)
    if fresh:
        options["skip_instance_cache"] = True
    if protocol == "s3":
        if config.read_timeout_s:
            kwargs = dict(options.get("config_kwargs", {}))
            kwargs.setdefault("read_timeout", config.read_timeout_s)
            kwargs.setdefault("connect_timeout", config.read_timeout_s)
            options["config_kwargs"] = kwargs
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options and "client_kwargs" not in options:
            options["endpoint_url"] = endpoint
    try:
        fs = fsspec.filesystem(protocol, **options)
    except ImportError as e:
        extra = {"s3": "s3", "gs": "gcs (pip install gcsfs)"}.get(protocol, protocol)
        raise ImportError(f"reading {protocol}:// needs an fsspec backend: pip install 'maescale[{extra}]' ({e})") from e
    if config.backend_retries is not None and hasattr(fs, "retries"):
        fs.retries = config.backend_retries
    return fs, path


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


# ------------------------------------------------------------ redaction
_SECRET_PATTERNS = [
    re.compile(r"(?i)(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s'\"]+"),
    re.compile(r"(?i)((?:aws_)?(?:secret_access_key|access_key_id|session_token|secret|key|token)['\"]?\s*[:=]\s*['\"]?)[^\s,'\"}]+"),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+@"),  # user:password@host
]


def redact(text: str) -> str:
    """Remove credentials from a message: env secrets, signatures, key patterns."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "<redacted>")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "<redacted>", text)
    return text


def describe(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}")


# ----------------------------------------------------------- errors
_TRANSIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "urllib3", "requests", "gcsfs")


def is_permanent(exc: BaseException) -> bool:
    """Missing objects and denied access do not heal by retrying."""
    return isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying. s3fs surfaces stalls as FSTimeoutError and even
    IndexError, and 5xx/SlowDown as plain OSError, so the net is wide on purpose."""
    if is_permanent(exc):
        return False
    if isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError, EOFError, IndexError, ConnectionError)):
        return True
    return type(exc).__module__.split(".")[0] in _TRANSIENT_MODULES


class _ChecksumMismatch(Exception):
    pass


def _check_digest(actual: str, shard: ShardInfo) -> None:
    if actual != shard.sha256:
        raise _ChecksumMismatch(f"sha256 {actual[:12]}… != manifest {shard.sha256[:12]}…")


_EVENT_METRICS = {"bytes_fetched": "mae_shard_bytes_fetched_total", "fetch_retry": "mae_shard_fetch_retries_total",
                  "fetch_error": "mae_shard_fetch_errors_total", "cache_hit": "mae_shard_cache_hits_total",
                  "cache_miss": "mae_shard_cache_misses_total"}


def _to_metrics(event: str, n: int) -> None:
    sink().inc(_EVENT_METRICS[event], n)


class _PartialShard:
    """Ranges of a shard on disk so far, and the sha256 of its contiguous prefix.
    Out-of-order ranges wait in memory (at most ``parallel_ranges`` of them) until
    the prefix reaches them."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.hashed = 0
        self.arrived: set[int] = set()
        self._waiting: dict[int, bytes] = {}

    def add(self, start: int, data: bytes) -> None:
        self.arrived.add(start)
        self._waiting[start] = data
        while self.hashed in self._waiting:
            chunk = self._waiting.pop(self.hashed)
            self.digest.update(chunk)
            self.hashed += len(chunk)

    def finish(self, f: BinaryIO, size: int) -> None:
        """Hash what an earlier attempt left on disk beyond the in-memory prefix."""
        self._waiting.clear()
        f.seek(self.hashed)
        while self.hashed < size and (chunk := f.read(min(READ_BLOCK, size - self.hashed))):
            self.digest.update(chunk)
            self.hashed += len(chunk)


# ------------------------------------------------------------- the store
class ShardStore:
    """Fetches verified shards of one dataset to local disk.

    Remote shards go through the LRU cache; local (file://) shards are read in
    place and verified once per process.
    """

    def __init__(self, url: str, config: StorageConfig | None = None,
                 on_event: Callable[[str, int], None] | None = None) -> None:
        self.url = url.rstrip("/")
        self.config = config or StorageConfig()
        self._fs, self.root = filesystem(self.url, self.config)
        self._fs_pid = os.getpid()
        self.local = split_url(self.url)[0] == "file"
        self._verified: set[str] = set()
        self._partial: dict[str, _PartialShard] = {}  # downloads interrupted by a retryable error
        self._on_event = on_event or _to_metrics
        cache_dir = self.config.cache_dir or os.path.join(
            os.environ.get("MAESCALE_CACHE", os.path.expanduser("~/.cache/maescale")), "shards")
        self.cache = None if self.local else ShardCache(cache_dir, self.config.cache_limit_bytes)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """This process's filesystem: DataLoader workers (forked) get their own."""
        if self._fs_pid != os.getpid():
            self._fs, _ = filesystem(self.url, self.config, fresh=True)
            self._fs_pid = os.getpid()
        return self._fs

    def read_manifest(self) -> ShardManifest:
        where = redact(join(self.url, MANIFEST_NAME))
        data = self._with_retries(f"manifest {where}", lambda: self.fs.cat_file(join(self.root, MANIFEST_NAME)))
        return ShardManifest.from_json(data, where)

    def local_path(self, shard: ShardInfo, progress: bool = False) -> Path:
        """A local file holding the verified shard (downloads on a cache miss, with
        a progress bar on a terminal when ``progress``)."""
        if self.local:
            path = Path(join(self.root, shard.name))
            if shard.name not in self._verified:
                self._with_retries(f"shard {shard.name}", lambda: self._verify_local(path, shard))
                self._verified.add(shard.name)
            return path
        assert self.cache is not None
        hit = self.cache.get(shard.sha256)
        if hit is not None:
            self._on_event("cache_hit", 1)
            return hit
        self._on_event("cache_miss", 1)
        with self.cache.download_lock(shard.sha256):
            hit = self.cache.get(shard.sha256)  # another worker fetched it meanwhile
            if hit is not None:
                return hit
            tmp = self.cache.temp_path(shard.sha256)
            try:
                with tqdm(total=shard.bytes, unit="B", unit_scale=True, desc=f"staging {shard.name}",
                          disable=not (progress and sys.stderr.isatty())) as bar:
                    self._with_retries(f"shard {shard.name}", lambda: self._download(shard, tmp, bar.update))
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return self.cache.commit(shard.sha256, tmp)

    def open_shard(self, shard: ShardInfo) -> BinaryIO:
        """The verified shard, opened for reading. A cached entry is pinned (shared
        lock) while open, so eviction leaves it alone; one evicted between fetch and
        open is fetched again."""
        for _ in range(3):
            path = self.local_path(shard)
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                continue  # evicted by another process in between: fetch again
            if self.cache is not None:
                fcntl.flock(f, fcntl.LOCK_SH)  # an unlinked-but-open file stays readable
            return f
        raise ShardFetchError(f"shard {shard.name}: evicted from the cache before it could be opened "
                              f"three times in a row; raise cache_limit_bytes above a window of shards")

    # -- fetching
    def _verify_local(self, path: Path, shard: ShardInfo) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        _check_digest(sha256_file(path), shard)

    def _download(self, shard: ShardInfo, tmp: Path, on_bytes: Callable[[int], Any] | None = None) -> None:
        """Fetch one shard into ``tmp`` as parallel ranged GETs, each written at its
        offset, hashing in order as the prefix completes (no second read). A retry
        fetches only the ranges that have not arrived; a checksum mismatch starts over."""
        remote = join(self.root, shard.name)
        state = self._partial.setdefault(shard.sha256, _PartialShard())
        ranges = [(start, min(start + RANGE_BYTES, shard.bytes)) for start in range(0, shard.bytes, RANGE_BYTES)]
        with open(tmp, "r+b" if tmp.exists() else "w+b") as f:
            f.truncate(shard.bytes)

            def fetch(r: tuple[int, int]) -> tuple[int, bytes]:
                data = self.fs.cat_file(remote, start=r[0], end=r[1])
                if len(data) != r[1] - r[0]:
                    raise EOFError(f"range {r[0]}-{r[1]} returned {len(data)} bytes")
                os.pwrite(f.fileno(), data, r[0])
                self._on_event("bytes_fetched", len(data))
                return r[0], data

            errors = []
            with cf.ThreadPoolExecutor(max(1, self.config.parallel_ranges)) as pool:
                futures = [pool.submit(fetch, r) for r in ranges if r[0] not in state.arrived]
                for fut in cf.as_completed(futures):
                    try:
                        start, data = fut.result()
                        state.add(start, data)
                        if on_bytes is not None:
                            on_bytes(len(data))
                    except Exception as e:  # the first one is raised below, for the retry logic
                        errors.append(e)
            if errors:
                raise errors[0]
            state.finish(f, shard.bytes)
        del self._partial[shard.sha256]
        try:
            _check_digest(state.digest.hexdigest(), shard)
        except _ChecksumMismatch:
            tmp.unlink()  # a corrupt body: start over from byte 0
            raise

    def _with_retries(self, what: str, fn: Callable[[], Any]) -> Any:
        return with_retries(what, self.url, fn, self.config.retry, self._on_event)


def with_retries(what: str, url: str, fn: Callable[[], Any], policy: RetryPolicy,
                 on_event: Callable[[str, int], None] = lambda name, n: None) -> Any:
    """Call ``fn``, retrying transient failures; permanent ones and exhausted
    retries become one ``ShardFetchError`` naming ``what`` and the cause."""
    for attempt in range(1, policy.max_attempts + 1):
        try:
            return fn()
        except Exception as e:  # classified below; unknown kinds are re-raised as is
            if is_permanent(e):
                cause = "access denied (check credentials)" if isinstance(e, PermissionError) else "not found"
                on_event("fetch_error", 1)
                raise ShardFetchError(f"{what} at {redact(url)}: {cause} ({describe(e)})") from None
            if not (is_transient(e) or isinstance(e, _ChecksumMismatch)):
                raise
            if attempt == policy.max_attempts:
                on_event("fetch_error", 1)
                kind = "checksum mismatch" if isinstance(e, _ChecksumMismatch) else "failed"
                raise ShardFetchError(f"{what} at {redact(url)}: {kind} after {attempt} attempts "
                                      f"(last: {describe(e)})") from None
            delay = policy.delay(attempt)
            on_event("fetch_retry", 1)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.2fs",
                        what, attempt, policy.max_attempts, describe(e), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def sha256_file(path: str | os.PathLike[str], fs: fsspec.AbstractFileSystem | None = None) -> str:
    """sha256 of a local file, or of ``path`` on ``fs``, read in large blocks."""
    digest = hashlib.sha256()
    with (fs.open(path, "rb", block_size=READ_BLOCK) if fs is not None else open(path, "rb")) as f:
        while chunk := f.read(READ_BLOCK):
            digest.update(chunk)
    return digest.hexdigest()
