"""Verified shard fetches: parallel ranged GETs into the node's shard cache.

Shards are fetched as several ranged GETs in flight, each body's chunks written
at their offsets into a local file in the cache (``pipeline.storage.cache``) as
they arrive (``ranges.read_range``: no range-sized buffer, no copy to join one),
hashed in order as the prefix completes, and only handed out once the whole shard
matches its manifest checksum — so a read that fails halfway is resumed or redone and never
yields a partial or duplicated sample. The checksum is the manifest's xxh3-128
where it records one (``storage.checksum='xxh3'``, the default: ~1/9 of
sha256's CPU, and every accidental change is caught) and sha256 otherwise, or
always with ``checksum='sha256'`` (which also stops someone who can write shards,
not the manifest, from crafting a collision). Local (file://) datasets are read in place
and verified once per process, and again where a file was rewritten in place since
(its inode, size or time stamp changed: `mae shard` run into the folder of a job).

A tar indexed in place without ``--hash`` (`mae index`) has no sha256. Its cache
entry is named by a digest of (URL, size, ETag, header fingerprint); the object's
size and ETag are checked before and after the download (an object replaced since
indexing, or while being read, is a permanent error), and every reader checks the
tar's header fingerprint when it opens the shard (``tar_format.index_shard``), so
the samples read are exactly the ones indexed. The member bytes themselves are
checked by decode-time validation only: ``--hash`` buys the full sha256 check.
"""

from __future__ import annotations

import bisect
import errno
import concurrent.futures as cf
import hashlib
import io
import itertools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
from tqdm import tqdm

from infra.files import require_regular
from infra.metrics import sink
from pipeline.errors import ManifestError, ShardFetchError
from pipeline.shards.manifest import MANIFEST_NAME, MAX_KEYS_BYTES, MAX_MANIFEST_BYTES, ShardInfo, ShardManifest
from pipeline.shards.manifest_index import INDEX_NAME, MAX_INDEX_BYTES, ShardTable, table_for
from pipeline.storage.cache import ShardCache
from pipeline.storage.config import StorageConfig
from pipeline.storage.objects import (
    HASHES,
    READ_BLOCK,
    ObjectFolder,
    file_digests,
    object_etag,
    range_past_the_end,
    transfer_limit_s,
)
from pipeline.storage.ranges import read_range
from pipeline.storage.retry import ChecksumMismatch
from pipeline.storage.urls import is_local, join

_EVENT_METRICS = {"bytes_fetched": "mae_shard_bytes_fetched_total", "fetch_retry": "mae_shard_fetch_retries_total",
                  "fetch_error": "mae_shard_fetch_errors_total", "cache_hit": "mae_shard_cache_hits_total",
                  "cache_miss": "mae_shard_cache_misses_total"}


def report_event(event: str, n: int) -> None:
    """A store event (bytes fetched, retries, cache hits...) as its metric."""
    sink().inc(_EVENT_METRICS[event], n)


def _identity(path: Path) -> tuple[int, ...]:
    """What tells a local file from one written in its place: device, inode, size
    and modification time (empty when it cannot be read)."""
    try:
        st = path.stat()
    except OSError:
        return ()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _mismatch_text(algorithm: str, actual: str, expected: str) -> str:
    return f"{algorithm} {actual[:12]}… != manifest {expected[:12]}…"


def indexed_cache_key(url: str, shard: ShardInfo) -> str:
    """The cache name of a shard without sha256: a digest of where it is and what
    identifies its version (size, ETag, header fingerprint)."""
    ident = f"maescale-indexed\n{url}\n{shard.name}\n{shard.bytes}\n{shard.etag}\n{shard.headers_sha256}"
    return hashlib.sha256(ident.encode()).hexdigest()


class ObjectChanged(ChecksumMismatch):
    """An object's size or ETag differs from the manifest's: it was replaced or cut
    since the manifest was written (an indexed one: re-index it)."""

    cause = "the object changed"

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


class ShardBytes(io.RawIOBase):
    """A verified shard held in memory (``cache_mode='memory'``) as the chunks its
    ranges arrived in — never joined into one buffer — and read like a read-only file."""

    # a range cut halfway leaves pieces a retry, split elsewhere, would not replace:
    # only whole ranges are put here
    rewritten_whole = False

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self._pos = size, 0
        self._chunks: dict[int, bytes] = {}
        self._starts: list[int] = []

    # -- filled by the download
    def put(self, start: int, data: bytes) -> None:
        if start not in self._chunks:
            bisect.insort(self._starts, start)
        self._chunks[start] = data

    def reset(self) -> None:
        self._chunks.clear()
        self._starts.clear()

    def read_at(self, start: int, n: int) -> bytes:
        """``n`` bytes from ``start`` (fewer at the end): a slice of one range, or the
        pieces of the ranges it spans, joined."""
        n = max(0, min(n, self.size - start))
        pieces = []
        i = bisect.bisect_right(self._starts, start) - 1
        while n > 0 and 0 <= i < len(self._starts):
            first = self._starts[i]
            piece = self._chunks[first][start - first:start - first + n]
            if not piece:
                break
            pieces.append(piece)
            start, n, i = start + len(piece), n - len(piece), i + 1
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    # -- a read-only file
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = max(0, {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence] + offset)
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        data = self.read_at(self._pos, self.size - self._pos if n is None or n < 0 else n)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.reset()  # the memory goes with the last reader
        super().close()


class _FileSink:
    """A download's ranges written at their offsets into the cache's part file."""

    rewritten_whole = True  # a range cut halfway is written again whole, over the same bytes: chunks go in as they come

    def __init__(self, path: Path, size: int) -> None:
        self.size = size
        self.file = open(path, "r+b" if path.exists() else "w+b")
        self.file.truncate(size)

    def put(self, start: int, data: bytes) -> None:
        """All of ``data`` at ``start``: a full disk can take part of a write without an
        error, and the next write then raises ENOSPC."""
        view = memoryview(data)
        while view:
            written = os.pwrite(self.file.fileno(), view, start)
            if written <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.file.name))
            view, start = view[written:], start + written

    def read_at(self, start: int, n: int) -> bytes:
        return os.pread(self.file.fileno(), n, start)

    def reset(self) -> None:
        self.file.truncate(0)
        self.file.truncate(self.size)

    def close(self) -> None:
        self.file.close()


class _PartialShard:
    """Ranges of a shard on disk so far, and the digest (``HASHES[algorithm]``, none
    when None) of its contiguous prefix. Out-of-order ranges wait in memory (at
    most ``parallel_ranges`` of them) until the prefix reaches them."""

    def __init__(self, algorithm: str | None) -> None:
        self.digest = HASHES[algorithm]() if algorithm is not None else None
        self.hashed = 0
        self.arrived: set[int] = set()
        self._waiting: dict[int, list[bytes]] = {}

    def add(self, start: int, chunks: list[bytes]) -> None:
        """A whole range, as the chunks it arrived in."""
        self.arrived.add(start)
        self._waiting[start] = chunks
        while self.hashed in self._waiting:
            for chunk in self._waiting.pop(self.hashed):
                if self.digest is not None:
                    self.digest.update(chunk)
                self.hashed += len(chunk)

    def finish(self, stored: _FileSink | ShardBytes, size: int) -> None:
        """Hash what an earlier attempt stored beyond the in-memory prefix."""
        self._waiting.clear()
        if self.digest is None:
            return
        while self.hashed < size and (chunk := stored.read_at(self.hashed, min(READ_BLOCK, size - self.hashed))):
            self.digest.update(chunk)
            self.hashed += len(chunk)


# ------------------------------------------------------------- the store
class ShardStore:
    """Fetches verified shards of one dataset to local disk.

    Remote shards go through the LRU cache, or with ``cache_mode='memory'`` are
    held in memory by their reader; local (file://) shards are read in place and
    verified once per process (again if rewritten in place).
    """

    def __init__(self, url: str, config: StorageConfig | None = None,
                 on_event: Callable[[str, int], None] | None = None) -> None:
        self._on_event = on_event or report_event
        self.folder = ObjectFolder(url, config, self._on_event)  # the manifest's folder
        self.data = self.folder  # the shards' folder (another one for tars indexed in place)
        self.url, self.config = self.folder.url, self.folder.storage
        self._verified: dict[str, tuple[int, ...]] = {}  # local shard -> the file it was verified as
        self._partial: dict[str, _PartialShard] = {}  # downloads interrupted by a retryable error
        self._mismatch: dict[str, str] = {}  # cache key -> digest of the last wrong download
        self._set_cache()

    def _set_cache(self) -> None:
        self.root, self.local = self.data.root, self.data.local
        self.in_memory = not self.local and self.config.cache_mode == "memory"
        cache_dir = self.config.cache_dir or os.path.join(
            os.environ.get("MAESCALE_CACHE", os.path.expanduser("~/.cache/maescale")), "shards")
        self.cache = None if self.local or self.in_memory else ShardCache(cache_dir, self.config.cache_limit_bytes)

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

    def read_keys(self, name: str) -> list[str]:
        """The sample keys listed in ``name`` (a beton's, one per line); a file
        larger than ``MAX_KEYS_BYTES`` is refused without reading the rest."""
        data = self.read_object(name, limit=MAX_KEYS_BYTES)
        if len(data) > MAX_KEYS_BYTES:
            raise ManifestError(f"{self.folder.where_of(name)}: more than {MAX_KEYS_BYTES // 2**20} MiB of sample keys "
                                "(one short key per sample); not a keys file written by `mae shard --format beton`")
        return data.decode("utf-8", "replace").splitlines()

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
            seen, now = self._verified.get(shard.name), _identity(path)
            if seen is None or (now and now != seen):  # first read, or rewritten in place since
                self.data.call(f"shard {shard.name}", lambda: self._verify_local(path, shard))
                self._verified[shard.name] = now  # as it was before the check: a change during it is seen next time
            return path
        if self.in_memory:
            raise ShardFetchError(f"shard {shard.name}: this reader needs the shard as a local file, and "
                                  "storage.cache_mode='memory' keeps shards off disk; use cache_mode='disk'")
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
                sink = _FileSink(tmp, shard.bytes)
                try:
                    if progress and sys.stderr.isatty():
                        with tqdm(total=shard.bytes, unit="B", unit_scale=True, desc=f"staging {shard.name}") as bar:
                            self._fetch(shard, key, sink, bar.update)
                    else:  # no tqdm at all: its global lock must never be held by a thread when a process forks
                        self._fetch(shard, key, sink)
                finally:
                    sink.close()
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return self.cache.commit(key, tmp)

    def fetch_bytes(self, shard: ShardInfo) -> ShardBytes:
        """The verified shard in memory (``cache_mode='memory'``): nothing on disk. A
        shard larger than ``cache_limit_gb`` is refused before anything is read (the
        manifest is untrusted; its sizes must not decide a reader's memory)."""
        if shard.bytes > self.config.cache_limit_bytes:
            raise ShardFetchError(f"shard {shard.name}: {shard.bytes / 2**30:.1f} GiB, more than cache_limit_gb "
                                  f"({self.config.cache_limit_gb:g}), which bounds one shard held in memory with "
                                  "cache_mode='memory'; raise it, or use cache_mode='disk'")
        memory = ShardBytes(shard.bytes)
        self._fetch(shard, self.cache_key(shard), memory)
        return memory

    def open_shard(self, shard: ShardInfo) -> BinaryIO:
        """The verified shard, opened for reading. A cached entry is pinned while
        open, so eviction leaves it alone; one evicted between fetch and open is
        fetched again. With ``cache_mode='memory'`` each call fetches the shard
        into memory."""
        if self.in_memory:
            return self.fetch_bytes(shard)
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
        require_regular(path)  # missing: FileNotFoundError; a pipe would block the reader for good
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

    def _fetch(self, shard: ShardInfo, key: str, stored: _FileSink | ShardBytes,
               on_bytes: Callable[[int], Any] | None = None) -> None:
        """The download under the retry policy. One that ends in an error forgets the
        ranges it had (they go with the part file), so a later fetch starts over."""
        try:
            self.data.call(f"shard {shard.name}", lambda: self._checked_download(shard, key, stored, on_bytes))
        except BaseException:
            self._partial.pop(key, None)
            raise

    def _checked_download(self, shard: ShardInfo, key: str, stored: _FileSink | ShardBytes,
                          on_bytes: Callable[[int], Any] | None) -> None:
        if shard.sha256 is not None:
            self._download(shard, key, stored, on_bytes)
            return
        self._check_unchanged(shard)
        self._download(shard, key, stored, on_bytes)
        self._check_unchanged(shard)  # not replaced while we read it

    def _download(self, shard: ShardInfo, key: str, stored: _FileSink | ShardBytes,
                  on_bytes: Callable[[int], Any] | None = None) -> None:
        """Fetch one shard into ``stored`` as parallel ranged GETs, each stored at its
        offset, hashing in order as the prefix completes (no second read). A retry
        fetches only the ranges that have not arrived; a checksum mismatch starts over."""
        remote, step, check = join(self.root, shard.name), self.config.range_bytes, self.checksum(shard)
        state = self._partial.setdefault(key, _PartialShard(check[0] if check else None))
        ranges = [(start, min(start + step, shard.bytes)) for start in range(0, shard.bytes, step)]

        def fetch(r: tuple[int, int]) -> tuple[int, list[bytes]]:
            chunks: list[bytes] = []

            def put(offset: int, chunk: bytes) -> None:  # hashed once the prefix reaches it
                if stored.rewritten_whole:
                    stored.put(offset, chunk)  # written as it arrives
                chunks.append(chunk)

            try:
                n = read_range(self.fs, remote, r[0], r[1], put, transfer_limit_s(self.config, r[1] - r[0]),
                               self.config.direct_ranges)
            except OSError as e:
                if not range_past_the_end(e):
                    raise
                n = 0
            if n > r[1] - r[0]:
                raise ObjectChanged(f"bytes {r[0]}-{r[1]}: the server answered with more than the {r[1] - r[0]} "
                                    "bytes asked, or with others (it does not honour ranged GETs)")
            if n < r[1] - r[0]:  # a whole answer, so the object itself is shorter: retrying cannot help
                raise ObjectChanged(f"bytes {r[0]}-{r[1]} of the manifest's {shard.bytes} gave {n}: the "
                                    "object is shorter than the manifest says (replaced or cut since it was written)")
            if not stored.rewritten_whole:  # the range's pieces, only now that it is whole
                offset = r[0]
                for chunk in chunks:
                    stored.put(offset, chunk)
                    offset += len(chunk)
            self._on_event("bytes_fetched", n)
            return r[0], chunks

        errors: list[Exception] = []
        parallel = max(1, self.config.parallel_ranges)
        todo = (r for r in ranges if r[0] not in state.arrived)
        with cf.ThreadPoolExecutor(parallel) as pool:  # at most `parallel` GETs queued: the first error stops the rest
            running = {pool.submit(fetch, r) for r in itertools.islice(todo, parallel)}
            while running:
                done, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    try:
                        start, chunks = fut.result()
                        state.add(start, chunks)
                        if on_bytes is not None:
                            on_bytes(sum(map(len, chunks)))
                    except Exception as e:  # raised below, for the retry logic
                        errors.append(e)
                if not errors:
                    running |= {pool.submit(fetch, r) for r in itertools.islice(todo, len(done))}
        if errors:
            raise next((e for e in errors if isinstance(e, ObjectChanged)), errors[0])
        state.finish(stored, shard.bytes)
        del self._partial[key]
        if check is None:  # indexed in place: nothing to hash against
            return
        algorithm, expected = check
        actual = state.digest.hexdigest()
        if actual != expected:
            stored.reset()  # a corrupt body: start over from byte 0
            same_again = self._mismatch.get(key) == actual  # the object itself differs: retrying cannot help
            self._mismatch[key] = actual
            raise ChecksumMismatch(_mismatch_text(algorithm, actual, expected) + (" twice" if same_again else ""),
                                   same_again)
