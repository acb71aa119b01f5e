"""The per-step JSON-lines logs: a record half written by a run that stopped (a full
disk, kill -9) is dropped when the run resumes, not glued to the next record."""

from __future__ import annotations

import json

from train.logfiles import JsonLines


def _reopened(path, text: str) -> list[str]:
    path.write_text(text)
    log = JsonLines(path, "log.metrics_file")
    log.write({"step": 3})
    log.close()
    return path.read_text().splitlines()


def test_a_torn_last_record_is_dropped_on_reopen(tmp_path):
    """It was: `{"step": 2, "lo{"step": 3}`, and `mae plot run` refused the file."""
    path = tmp_path / "metrics.jsonl"
    assert _reopened(path, '{"step": 1}\n{"step": 2, "lo') == ['{"step": 1}', '{"step": 3}']
    assert _reopened(path, '{"step": 1}\n{"step": 2}\n') == ['{"step": 1}', '{"step": 2}', '{"step": 3}']
    assert _reopened(path, '{"step": 1, "lo') == ['{"step": 3}']


def test_a_torn_record_longer_than_one_read_is_dropped_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    torn = json.dumps({"step": 2, "ids": list(range(40_000))})[:-5]  # ~230 KB, several reads back
    assert _reopened(path, '{"step": 1}\n' + torn) == ['{"step": 1}', '{"step": 3}']
