"""Running ingest tasks side by side: a failure ends the job instead of waiting for
every task still queued."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.shards.tasks import run_tasks


def _task(i: int, done: str) -> int:
    if i == 0:
        raise ValueError("the first task fails")
    time.sleep(0.2)
    (Path(done) / str(i)).touch()
    return i


@pytest.mark.parametrize("processes", [False, True])
def test_a_failed_task_stops_the_queued_ones(tmp_path, processes):
    """`mae shard` to a stalled server: each shard failed after its deadline, and the
    job went on through every queued shard (21 x 9 s) before reporting the first."""
    calls = [(i, str(tmp_path)) for i in range(40)]
    with pytest.raises(ValueError, match="the first task fails"):
        for _ in run_tasks(_task, calls, list(range(40)), workers=2, processes=processes):
            pass
    assert len(list(tmp_path.iterdir())) <= 6  # the ones already running or handed to a process, not 39
