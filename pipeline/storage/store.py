"""Verified shard fetches: parallel ranged GETs into the node's shard cache.

Shards are fetched as several ranged GETs in flight, written at their offsets
into a local file in the cache (``pipeline.storage.cache``), hashed in order as
the prefix completes, and only handed out once the whole shard matches its
manifest checksum — so a read that fails halfway is resumed or redone and never
yields a partial or duplicated sample. The checksum is the manifest's xxh3-128
where it records one (``storage.checksum='xxh3'``, the default: ~1/20 of
sha256's CPU, and every accidental change is caught) and sha256 otherwise, or
always with ``checksum='sha256'`` (which also stops someone who can write shards,
not the manifest, from crafting a collision). Local (file://) datasets are read in place
and verified once per process.

A tar indexed in place without ``--hash`` (`mae index`) has no sha256. Its cache
entry is named by a digest of (URL, size, ETag, header fingerprint); the object's
size and ETag are checked before and after the download (an object replaced since
indexing, or while being read, is a permanent error), and every reader checks the
tar's header fingerprint when it opens the shard (``tar_format.index_shard``), so
the samples read are exactly the ones indexed. The member bytes themselves are
checked by decode-time validation only: ``--hash`` buys the full sha256 check.
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
from pipeline.errors import ManifestError, ShardFetchError
from pipeline.shards.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, ShardInfo, ShardManifest
from pipeline.shards.manifest_index import INDEX_NAME, MAX_INDEX_BYTES, ShardTable, table_for
from pipeline.storage.cache import ShardCache
from pipeline.storage.config import StorageConfig
from pipeline.storage.objects import HASHES, READ_BLOCK, ObjectFolder, file_digests, object_etag
from pipeline.storage.retry import ChecksumMismatch
from pipeline.storage.urls import is_local, join

_EVENT_METRICS = {"bytes_fetched": "mae_shard_bytes_fetched_total", "fetch_retry": "mae_shard_fetch_retries_total",
                  "fetch_error": "mae_shard_fetch_errors_total", "cache_hit": "mae_shard_cache_hits_total",
                  "cache_miss": "mae_shard_cache_misses_total"}


def report_event(event: str, n: int) -> None:
    """A store event (bytes fetched, retries, cache hits...) as its metric."""
    sink().inc(_EVENT_METRICS[event], n)


def _mismatch_text(algorithm: str, actual: str, expected: str) -> str:
    return f"{algorithm} {actual[:12]}… != manifest {expected[:12]}…"


def indexed_cache_key(url: str, shard: ShardInfo) -> str:
    """The cache name of a shard without sha256: a digest of where it is and what
    identifies its version (size, ETag, header fingerprint)."""
    ident = f"maescale-indexed\n{url}\n{shard.name}\n{shard.bytes}\n{shard.etag}\n{shard.headers_sha256}"
    return hashlib.sha256(ident.encode()).hexdigest()


class ObjectChanged(ChecksumMismatch):
    """An indexed object's size or ETag differs from the manifest's: re-index it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


class _PartialShard:
    """Ranges of a shard on disk so far, and the digest (``HASHES[algorithm]``, none
    when None) of its contiguous prefix. Out-of-order ranges wait in memory (at
    most ``parallel_ranges`` of them) until the prefix reaches them."""

    def __init__(self, algorithm: str | None) -> None:
        self.digest = HASHES[algorithm]() if algorithm is not None else None
        self.hashed = 0
        self.arrived: set[int] = set()
        self._waiting: dict[int, bytes] = {}

    def add(self, start: int, data: bytes) -> None:
        self.arrived.add(start)
        self._waiting[start] = data
        while self.hashed in self._waiting:
            chunk = self._waiting.pop(self.hashed)
            if self.digest is not None:
                self.digest.update(chunk)
            self.hashed += len(chunk)

    def finish(self, f: BinaryIO, size: int) -> None:
        """Hash what an earlier attempt left on disk beyond the in-memory prefix."""
        self._waiting.clear()
        if self.digest is None:
            return
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
        self.folder = ObjectFolder(url, config, self._on_event)  # the manifest's folder
        self.data = self.folder  # the shards' folder (another one for tars indexed in place)
        self.url, self.config = self.folder.url, self.folder.storage
        self._verified: set[str] = set()
        self._partial: dict[str, _PartialShard] = {}  # downloads interrupted by a retryable error
        self._mismatch: dict[str, str] = {}  # cache key -> digest of the last wrong download
        self._set_cache()

    def _set_cache(self) -> None:
        self.root, self.local = self.data.root, self.data.local
        cache_dir = self.config.cache_dir or os.path.join(
            os.environ.get("MAESCALE_CACHE", os.path.expanduser("~/.cache/maescale")), "shards")
        self.cache = None if self.local else ShardCache(cache_dir, self.config.cache_limit_bytes)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """This process's filesystem for the shards: DataLoader workers (forked) get their own."""
        return self.data.fs

    def cache_key(self, shard: ShardInfo) -> str:
        """The shard's cache entry name: its sha256 when that is what verified it; a
        digest of (sha256, xxh3-128) when xxh3 did — so a ``checksum='sha256'`` reader
        never takes an entry that only the weaker check passed; for tars indexed in
        place, ``indexed_cache_key``."""
        check = self.checksum(shard)
        if check is None:
            return indexed_cache_key(self.data.url, shard)
        if check[0] == "sha256":
            return check[1]
        return hashlib.sha256(f"maescale-xxh3\n{shard.sha256}\n{check[1]}".encode()).hexdigest()

    def checksum(self, shard: ShardInfo) -> tuple[str, str] | None:
        """(algorithm, expected digest) ``shard`` is verified with: its xxh3-128 unless
        ``checksum='sha256'`` or the manifest has none; None for a tar indexed in
        place without ``--hash`` (its header fingerprint is checked instead)."""
        if self.config.checksum == "xxh3" and shard.xxh3_128:
            return "xxh3_128", shard.xxh3_128
        return ("sha256", shard.sha256) if shard.sha256 else None

    def read_object(self, name: str, limit: int | None = None) -> bytes:
        """A small object of the dataset (manifest, keys file), under the retry policy."""
        return self.folder.read(name, limit)

    def read_manifest(self) -> ShardManifest:
        """The dataset's manifest; when it names a ``data_url`` (tars indexed in place,
        manifest kept elsewhere) shards are read from there from now on."""
        where = self.folder.where_of(MANIFEST_NAME)
        manifest = ShardManifest.from_json(self.read_object(MANIFEST_NAME, limit=MAX_MANIFEST_BYTES), where)
        self._read_data_from(manifest.data_url, where)
        return manifest

    def read_table(self) -> ShardTable:
        """The dataset's shards as a loader reads them: from ``manifest.index`` when
        it stands for this ``manifest.json``, else parsed from the JSON (and, as
        ``read_manifest``, read from the ``data_url`` it names)."""
        data = self.read_object(MANIFEST_NAME, limit=MAX_MANIFEST_BYTES)
        index = self.folder.read_if_exists(INDEX_NAME, limit=MAX_INDEX_BYTES)
        where = self.folder.where_of(MANIFEST_NAME)
        table = table_for(data, index, where)
        self._read_data_from(table.data_url, where)
        return table

    def _read_data_from(self, data_url: str | None, where: str) -> None:
        if data_url is None or data_url == self.data.url:
            return
        if is_local(data_url) and not self.folder.local:
            raise ManifestError(f"{where}: data_url points at local files; a manifest read from an object store "
                                "may only point at object-store data")
        self.data = ObjectFolder(data_url, self.config, self._on_event)
        self._set_cache()

    def local_path(self, shard: ShardInfo, progress: bool = False) -> Path:
        """A local file holding the verified shard (downloads on a cache miss, with
        a progress bar on a terminal when ``progress``)."""
        if self.local:
            path = Path(join(self.root, shard.name))
            if shard.name not in self._verified:
                self.data.call(f"shard {shard.name}", lambda: self._verify_local(path, shard))
                self._verified.add(shard.name)
            return path
        path, pinned = self._cached(shard, progress)
        if pinned is not None:
            pinned.close()
        return path

    def _cached(self, shard: ShardInfo, progress: bool = False) -> tuple[Path, BinaryIO | None]:
        """The shard's cache entry, and on a miss the fresh download opened and
        pinned (so it is not evicted before it is read)."""
        assert self.cache is not None
        key = self.cache_key(shard)
        hit = self.cache.get(key)
        if hit is not None:
            self._on_event("cache_hit", 1)
            return hit, None
        self._on_event("cache_miss", 1)
        with self.cache.download_lock(key):
            hit = self.cache.get(key)  # another worker fetched it meanwhile
            if hit is not None:
                return hit, None
            tmp = self.cache.temp_path(key)
            try:
                with tqdm(total=shard.bytes, unit="B", unit_scale=True, desc=f"staging {shard.name}",
                          disable=not (progress and sys.stderr.isatty())) as bar:
                    self.data.call(f"shard {shard.name}", lambda: self._fetch(shard, key, tmp, bar.update))
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return self.cache.commit(key, tmp)

    def open_shard(self, shard: ShardInfo) -> BinaryIO:
        """The verified shard, opened for reading. A cached entry is pinned while
        open, so eviction leaves it alone; one evicted between fetch and open is
        fetched again."""
        if self.cache is None:
            path = self.local_path(shard)
            try:
                return open(path, "rb")
            except FileNotFoundError as e:
                raise ShardFetchError(f"shard {shard.name}: {path} was removed after it was verified") from e
        for _ in range(3):
            path, pinned = self._cached(shard)
            if pinned is not None:
                return pinned
            try:
                return self.cache.open_pinned(path)
            except FileNotFoundError:
                continue  # a hit evicted by another process in between: fetch again
        raise ShardFetchError(f"shard {shard.name}: evicted from the cache before it could be opened "
                              f"three times in a row; raise cache_limit_gb above a window of shards")

    # -- fetching
    def _verify_local(self, path: Path, shard: ShardInfo) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        check = self.checksum(shard)
        if check is None:  # indexed in place: its header fingerprint is checked when opened
            self._check_size(path.stat().st_size, shard)
            return
        algorithm, expected = check
        actual = file_digests(path, algorithms=(algorithm,))[algorithm]
        if actual != expected:  # rereading a local file gives the same bytes: no retry
            raise ChecksumMismatch(_mismatch_text(algorithm, actual, expected), permanent=True)

    @staticmethod
    def _check_size(size: int, shard: ShardInfo) -> None:
        if size != shard.bytes:
            raise ObjectChanged(f"{size} bytes, manifest says {shard.bytes}: the object changed since it was "
                                "indexed; run `mae index` again")

    def _check_unchanged(self, shard: ShardInfo) -> None:
        """An indexed object still has the size and ETag it had when indexed."""
        info = self.fs.info(join(self.root, shard.name), refresh=True)
        self._check_size(int(info.get("size", -1)), shard)
        if shard.etag is not None and object_etag(info) != shard.etag:
            raise ObjectChanged(f"ETag {object_etag(info)} != manifest {shard.etag}: the object changed since it "
                                "was indexed; run `mae index` again")

    def _fetch(self, shard: ShardInfo, key: str, tmp: Path, on_bytes: Callable[[int], Any] | None = None) -> None:
        if shard.sha256 is not None:
            self._download(shard, key, tmp, on_bytes)
            return
        self._check_unchanged(shard)
        self._download(shard, key, tmp, on_bytes)
        self._check_unchanged(shard)  # not replaced while we read it

    def _download(self, shard: ShardInfo, key: str, tmp: Path, on_bytes: Callable[[int], Any] | None = None) -> None:
        """Fetch one shard into ``tmp`` as parallel ranged GETs, each written at its
        offset, hashing in order as the prefix completes (no second read). A retry
        fetches only the ranges that have not arrived; a checksum mismatch starts over."""
        remote, step, check = join(self.root, shard.name), self.config.range_bytes, self.checksum(shard)
        state = self._partial.setdefault(key, _PartialShard(check[0] if check else None))
        ranges = [(start, min(start + step, shard.bytes)) for start in range(0, shard.bytes, step)]
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
        del self._partial[key]
        if state.digest is None or check is None:
            return
        algorithm, expected = check
        actual = state.digest.hexdigest()
        if actual != expected:
            tmp.unlink()  # a corrupt body: start over from byte 0
            same_again = self._mismatch.get(key) == actual  # the object itself differs: retrying cannot help
            self._mismatch[key] = actual
            raise ChecksumMismatch(_mismatch_text(algorithm, actual, expected) + (" twice" if same_again else ""),
                                   same_again)
