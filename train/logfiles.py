"""The JSON-lines files a run appends a record to each step (``log.metrics_file``,
``log.sample_ids_dir``), with errors that name the setting.

A file that cannot be opened is a ``ConfigError`` before the first step. One that
cannot be written later (a full disk) stops the run with a ``LogFileError``: a run
that went on would leave a log with a hole, which a plot or a sample audit would
read as the truth. The last checkpoint is intact, so the run resumes once there is
room.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from train.errors import ConfigError, LogFileError

log = logging.getLogger(__name__)


class JsonLines:
    """``log = JsonLines(path, "log.metrics_file")``, ``log.write(record)``, ``log.close()``."""

    def __init__(self, path: str | Path, key: str) -> None:
        self.path, self.key = Path(path), key
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigError(f"{key} {self.path}: {self.path.parent} is not a folder") from None
        except OSError as e:
            raise ConfigError(f"{key} {self.path}: cannot make its folder ({e.strerror or e})") from None
        try:
            _drop_torn_tail(self.path)
            self._file = open(self.path, "a")
        except OSError as e:
            raise ConfigError(f"{key} {self.path}: cannot open it to append to ({e.strerror or e})") from None

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            raise LogFileError(f"{self.key} {self.path}: cannot write to it ({e.strerror or e}); the run stops with "
                               "its last checkpoint intact: make room or set another path, then resume") from None

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:  # the buffer was flushed after each record, or its error already stopped the run
            pass


def _drop_torn_tail(path: Path, chunk: int = 1 << 16) -> None:
    """Cut a regular file back to its last newline: a run stopped mid-write (a full
    disk, kill -9) left half a record, which the resumed run's next record would
    have been glued onto."""
    if not path.is_file():
        return
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            newline = f.read(pos - start).rfind(b"\n")
            if newline >= 0:
                pos = start + newline + 1
                break
            pos = start
        if pos < end:
            log.warning("%s: dropped a partial last record (%d bytes) left by a run that stopped while writing it",
                        path, end - pos)
            f.truncate(pos)


def open_log(path: str | Path | None, key: str) -> JsonLines | None:
    """The log at ``path``; None when the setting is unset."""
    return JsonLines(path, key) if path else None


SUMMARY_NAME = "run_summary.json"


def write_run_summary(directory: str | Path, summary: dict[str, Any]) -> None:
    """``run_summary.json`` of a run (rank 0). A relaunch that trained nothing (it
    resumed a finished run) keeps the summary of the run that did the training,
    which it used to overwrite with zeros."""
    path = Path(directory) / SUMMARY_NAME
    if not summary.get("images") and path.exists():
        log.info("the run had already finished: %s kept as it was", path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
