"""Whole objects on any fsspec filesystem: hashing and atomic writes.

A reader never sees part of an object we write: local files go through a
temporary name and a rename; on an object store one PUT is atomic.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import PurePosixPath

import fsspec
from fsspec.implementations.local import LocalFileSystem

from infra.files import atomic_path
from pipeline.storage.config import RetryPolicy
from pipeline.storage.retry import with_retries

READ_BLOCK = 8 * 2**20  # large sequential reads


def sha256_file(path: str | os.PathLike[str], fs: fsspec.AbstractFileSystem | None = None) -> str:
    """sha256 of a local file, or of ``path`` on ``fs``, read in large blocks."""
    digest = hashlib.sha256()
    with (fs.open(path, "rb", block_size=READ_BLOCK) if fs is not None else open(path, "rb")) as f:
        while chunk := f.read(READ_BLOCK):
            digest.update(chunk)
    return digest.hexdigest()


def put_file(fs: fsspec.AbstractFileSystem, local: str, remote: str, retry: RetryPolicy) -> None:
    """Copy a local file to ``remote`` atomically."""
    if isinstance(fs, LocalFileSystem):
        with atomic_path(remote) as tmp:
            shutil.copyfile(local, tmp)
    else:
        with_retries(f"upload {PurePosixPath(remote).name}", remote, lambda: fs.put_file(local, remote), retry)


def put_bytes(fs: fsspec.AbstractFileSystem, remote: str, data: bytes, retry: RetryPolicy) -> None:
    """Write ``data`` to ``remote`` atomically."""
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
    try:
        put_file(fs, f.name, remote, retry)
    finally:
        os.unlink(f.name)
