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
from pathlib import Path
from typing import Any

from train.errors import ConfigError, LogFileError


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


def open_log(path: str | Path | None, key: str) -> JsonLines | None:
    """The log at ``path``; None when the setting is unset."""
    return JsonLines(path, key) if path else None
