"""Atomic local writes: a reader sees the old file or the whole new one, never a part;
and bounded reads of a file a user names.

Write to a temporary name in the same folder, flush it to disk, then ``os.replace``
(atomic on POSIX). Every local file the project writes for others to read —
checkpoint markers, safetensors exports, shard copies, Prometheus target files —
goes through here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; when the block ends without error the
    file written there replaces ``path``, else it is removed."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temp_beside(path: str | os.PathLike[str]) -> Path:
    """Where this process writes ``path`` before renaming it in place: hidden, and
    named by the pid, so ``remove_dead_temps`` knows a killed writer's."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_dead_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files ``atomic_path`` left in ``directory`` when its
    process was killed mid-write (their pid no longer runs); returns them."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def staging_dir(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary folder named ``<prefix><pid>-...``, after removing the ones of
    this prefix whose process is gone: a worker killed mid-task (a lost Ray worker,
    the OOM killer) never ran its clean-up, and each held up to a shard."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{prefix}*-*"):
        pid = old.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


_KINDS = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a named pipe", stat.S_ISCHR: "a character device",
          stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}


class NotAFileError(OSError):
    """A path that is a directory, a pipe, a device or a socket where a file was
    expected: reading it would fail, block for a writer or never end."""

    def __init__(self, path: str | os.PathLike[str], kind: str) -> None:
        super().__init__(f"{path} is {kind}, not a file")
        self.strerror, self.filename = f"{kind}, not a file", os.fspath(path)

    def __str__(self) -> str:
        return f"{self.filename} is {self.strerror}"


class ForeignFolderError(OSError):
    """A folder a tool would write into (and clear parts of) that it did not make."""

    def __str__(self) -> str:
        return str(self.args[0])


def claim_folder(path: str | os.PathLike[str], marker: str, tool: str) -> Path:
    """``path`` as a folder ``tool`` may clear parts of: new, empty, or marked by an
    earlier ``claim_folder`` with ``marker`` — never a folder of the user's (``.``,
    ``~``, a typo). Made if missing, and marked."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ForeignFolderError(f"{path} is a file; {tool} needs a new or empty folder")
        if not (path / marker).is_file() and any(path.iterdir()):
            raise ForeignFolderError(f"{path} is not empty and was not made by {tool} (no {marker} in it); give a "
                                     f"new or empty folder: {tool} replaces what it made there")
    path.mkdir(parents=True, exist_ok=True)
    (path / marker).write_text(f"made by {tool}, which may replace what is in this folder\n")
    return path


def require_regular(path: str | os.PathLike[str]) -> None:
    """Raise ``NotAFileError`` unless ``path`` (links followed) is a regular file."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotAFileError(path, next((name for test, name in _KINDS.items() if test(mode)), "not a regular file"))


def read_regular(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (else ``NotAFileError``), at most
    ``limit`` of them: a longer file raises ValueError."""
    require_regular(path)
    with open(path, "rb") as f:
        data = f.read(-1 if limit is None else limit + 1)
    if limit is not None and len(data) > limit:
        raise ValueError(f"{path} is over {limit:,} bytes")
    return data
