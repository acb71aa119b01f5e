"""Verified shard fetches: parallel ranged GETs into the node's shard cache.

Shards are fetched as several ranged GETs in flight, written at their offsets
into a local file in the cache (``pipeline.storage.cache``), hashed in order as
the prefix completes, and only handed out once the whole shard matches its
manifest sha256 — so a read that fails halfway is resumed or redone and never
yields a partial or duplicated sample. Local (file://) datasets are read in place
and verified once per process.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
from tqdm import tqdm

from infra.metrics import sink
from pipeline.errors import ShardFetchError
from pipeline.shards.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, ShardInfo, ShardManifest
from pipeline.shards.manifest_index import INDEX_NAME, MAX_INDEX_BYTES, ShardTable, table_for
from pipeline.storage.cache import ShardCache
from pipeline.storage.config import StorageConfig
from pipeline.storage.objects import READ_BLOCK, ObjectFolder, sha256_file
from pipeline.storage.retry import ChecksumMismatch
from pipeline.storage.urls import join

RANGE_BYTES = 8 * 2**20  # one ranged GET per 8 MiB, several in flight per shard
_EVENT_METRICS = {"bytes_fetched": "mae_shard_bytes_fetched_total", "fetch_retry": "mae_shard_fetch_retries_total",
                  "fetch_error": "mae_shard_fetch_errors_total", "cache_hit": "mae_shard_cache_hits_total",
                  "cache_miss": "mae_shard_cache_misses_total"}


def report_event(event: str, n: int) -> None:
    """A store event (bytes fetched, retries, cache hits...) as its metric."""
    sink().inc(_EVENT_METRICS[event], n)


def _mismatch_text(actual: str, shard: ShardInfo) -> str:
    return f"sha256 {actual[:12]}… != manifest {shard.sha256[:12]}…"


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
        self._on_event = on_event or report_event
        self.folder = ObjectFolder(url, config, self._on_event)
        self.url, self.config = self.folder.url, self.folder.storage
        self.root, self.local = self.folder.root, self.folder.local
        self._verified: set[str] = set()
        self._partial: dict[str, _PartialShard] = {}  # downloads interrupted by a retryable error
        self._mismatch: dict[str, str] = {}  # sha256 -> digest of the last wrong download
        cache_dir = self.config.cache_dir or os.path.join(
            os.environ.get("MAESCALE_CACHE", os.path.expanduser("~/.cache/maescale")), "shards")
        self.cache = None if self.local else ShardCache(cache_dir, self.config.cache_limit_bytes)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """This process's filesystem: DataLoader workers (forked) get their own."""
        return self.folder.fs

    def read_object(self, name: str, limit: int | None = None) -> bytes:
        """A small object of the dataset (manifest, keys file), under the retry policy."""
        return self.folder.read(name, limit)

    def read_manifest(self) -> ShardManifest:
        data = self.read_object(MANIFEST_NAME, limit=MAX_MANIFEST_BYTES)
        return ShardManifest.from_json(data, self.folder.where_of(MANIFEST_NAME))

    def read_table(self) -> ShardTable:
        """The dataset's shards as a loader reads them: from ``manifest.index`` when
        it stands for this ``manifest.json``, else parsed from the JSON."""
        data = self.read_object(MANIFEST_NAME, limit=MAX_MANIFEST_BYTES)
        index = self.folder.read_if_exists(INDEX_NAME, limit=MAX_INDEX_BYTES)
        return table_for(data, index, self.folder.where_of(MANIFEST_NAME))

    def local_path(self, shard: ShardInfo, progress: bool = False) -> Path:
        """A local file holding the verified shard (downloads on a cache miss, with
        a progress bar on a terminal when ``progress``)."""
        if self.local:
            path = Path(join(self.root, shard.name))
            if shard.name not in self._verified:
                self.folder.call(f"shard {shard.name}", lambda: self._verify_local(path, shard))
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
                    self.folder.call(f"shard {shard.name}", lambda: self._download(shard, tmp, bar.update))
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return self.cache.commit(shard.sha256, tmp)

    def open_shard(self, shard: ShardInfo) -> BinaryIO:
        """The verified shard, opened for reading. A cached entry is pinned while
        open, so eviction leaves it alone; one evicted between fetch and open is
        fetched again."""
        for _ in range(3):
            path = self.local_path(shard)
            try:
                return open(path, "rb") if self.cache is None else self.cache.open_pinned(path)
            except FileNotFoundError:
                continue  # evicted by another process in between: fetch again
        raise ShardFetchError(f"shard {shard.name}: evicted from the cache before it could be opened "
                              f"three times in a row; raise cache_limit_gb above a window of shards")

    # -- fetching
    def _verify_local(self, path: Path, shard: ShardInfo) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        actual = sha256_file(path)
        if actual != shard.sha256:  # rereading a local file gives the same bytes: no retry
            raise ChecksumMismatch(_mismatch_text(actual, shard), permanent=True)

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
        actual = state.digest.hexdigest()
        if actual != shard.sha256:
            tmp.unlink()  # a corrupt body: start over from byte 0
            same_again = self._mismatch.get(shard.sha256) == actual  # the object itself differs: retrying cannot help
            self._mismatch[shard.sha256] = actual
            raise ChecksumMismatch(_mismatch_text(actual, shard) + (" twice" if same_again else ""), same_again)
