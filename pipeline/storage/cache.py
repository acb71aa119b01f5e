"""Local on-disk LRU cache of verified shards, shared by every process on a node.

Entries are named by their sha256, so a cached file is valid by construction;
a name that is not exactly a sha256 digest is refused, so no entry, lock or part
file can lie outside the cache directory.
Recency is the file's mtime (touched on every hit). Readers hold a shared
``flock`` on an entry while they use it; eviction takes an exclusive lock without
blocking and skips entries in use, so a shard is never deleted under a reader.
The size limit is soft only while more than the limit is pinned by readers.
A pin ends when its reader closes the entry, also for processes forked meanwhile
(DataLoader workers), which share the open file but not the reader.

The cache's total size is kept in a ledger file that every commit adds to under a
lock, so a commit lists the folder (a ``stat`` per entry) only when the total runs
over the limit. A cache of many entries then evicts a little below its limit
(``eviction_target``), so that the next downloads need no listing: with 20,000
entries a listing costs ~0.1-0.3 s of CPU, which every commit paid before. A
ledger that is missing or unreadable is rebuilt by the next listing, and every
listing rewrites it with what it found.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import ShardFetchError
from pipeline.storage.objects import is_sha256

log = logging.getLogger(__name__)
LEDGER_NAME = "ledger"  # the total size of the entries, in bytes, as decimal text
SLACK_MIN_ENTRIES = 256  # below this a listing is cheap: evict exactly to the limit
SLACK_FRACTION = 32  # above it, evict to limit - limit / SLACK_FRACTION


def eviction_target(limit: int, entries: int) -> int:
    """The size eviction brings a cache of ``entries`` entries down to once it has
    run over ``limit`` (``mae simulate`` models the same rule)."""
    return limit - limit // SLACK_FRACTION if entries > SLACK_MIN_ENTRIES else limit


class _PinnedEntry(io.BufferedReader):
    """A cache entry open for reading under a shared ``flock``. Closing unlocks
    first: a process forked while it was open (a DataLoader worker) holds the same
    open file, and with it the lock, until it exits or closes its copy, which it
    never uses; without the unlock the entry would stay unevictable that long."""

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(OSError, ValueError):
                fcntl.flock(self, fcntl.LOCK_UN)
        super().close()


class ShardCache:
    def __init__(self, directory: str | os.PathLike[str], limit_bytes: int) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"cache limit must be positive, got {limit_bytes}")
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ShardFetchError(f"cannot use {self.dir} as the shard cache ({e.strerror or e}): point "
                                  "data.storage.cache_dir, or MAESCALE_CACHE, at a folder this process may write") from None
        self.limit_bytes = limit_bytes

    def _file(self, digest: str, suffix: str) -> Path:
        if not is_sha256(digest):
            raise ValueError(f"shard cache entries are named by sha256 digests, got {digest[:80]!r}")
        return self.dir / f"{digest}{suffix}"

    def _path(self, digest: str) -> Path:
        return self._file(digest, ".tar")

    def get(self, digest: str) -> Path | None:
        path = self._path(digest)
        try:
            os.utime(path)  # LRU touch
        except FileNotFoundError:
            return None
        return path

    def temp_path(self, digest: str) -> Path:
        """Where a download in progress lives; kept across retries so it can resume."""
        return self._file(digest, ".part")

    @contextlib.contextmanager
    def download_lock(self, digest: str) -> Iterator[None]:
        """One downloader per shard across processes; others wait, then hit."""
        with open(self._file(digest, ".lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def commit(self, digest: str, tmp: Path) -> tuple[Path, BinaryIO]:
        """Move a finished download into the cache; it comes back opened and
        pinned, pinned before eviction runs, so no other thread's or process's
        eviction can take it before its reader opens it."""
        f = self.open_pinned(tmp)  # the lock stays with the file through the rename
        path = self._path(digest)
        try:
            size = os.fstat(f.fileno()).st_size
            os.replace(tmp, path)
        except BaseException:
            f.close()
            raise
        total = self._add_to_ledger(size)
        if total is None or total > self.limit_bytes:
            self.evict()
        return path, f

    def open_pinned(self, path: Path) -> BinaryIO:
        """An entry opened for reading with a shared lock held while it is open, so
        eviction leaves it alone (an unlinked-but-open file stays readable).
        Raises FileNotFoundError if it was evicted in between."""
        f = _PinnedEntry(io.FileIO(path, "rb"))
        try:
            fcntl.flock(f, fcntl.LOCK_SH)
        except BaseException:
            f.close()
            raise
        return f

    @contextlib.contextmanager
    def _ledger(self) -> Iterator[int | None]:
        """The ledger's file descriptor under an exclusive lock (None when it cannot
        be opened: each caller then does without)."""
        try:
            fd = os.open(self.dir / LEDGER_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)  # never a link out
        except OSError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # closing releases the lock

    def _add_to_ledger(self, size: int) -> int | None:
        """The total after adding ``size``; None when the ledger is missing,
        unreadable or torn (the caller lists the folder, which rewrites it)."""
        with self._ledger() as fd:
            if fd is None:
                return None
            text = os.pread(fd, 32, 0)
            if not text.strip().isdigit():
                return None
            total = int(text) + size
            _write_ledger(fd, total)
            return total

    def evict(self) -> int:
        """List the entries and delete least-recently-used unpinned ones until the
        total is at most ``eviction_target``; the ledger is rewritten with what is
        left. Returns the bytes freed."""
        with self._ledger() as fd:  # one listing at a time; commits wait for its total
            entries = []
            with os.scandir(self.dir) as listing:
                for entry in listing:
                    if entry.name.endswith(".tar"):
                        with contextlib.suppress(FileNotFoundError):
                            st = entry.stat(follow_symlinks=False)
                            entries.append((st.st_mtime, st.st_size, Path(entry.path)))
            total = sum(size for _, size, _ in entries)
            target = eviction_target(self.limit_bytes, len(entries))
            freed = 0
            for _, size, path in sorted(entries):
                if total <= target:
                    break
                try:
                    with open(path, "rb") as f:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        path.unlink()
                except (BlockingIOError, FileNotFoundError):
                    continue  # in use by a reader, or already gone
                total -= size
                freed += size
            if fd is not None:
                _write_ledger(fd, total)
        if total > self.limit_bytes:
            log.debug("shard cache over its limit (%d > %d bytes): entries in use", total, self.limit_bytes)
        return freed


def _write_ledger(fd: int, total: int) -> None:
    data = f"{total}\n".encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
