"""Checkpoint storage that fails for real: a small tmpfs that fills up, one remounted
read-only, a checkpoint directory that vanishes under the run. Each ends with one
line naming the path and what the run needs, a non-zero exit, and the previous
checkpoint intact (it verifies)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.training import (error_lines, mae_pretrain, run_cmd, start, torchrun, wait_for)
from train.checkpoint import complete_tags, verify

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` at ``path`` (needs root: mount)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); these tests need root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def assert_one_clear_line(stderr: str, *needles: str) -> str:
    errors = error_lines(stderr)
    assert errors and all(e.split(": ", 1)[-1] == errors[0].split(": ", 1)[-1] for e in errors), stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    launcher = 1 if "ChildFailedError" in stderr else 0  # torchrun reports a failed rank with its own traceback
    assert stderr.count("Traceback (most recent call last)") == launcher and "iostream" not in stderr
    return errors[0]


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(shards, tmp_path):
    """Two ranks, a 3 MiB tmpfs: the step-4 checkpoint (~2 MiB) fits, the step-8 one
    does not. Both ranks stop with the same line; step 4 still verifies."""
    with tmpfs(tmp_path / "disk", "3m") as disk:
        run = tmp_path / "run"
        out = run_cmd(torchrun(shards, run, "deepspeed.stage=2", f"checkpoint.dir={disk / 'ckpt'}"), run)
        assert out.returncode != 0
        line = assert_one_clear_line(out.stderr, "CheckpointStorageError", "disk full", "free for it",
                                     f"cannot write checkpoint {disk}/ckpt/step000000008",
                                     "the previous checkpoint step000000004 is intact")
        assert "MiB free for it" in line
        assert complete_tags(disk / "ckpt") == ["step000000004"]
        verify(disk / "ckpt" / "step000000004")
        assert not (disk / "ckpt" / "step000000008").exists()  # the partial one is removed, freeing the space


def test_read_only_storage_at_start_is_one_line(shards, tmp_path):
    with tmpfs(tmp_path / "ro", "1m") as disk:
        remount_read_only(disk)
        run = tmp_path / "run"
        out = run_cmd(mae_pretrain(shards, run, f"checkpoint.dir={disk / 'ckpt'}"), run)
        assert out.returncode == 1
        assert_one_clear_line(out.stderr, f"cannot use checkpoint.dir {disk / 'ckpt'}", "read-only file system",
                              "the run needs write access there")


def test_storage_turning_read_only_mid_run_is_one_line_and_keeps_the_checkpoint(shards, tmp_path):
    with tmpfs(tmp_path / "disk", "16m") as disk:
        run = tmp_path / "run"
        proc = start(mae_pretrain(shards, run, f"checkpoint.dir={disk / 'ckpt'}", "schedule.max_steps=400"), run)
        wait_for(lambda: (disk / "ckpt" / "latest").exists() and (disk / "ckpt" / "latest").read_text() ==
                 "step000000004", proc=proc)
        remount_read_only(disk)
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 1
        assert_one_clear_line(output, "read-only file system", "write access")
        assert complete_tags(disk / "ckpt")[0] == "step000000004"
        for tag in complete_tags(disk / "ckpt"):
            verify(disk / "ckpt" / tag)


def test_a_checkpoint_directory_that_vanishes_is_one_line(shards, tmp_path):
    """The directory is moved away mid-run (an unmount looks the same): the run
    stops at its next save or heartbeat instead of writing a fresh directory."""
    run = tmp_path / "run"
    ckpt = tmp_path / "store" / "ckpt"
    proc = start(mae_pretrain(shards, run, f"checkpoint.dir={ckpt}", "schedule.max_steps=400"), run)
    wait_for(lambda: (ckpt / "latest").exists() and (ckpt / "latest").read_text() == "step000000004", proc=proc)
    ckpt.rename(tmp_path / "store" / "moved")
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1
    line = assert_one_clear_line(output, "cannot write checkpoint", "vanished")
    assert str(ckpt) in line
    assert not ckpt.exists()  # nothing recreated on the wrong disk
    verify(tmp_path / "store" / "moved" / "step000000004")
