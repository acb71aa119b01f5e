"""One writer per checkpoint directory: the lock file, its holder, staleness,
take-over and the heartbeat (real processes and files; no trainer needed)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest
from tests.helpers.training import wait_for

from infra.files import atomic_write
from train.errors import CheckpointLockError, CheckpointStorageError
from train import run_lock
from train.run_lock import LOCK_NAME, TAKEOVER_NAME, TAKEOVER_STALE_S, RunLock, read_holder, stale_reason, this_process


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write(path, holder) -> None:
    path.write_text(json.dumps(asdict(holder)))


def test_the_lock_names_its_holder_and_goes_away_on_release(tmp_path):
    lock = RunLock(tmp_path / "ckpt", stale_after_s=60)
    lock.acquire()
    holder = read_holder(tmp_path / "ckpt" / LOCK_NAME)
    assert holder.pid == os.getpid() and holder.host == this_process().host and holder.token == lock.holder.token
    lock.check()  # still ours
    lock.release()
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()


def test_a_live_holder_is_refused_in_one_line(tmp_path):
    first = RunLock(tmp_path, stale_after_s=60)
    first.acquire()
    try:
        with pytest.raises(CheckpointLockError) as e:
            RunLock(tmp_path, stale_after_s=60).acquire()
        message = str(e.value)
        assert "in use by another run" in message and f"pid {os.getpid()}" in message and "\n" not in message
    finally:
        first.release()


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path, caplog):
    _write(tmp_path / LOCK_NAME, replace(this_process(), pid=_dead_pid(), pid_start=None))
    lock = RunLock(tmp_path, stale_after_s=3600)
    lock.acquire()
    assert read_holder(tmp_path / LOCK_NAME).pid == os.getpid()
    assert "its process is not running" in caplog.text
    lock.release()


def test_a_reused_pid_is_not_mistaken_for_the_holder():
    me = this_process()
    assert stale_reason(me, 60) is None
    assert "another process" in stale_reason(replace(me, pid_start=(me.pid_start or 0) + 12345), 60)


def test_a_holder_on_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path):
    remote = replace(this_process(), host="other-node", boot_id="x", pid=1)
    assert stale_reason(replace(remote, heartbeat=time.time() - 10), 60) is None
    assert "no heartbeat for" in stale_reason(replace(remote, heartbeat=time.time() - 120), 60)
    _write(tmp_path / LOCK_NAME, replace(remote, heartbeat=time.time()))
    with pytest.raises(CheckpointLockError, match="host other-node pid 1"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    _write(tmp_path / LOCK_NAME, replace(remote, heartbeat=time.time() - 120))
    lock = RunLock(tmp_path, stale_after_s=60)
    lock.acquire()
    assert read_holder(tmp_path / LOCK_NAME).token == lock.holder.token
    lock.release()


def test_a_silent_holder_on_another_host_is_waited_for_then_taken_over(tmp_path, caplog):
    """A relaunch on a new node after a node failure was refused at once, though the
    dead node's lock would go stale within lock_stale_s (docs: "waits at most")."""
    remote = replace(this_process(), host="node17", boot_id="x", pid=1)
    _write(tmp_path / LOCK_NAME, replace(remote, heartbeat=time.time() - 2))  # missed 4 beats of 0.5 s
    lock = RunLock(tmp_path, stale_after_s=3)
    start = time.monotonic()
    lock.acquire()
    assert time.monotonic() - start >= 0.5  # it waited for the lock to go stale
    assert read_holder(tmp_path / LOCK_NAME).token == lock.holder.token
    assert "has not refreshed it for 2s: waiting up to 1s more" in caplog.text
    assert "no heartbeat for" in caplog.text
    lock.release()


def test_a_silent_holder_that_beats_again_is_refused(tmp_path):
    remote = replace(this_process(), host="node17", boot_id="x", pid=1, heartbeat=time.time() - 2)
    _write(tmp_path / LOCK_NAME, remote)
    beat = subprocess.Popen([sys.executable, "-c", f"""if True:
        import json, time
        time.sleep(0.3)
        d = json.load(open({str(tmp_path / LOCK_NAME)!r}))
        d["heartbeat"] = time.time()
        open({str(tmp_path / LOCK_NAME)!r}, "w").write(json.dumps(d))
    """])
    try:
        with pytest.raises(CheckpointLockError, match="in use by another run \\(host node17 pid 1"):
            RunLock(tmp_path, stale_after_s=3).acquire()
    finally:
        beat.wait(timeout=30)


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    """A start on a full disk left an empty LOCK: the next start within 10 s was
    refused with "other runs keep taking it"."""
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointStorageError, match="No space left on device"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    monkeypatch.undo()
    lock = RunLock(tmp_path, stale_after_s=60)
    lock.acquire()
    lock.release()


def test_a_run_that_does_not_save_is_refused_a_folder_a_live_run_holds(tmp_path):
    """It took no lock, resumed from the live run's checkpoints and overwrote its
    run_summary.json, which the Slurm job script reads to decide on a requeue."""
    from train.config import CheckpointConfig
    from train.run_lock import take_run_lock

    cfg = CheckpointConfig(dir=str(tmp_path), enabled=False)
    assert take_run_lock(cfg, rank=0) is None  # no lock there: it may use the folder
    live = RunLock(tmp_path, stale_after_s=60)
    live.acquire()
    try:
        with pytest.raises(CheckpointLockError, match="in use by another run .*checkpoint.enabled=false would still"):
            take_run_lock(cfg, rank=0)
    finally:
        live.release()
    _write(tmp_path / LOCK_NAME, replace(this_process(), pid=_dead_pid(), pid_start=None))
    assert take_run_lock(cfg, rank=0) is None  # a dead holder's lock does not stand in the way
    assert (tmp_path / LOCK_NAME).exists()  # and is left for a run that saves to take over


def test_a_restarted_host_frees_its_locks():
    assert stale_reason(replace(this_process(), boot_id="an-earlier-boot"), 60) == "its host restarted since"


def test_the_heartbeat_refreshes_and_notices_a_take_over(tmp_path):
    lock = RunLock(tmp_path, stale_after_s=5)  # heartbeat every 0.5 s
    lock.acquire()
    first = read_holder(tmp_path / LOCK_NAME).heartbeat
    wait_for(lambda: read_holder(tmp_path / LOCK_NAME).heartbeat > first, timeout=30)
    with lock._mutex:  # another run took it over, whole, between two heartbeats
        atomic_write(tmp_path / LOCK_NAME, json.dumps(asdict(replace(this_process(), host="thief", token="t"))))
    wait_for(lambda: lock.problem is not None, timeout=30)  # the heartbeat noticed by itself
    with pytest.raises(CheckpointLockError, match="lost the lock .* now held by host thief"):
        lock.check()
    lock.release()
    assert read_holder(tmp_path / LOCK_NAME).host == "thief"  # not ours: left alone


def test_a_vanished_directory_is_noticed(tmp_path):
    lock = RunLock(tmp_path / "ckpt", stale_after_s=60)
    lock.acquire()
    (tmp_path / "ckpt").rename(tmp_path / "moved")
    with pytest.raises(CheckpointStorageError, match="vanished"):
        lock.check()
    lock.release()


def test_a_directory_that_cannot_be_written_is_a_storage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointStorageError, match="cannot use checkpoint.dir .*the run needs"):
        RunLock(blocker / "ckpt", stale_after_s=60).acquire()


RACER = """
import sys, time
from pathlib import Path
import train.run_lock as run_lock
from train.errors import CheckpointLockError

real_read = run_lock.read_holder
def slow_read(path):  # shared storage (NFS) where each read takes a while
    holder = real_read(path)
    time.sleep(0.05)
    return holder
run_lock.read_holder = slow_read
root, me = Path(sys.argv[1]), sys.argv[2]
(root.parent / f"ready-{me}").touch()
while not (root.parent / "go").exists():
    time.sleep(0.005)
lock = run_lock.RunLock(root, stale_after_s=3600)
try:
    lock.acquire()
except CheckpointLockError as e:
    print("refused" if "in use by another run" in str(e) else f"error {e}")
    sys.exit(0)
time.sleep(1.0)  # long enough for every other racer to finish its take-over
try:
    lock.check()
except CheckpointLockError as e:
    print(f"lost {e}")
    sys.exit(0)
print("held")
lock.release()
"""


@pytest.mark.parametrize("racers", [2, 5])
def test_relaunches_racing_for_one_stale_lock_leave_it_to_exactly_one(tmp_path, racers):
    """Several relaunches find the same dead holder at once: one takes the lock over,
    every other is refused at the start, and none takes over the winner's new lock
    (storage slowed down as NFS is, so the reads overlap)."""
    root = tmp_path / "ckpt"
    root.mkdir()
    _write(root / LOCK_NAME, replace(this_process(), pid=_dead_pid(), pid_start=None))
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(root), str(i)], stdout=subprocess.PIPE, text=True,
                              stderr=subprocess.DEVNULL) for i in range(racers)]
    wait_for(lambda: all((tmp_path / f"ready-{i}").exists() for i in range(racers)), timeout=120)
    (tmp_path / "go").touch()
    outcomes = sorted(proc.communicate(timeout=120)[0].strip() for proc in procs)
    assert outcomes == ["held"] + ["refused"] * (racers - 1), outcomes
    assert not (root / LOCK_NAME).exists()  # the winner released it


def test_a_take_over_turn_left_by_a_dead_run_is_removed(tmp_path, caplog):
    _write(tmp_path / LOCK_NAME, replace(this_process(), pid=_dead_pid(), pid_start=None))
    turn = tmp_path / TAKEOVER_NAME
    turn.touch()
    old = time.time() - TAKEOVER_STALE_S - 5
    os.utime(turn, (old, old))
    lock = RunLock(tmp_path, stale_after_s=3600)
    lock.acquire()
    assert read_holder(tmp_path / LOCK_NAME).token == lock.holder.token and not turn.exists()
    assert "left 3" in caplog.text and "stopped while taking over the lock" in caplog.text
    lock.release()


def test_a_take_over_turn_from_a_clock_far_ahead_is_refused_in_time(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "TAKEOVER_STALE_S", 0.5)
    _write(tmp_path / LOCK_NAME, replace(this_process(), pid=_dead_pid(), pid_start=None))
    turn = tmp_path / TAKEOVER_NAME
    turn.touch()
    ahead = time.time() + 3600  # written by a host whose clock runs an hour ahead
    os.utime(turn, (ahead, ahead))
    with pytest.raises(CheckpointLockError, match=f"taking over the lock .* remove {turn} if no run is starting"):
        RunLock(tmp_path, stale_after_s=3600).acquire()
    assert read_holder(tmp_path / LOCK_NAME).pid != os.getpid()  # the stale lock was left as it was


def test_a_holder_in_another_pid_namespace_of_this_host_is_judged_by_its_heartbeat(tmp_path, caplog):
    """A run in a container sharing this host's name and boot (docker --network host,
    Kubernetes hostNetwork) has pids that mean nothing here: its lock was taken over
    as soon as its pid was not running here, and the live run died at its next save."""
    ours = this_process()
    assert ours.pid_ns is not None  # Linux: /proc/self/ns/pid
    elsewhere = replace(ours, pid=_dead_pid(), pid_start=None, pid_ns=ours.pid_ns + 1)
    _write(tmp_path / LOCK_NAME, elsewhere)
    with pytest.raises(CheckpointLockError, match="in use by another run"):
        RunLock(tmp_path, stale_after_s=3600).acquire()
    assert stale_reason(elsewhere, 60) is None
    assert stale_reason(replace(elsewhere, heartbeat=time.time() - 120), 60).startswith("no heartbeat for 12")
    assert stale_reason(replace(elsewhere, pid_ns=ours.pid_ns), 60) == "its process is not running"
    _write(tmp_path / LOCK_NAME, replace(elsewhere, heartbeat=time.time() - 7200))
    lock = RunLock(tmp_path, stale_after_s=3600)
    lock.acquire()
    assert read_holder(tmp_path / LOCK_NAME).token == lock.holder.token and "no heartbeat for 7" in caplog.text
    lock.release()


def test_a_lock_written_before_pid_namespaces_were_recorded_still_reads(tmp_path):
    holder = replace(this_process(), pid=_dead_pid(), pid_start=None)
    fields = {k: v for k, v in asdict(holder).items() if k != "pid_ns"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(fields))
    read = read_holder(tmp_path / LOCK_NAME)
    assert read is not None and read.pid_ns is None and read.token == holder.token
    assert stale_reason(read, 60) == "its process is not running"  # judged by its pid, as before


def test_a_dangling_symlink_lock_is_refused_naming_it(tmp_path):
    """It was refused with "other runs keep taking it", though no other run exists."""
    (tmp_path / LOCK_NAME).symlink_to(tmp_path / "gone")
    with pytest.raises(CheckpointLockError, match=f"{LOCK_NAME} is a symbolic link to a missing file .*gone.*remove it"):
        RunLock(tmp_path, stale_after_s=60).acquire()


def test_a_fresh_unreadable_lock_is_given_its_grace_then_taken_over(tmp_path, caplog):
    """An empty LOCK a few seconds old (a creator still writing it, or one that died
    doing so) was refused with "other runs keep taking it"; now it is waited for until
    the grace is over, then taken over."""
    (tmp_path / LOCK_NAME).write_text("")
    lock = RunLock(tmp_path, stale_after_s=60)
    began = time.monotonic()
    lock.acquire()
    assert time.monotonic() - began >= 9 and read_holder(tmp_path / LOCK_NAME).token == lock.holder.token
    assert "it is unreadable" in caplog.text
    lock.release()


def test_a_turn_taken_since_it_was_judged_left_behind_is_given_back(tmp_path, caplog):
    """Two runs judge the same old turn left behind; the first breaks it and takes a
    fresh one; the second's break must not remove that fresh turn."""
    turn = tmp_path / TAKEOVER_NAME
    turn.touch()
    old = time.time() - TAKEOVER_STALE_S - 5
    os.utime(turn, (old, old))
    judged = turn.stat()
    lock = RunLock(tmp_path, stale_after_s=60)
    lock._break_turn(turn, judged, 35.0)  # the first run: the turn it judged, removed
    assert not turn.exists() and "removing" in caplog.text
    caplog.clear()
    turn.touch()  # ... and its fresh turn
    fresh = turn.stat()
    lock._break_turn(turn, judged, 35.0)  # the second run, late with the same judgement
    assert turn.stat().st_ino == fresh.st_ino and "removing" not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [TAKEOVER_NAME]  # nothing left aside


def test_ages_on_the_storage_go_by_its_clock_not_this_hosts(tmp_path, monkeypatch, caplog):
    """This host's clock two minutes ahead of the file server's: a turn written a moment
    ago looked two minutes old and was broken at once, under the run taking over."""
    monkeypatch.setattr(run_lock, "TAKEOVER_STALE_S", 1.0)
    _write(tmp_path / LOCK_NAME, replace(this_process(), pid=_dead_pid(), pid_start=None))
    (tmp_path / TAKEOVER_NAME).touch()  # another run's turn, just taken
    real = time.time
    monkeypatch.setattr(run_lock.time, "time", lambda: real() + 120)
    began = time.monotonic()
    lock = RunLock(tmp_path, stale_after_s=3600)
    lock.acquire()
    assert time.monotonic() - began >= 1.0  # waited for the turn to age by the storage's clock
    assert re.search(r"left [01]s ago", caplog.text), caplog.text
    lock.release()
