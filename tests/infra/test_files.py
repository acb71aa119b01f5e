"""Atomic writes leave nothing behind, and what a killed writer left is removed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from infra.files import atomic_path, atomic_write, remove_dead_temps


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write(tmp_path / "f.json", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_temporaries_of_dead_writers_go_those_of_live_ones_stay(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".shard-000000.tar.tmp-{int(dead.stdout)}"
    live = tmp_path / f".shard-000001.tar.tmp-{os.getpid()}"
    other = tmp_path / "shard-000000.tar"
    for p in (left, live, other):
        p.write_bytes(b"x")
    assert remove_dead_temps(tmp_path) == [left]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_mae_demo_never_replaces_parts_of_a_folder_it_did_not_make(tmp_path):
    # `mae demo --workdir ~` deleted ~/images and ~/run
    from infra.files import ForeignFolderError
    from train.demo import DemoConfig, run_demo

    home = tmp_path / "home"
    (home / "images").mkdir(parents=True)
    (home / "images" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ForeignFolderError, match=r"is not empty and was not made by mae demo \(no .mae-demo in it\)"):
        run_demo(DemoConfig(workdir=home, photos=10, epochs=1))
    assert (home / "images" / "holiday.jpg").read_bytes() == b"precious"


def test_a_killed_workers_staging_folder_is_removed_by_the_next_task():
    # a shard worker killed mid-shard (a lost Ray worker) left /tmp/mae-shard-* behind, up to a shard each
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from infra.files import staging_dir

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    left = Path(tempfile.mkdtemp(prefix=f"mae-test-stage-{dead}-"))
    (left / "shard-000000.tar").write_bytes(b"x" * 1000)
    mine = Path(tempfile.mkdtemp(prefix=f"mae-test-stage-{os.getpid()}-"))  # a live process's: kept
    with staging_dir("mae-test-stage-") as new:
        assert Path(new).name.startswith(f"mae-test-stage-{os.getpid()}-")
        assert not left.exists() and mine.exists()
    mine.rmdir()
