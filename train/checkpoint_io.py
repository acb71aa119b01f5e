"""Checkpoint files in and out: hashed on the way to disk, read as plain data only.

- ``RecordingCheckpointEngine`` takes the place of DeepSpeed's torch checkpoint
  engine on a built engine. Each file DeepSpeed saves streams through sha256 to disk,
  is fsynced and recorded as ``FileRecord(bytes, sha256)``; a storage error (disk
  full, read-only, vanished) is recorded instead of raised, so no rank dies inside
  DeepSpeed's save while the others wait at its barrier — the checkpoint manager
  agrees on the outcome afterwards. Its ``load`` is ``load_plain``.
- ``plain_data_only()``: inside it every ``torch.load`` — DeepSpeed's own, which
  asks for full unpickling — runs with ``weights_only=True`` and only DeepSpeed's
  plain-data classes allowed. ``load_plain(file)`` reads one file that way and
  refuses one that needs anything else, naming it (``UnsafeCheckpointError``).
- ``storage_problem(error)``: an ``OSError`` in words a user can act on.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from train.errors import CheckpointIntegrityError, UnsafeCheckpointError

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"

# errno -> (what happened, what the run needs)
STORAGE_PROBLEMS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("disk full", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space"),
    errno.EFBIG: ("file size limit exceeded", "a larger file size limit"),
    errno.EROFS: ("read-only file system", "write access"),
    errno.EACCES: ("permission denied", "write access"),
    errno.EPERM: ("permission denied", "write access"),
    errno.ENOENT: ("vanished (deleted, moved or unmounted)", "the storage mounted where the run started"),
    errno.ESTALE: ("vanished (stale file handle)", "the storage mounted where the run started"),
    errno.ENODEV: ("vanished (no such device)", "the storage mounted where the run started"),
    errno.EIO: ("input/output error", "working storage"),
    errno.EEXIST: ("a file is in the way", "a folder"),
    errno.ENOTDIR: ("a file is in the way", "a folder"),
}


@dataclass(frozen=True)
class FileRecord:
    bytes: int
    sha256: str


def storage_problem(error: BaseException) -> tuple[str, str]:
    """(what happened, what the run needs) for a storage error."""
    code = getattr(error, "errno", None)
    if code in STORAGE_PROBLEMS:
        return STORAGE_PROBLEMS[code]
    return f"{type(error).__name__}: {error}", "working storage"


class _HashingFile:
    """A write-only file object that hashes what passes through it and keeps the
    ``OSError`` it hit (torch.save turns it into a bare 'iostream error')."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self.sha256, self.size = f, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            written = self._f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha256.update(data)
        self.size += len(data)
        return written

    def flush(self) -> None:
        self._f.flush()


def write_hashed(path: Path, write: Callable[[BinaryIO], Any]) -> FileRecord:
    """Write ``path`` with ``write(file)``, fsync it; its size and sha256 as written.
    Raises the ``OSError`` the storage gave, whatever the writer turned it into."""
    with open(path, "wb") as f:
        hashing = _HashingFile(f)
        try:
            write(hashing)
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            raise
        except Exception as e:
            if hashing.error is not None:
                raise hashing.error from e
            raise
    return FileRecord(hashing.size, hashing.sha256.hexdigest())


def _plain_data_classes() -> list[type]:
    """DeepSpeed's own plain-data classes that its checkpoints pickle."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def plain_data_only() -> Iterator[None]:
    """Every ``torch.load`` inside runs with ``weights_only=True``, even where the
    caller (DeepSpeed) asks for ``weights_only=False``."""
    saved = {k: os.environ.pop(k, None) for k in (FORCE_WEIGHTS_ONLY, FORCE_NO_WEIGHTS_ONLY)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_plain_data_classes()):
            yield
    finally:
        os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def load_plain(path: str | os.PathLike[str], map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` of plain data (tensors, containers, DeepSpeed's enums); a file
    that needs arbitrary unpickling is refused with a message naming it
    (``UnsafeCheckpointError``), one that is not a torch file at all is a
    ``CheckpointIntegrityError``. ``mmap``: map the tensor data instead of reading
    it — checks what a file would unpickle at the cost of its small pickle alone."""
    with plain_data_only():
        try:
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsafeCheckpointError(f"refusing {path}: it is not plain tensor data and could run code when "
                                        f"unpickled ({first})") from e
        except Exception as e:  # a damaged zip, a truncated or foreign file
            raise CheckpointIntegrityError(f"cannot read {path}: {type(e).__name__}: {e}") from e


class RecordingCheckpointEngine:
    """DeepSpeed's checkpoint-engine interface: saves hashed and recorded, storage
    errors kept (the first one) instead of raised, loads of plain data only."""

    def __init__(self, zipfile_serialization: bool = True) -> None:
        self.zipfile_serialization = zipfile_serialization
        self.name = "maescale-recording"
        self.folder: Path | None = None
        self.written: dict[str, FileRecord] = {}
        self.failure: tuple[Path, BaseException] | None = None

    @classmethod
    def install(cls, engine: Any) -> RecordingCheckpointEngine:
        """Put a recording engine in place of a built DeepSpeed engine's torch one."""
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        current = engine.checkpoint_engine
        if isinstance(current, cls):
            return current
        if type(current) is not TorchCheckpointEngine:
            raise ValueError(f"DeepSpeed's checkpoint engine is {type(current).__name__}; maescale needs the "
                             "torch one (remove the 'checkpoint' writer keys from deepspeed.raw)")
        recorder = cls(current.zipfile_serialization)
        engine.checkpoint_engine = recorder
        copy_script = getattr(engine, "_copy_recovery_script", None)
        if copy_script is not None:  # rank 0 copies zero_to_fp32.py with shutil, outside the engine
            engine._copy_recovery_script = lambda save_path: recorder.guard(Path(save_path),
                                                                            lambda: copy_script(save_path))
        return recorder

    def start(self, folder: Path) -> None:
        """A new checkpoint folder: forget what the last save recorded."""
        self.folder, self.written, self.failure = folder, {}, None

    def record(self, path: Path, write: Callable[[BinaryIO], Any]) -> None:
        """Write one file of the checkpoint, unless an earlier one already failed."""
        if self.failure is not None:
            return
        assert self.folder is not None, "start() a checkpoint folder first"
        path = Path(path)
        try:
            relative = path.resolve().relative_to(self.folder.resolve()).as_posix()
            self.written[relative] = write_hashed(path, write)
        except (OSError, ValueError) as e:  # ValueError: a path outside the checkpoint's folder
            self.failure = (path, e)

    def guard(self, path: Path, action: Callable[[], Any]) -> None:
        """Run a storage action DeepSpeed does outside ``save`` (makedirs, copying its
        recovery script), keeping its error like a failed save."""
        if self.failure is not None:
            return
        try:
            action()
        except OSError as e:
            self.failure = (Path(path), e)

    # -- DeepSpeed's CheckpointEngine interface
    def create(self, info: Any) -> None:
        pass

    def save(self, state_dict: Any, path: str) -> None:
        self.record(Path(path), lambda f: torch.save(state_dict, f,
                                                     _use_new_zipfile_serialization=self.zipfile_serialization))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.guard(Path(path), lambda: os.makedirs(path, exist_ok=exist_ok))

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_plain(path, map_location)

    def commit(self, info: Any) -> bool:
        return True

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return dp_rank == 0

    def is_decoupled(self) -> bool:
        return False

    def set_commit_info(self, info: Any) -> None:
        pass

    def get_commit_info(self) -> None:
        return None

    def cleanup(self) -> None:
        pass

    def preserves_storage_sharing(self) -> bool:
        return True
