"""Whole objects on any fsspec filesystem: hashing, atomic writes, and
``ObjectFolder`` — a folder or bucket prefix whose every call goes through the
one retry policy and whose errors name the URL and endpoint.

A reader never sees part of an object we write: local files go through a
temporary name and a rename; on an object store one PUT is atomic. Buckets are
never created as a side effect of writing: only ``prepare(create_bucket=True)``
creates one, so a misspelled bucket is an error, not a new bucket.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
import xxhash

from infra.files import atomic_path, require_regular
from pipeline.errors import ObjectNotAccessible
from pipeline.storage.config import StorageConfig
from pipeline.storage.retry import no_event, with_retries
from pipeline.storage.urls import filesystem, is_local, join, location

READ_BLOCK = 8 * 2**20  # large sequential reads
_SHA256 = re.compile(r"[0-9a-f]{64}")
_XXH3_128 = re.compile(r"[0-9a-f]{32}")
T = TypeVar("T")
# The checksums a manifest records per shard. sha256 is the interchange digest and
# names cache entries; xxh3-128 costs ~9x less CPU to verify and catches every
# accidental change (bit rot, a damaged or truncated body), but is no defence against
# someone who can write shards (not the manifest) and crafts a collision.
HASHES: dict[str, Callable[[], Any]] = {"sha256": hashlib.sha256, "xxh3_128": xxhash.xxh3_128}
MANIFEST_HASHES = tuple(HASHES)


def is_sha256(text: object) -> bool:
    """Exactly 64 lowercase hex digits: the only strings cache paths are made from."""
    return isinstance(text, str) and _SHA256.fullmatch(text) is not None


def is_xxh3_128(text: object) -> bool:
    """Exactly 32 lowercase hex digits."""
    return isinstance(text, str) and _XXH3_128.fullmatch(text) is not None


def file_digests(path: str | os.PathLike[str], fs: fsspec.AbstractFileSystem | None = None,
                 algorithms: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Digests (names from ``HASHES``) of a local file, or of ``path`` on ``fs``,
    all in one pass of large blocks."""
    digests = {name: HASHES[name]() for name in algorithms}
    with (fs.open(path, "rb", block_size=READ_BLOCK) if fs is not None else open(path, "rb")) as f:
        while chunk := f.read(READ_BLOCK):
            for digest in digests.values():
                digest.update(chunk)
    return {name: digest.hexdigest() for name, digest in digests.items()}


def sha256_file(path: str | os.PathLike[str], fs: fsspec.AbstractFileSystem | None = None) -> str:
    """sha256 of a local file, or of ``path`` on ``fs``, read in large blocks."""
    return file_digests(path, fs)["sha256"]


MIN_TRANSFER_BYTES_PER_S = 1 << 20  # a transfer slower than this, after the timeouts, is a stalled one


def range_past_the_end(e: BaseException) -> bool:
    """S3's 416 for a ranged GET that starts at or past the object's end (an empty
    object, or one shorter than expected), as s3fs raises it."""
    return isinstance(e, OSError) and e.errno == errno.EINVAL and "range" in str(e).lower()


def transfer_limit_s(storage: StorageConfig, nbytes: int) -> float:
    """The longest one attempt to move ``nbytes`` may take: the timeouts, plus the
    bytes at ``MIN_TRANSFER_BYTES_PER_S``. A server that dribbles a byte now and then
    stays under the read timeout for ever; this ends it."""
    return storage.connect_timeout_s + storage.read_timeout_s + nbytes / MIN_TRANSFER_BYTES_PER_S


def cat_limited(fs: fsspec.AbstractFileSystem, path: str, limit: int | None,
                storage: StorageConfig | None = None) -> bytes:
    """A whole object, or with ``limit`` at most ``limit + 1`` bytes of it (so a
    caller can refuse an oversized one without reading all of it). With ``limit``
    and ``storage``, an async client's attempt ends after ``transfer_limit_s``."""
    if limit is None:
        return fs.cat_file(path)
    bounded = {"timeout": transfer_limit_s(storage, limit)} if storage and getattr(fs, "async_impl", False) else {}
    try:
        return fs.cat_file(path, start=0, end=limit + 1, **bounded)
    except OSError as e:
        if range_past_the_end(e):  # S3 answers a range over an empty object with 416
            return b""
        raise


def object_etag(info: dict[str, Any]) -> str | None:
    """The ETag in an fsspec ``info()`` record (S3 ``ETag``, GCS ``etag``), or None
    where the filesystem has none (local files)."""
    etag = info.get("ETag") or info.get("etag")
    return str(etag) if etag else None


# one client per process: a forked worker's threads (a shard's ranges, prefetches)
# that all meet the parent's client at once make one new client, not one each. A
# fresh lock in each child: a parent thread may hold this one when it forks.
_NEW_CLIENT = threading.Lock()


def _fresh_client_lock() -> None:
    global _NEW_CLIENT
    _NEW_CLIENT = threading.Lock()


os.register_at_fork(after_in_child=_fresh_client_lock)


class ObjectFolder:
    """A local folder or an object-store prefix, read and written object by object."""

    def __init__(self, url: str, storage: StorageConfig | None = None,
                 on_event: Callable[[str, int], None] = no_event) -> None:
        self.url = str(url).rstrip("/")
        self.storage = storage or StorageConfig()
        self.on_event = on_event  # retries and errors, for metrics
        self._fs, self.root = filesystem(self.url, self.storage)
        self._fs_pid = os.getpid()
        self.local = is_local(self.url)
        self.where = location(self.url, self.storage)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """This process's filesystem: forked processes (DataLoader workers) get their own."""
        if self._fs_pid != os.getpid():
            with _NEW_CLIENT:
                if self._fs_pid != os.getpid():  # no other thread of this process made it meanwhile
                    # the parent's client stays referenced, never closed here: closing it would
                    # touch connections of the parent's event loop, which does not run in this process
                    self._inherited = self._fs
                    self._fs, _ = filesystem(self.url, self.storage, fresh=True, parent=self._inherited)
                    self._fs_pid = os.getpid()
        return self._fs

    def path(self, name: str) -> str:
        return join(self.root, name)

    def where_of(self, name: str) -> str:
        """How messages name one object of this folder."""
        return location(join(self.url, name), self.storage)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` under the retry policy; errors name ``what`` and this folder."""
        return with_retries(what, self.where, fn, self.storage.retry, self.on_event)

    def read(self, name: str, limit: int | None = None) -> bytes:
        """A whole object (at most ``limit + 1`` bytes when given, so a caller can
        refuse an oversized one without reading all of it)."""
        return self.call(name, lambda: self._cat(name, limit))

    def read_if_exists(self, name: str, limit: int | None = None) -> bytes | None:
        """Like ``read``, or None when the object does not exist."""

        def read() -> bytes | None:
            try:
                return self._cat(name, limit)
            except FileNotFoundError:
                return None

        return self.call(name, read)

    def _cat(self, name: str, limit: int | None) -> bytes:
        if self.local:
            require_regular(self.path(name))  # a pipe would block the reader for good, a device never end
        return cat_limited(self.fs, self.path(name), limit, self.storage)

    def size(self, name: str) -> int:
        return self.call(name, lambda: self.fs.size(self.path(name)))

    def digests(self, name: str, algorithms: tuple[str, ...] = MANIFEST_HASHES) -> dict[str, str]:
        """The object's digests (``file_digests``), read once."""
        return self.call(name, lambda: file_digests(self.path(name), self.fs, algorithms))

    def put_file(self, local: str, name: str) -> None:
        """Copy a local file to ``name`` atomically."""
        remote = self.path(name)
        if self.local:
            os.makedirs(os.path.dirname(remote), exist_ok=True)
            with atomic_path(remote) as tmp:
                shutil.copyfile(local, tmp)
        else:
            # botocore's upload waits for "100 Continue" outside the read timeout: a stalled
            # server held `mae shard` forever. Each attempt of an async one gets a deadline.
            limit = transfer_limit_s(self.storage, os.path.getsize(local))
            deadline = {"timeout": limit} if getattr(self.fs, "async_impl", False) else {}
            self.call(f"upload {name}", lambda: self.fs.put_file(local, remote, **deadline))

    def put_bytes(self, name: str, data: bytes) -> None:
        """Write ``data`` to ``name`` atomically."""
        with tempfile.NamedTemporaryFile(delete=False) as f:
            f.write(data)
        try:
            self.put_file(f.name, name)
        finally:
            os.unlink(f.name)

    def prepare(self, create_bucket: bool = False) -> None:
        """Make sure objects can be written here: a local folder is created; a
        bucket must exist, or is created only when ``create_bucket``."""
        if self.local:
            try:
                os.makedirs(self.root, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise ObjectNotAccessible(f"{self.where} is a file, not a folder; name a folder to write to") from None
            except OSError as e:
                raise ObjectNotAccessible(f"cannot create the folder {self.where}: {e.strerror}") from None
            return
        bucket = self.root.split("/", 1)[0]
        if self.call(f"bucket {bucket!r}", lambda: self._bucket_exists(bucket)):
            return
        if not create_bucket:
            raise ObjectNotAccessible(f"bucket {bucket!r} at {self.where} does not exist; check its name, or create "
                                      "it (mae shard and mae index create it with --create-bucket)")
        self.call(f"create bucket {bucket!r}", lambda: self.fs.mkdir(bucket))

    def _bucket_exists(self, bucket: str) -> bool:
        try:
            if hasattr(self.fs, "call_s3"):  # s3fs.exists() reads a denied bucket as missing
                self.fs.call_s3("head_bucket", Bucket=bucket)
            else:
                self.fs.info(bucket)
        except FileNotFoundError:
            return False
        return True

    def __repr__(self) -> str:
        return f"ObjectFolder({self.where})"


def call_at(url: str, storage: StorageConfig, what: str, fn: Callable[[fsspec.AbstractFileSystem, str], Any]) -> Any:
    """``fn(fs, path)`` for a single URL under the retry policy (list-file entries,
    where each line may name another bucket)."""
    fs, path = filesystem(url, storage)
    return with_retries(what, location(url, storage), lambda: fn(fs, path), storage.retry)
