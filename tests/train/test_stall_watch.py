"""The stall watch (``log.stall_dump_s``): a job that makes no optimizer step for
that long writes every thread's stack to stderr, again each interval while it stays
stuck, and nothing once it steps again or has ended."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.training import ROOT, mae_pretrain, run_cmd

HEADER = "(log.stall_dump_s=1); the stack of every thread:"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_a_stuck_job_names_its_frames_each_interval_and_a_stepping_one_writes_nothing():
    out = _python("""
        import threading, time
        from train.signals import stall_watch

        def waiting_on_a_peer():
            threading.Event().wait(2.6)  # stuck, as in a collective: two intervals and a half

        with stall_watch.armed(1.0):
            for _ in range(15):  # stepping every 0.1 s: never stalled
                time.sleep(0.1)
                stall_watch.beat()
            print("stepped", flush=True)
            waiting_on_a_peer()
            stall_watch.beat()
            print("stuck", flush=True)
        time.sleep(1.5)  # ended: the watch is off
        print("ended", flush=True)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["stepped", "stuck", "ended"]
    assert out.stderr.count(HEADER) == 2, out.stderr
    assert out.stderr.count("in waiting_on_a_peer") == 2  # the frame that waits, named in each dump
    assert out.stderr.count("rank 0 (process ") == 2 and "stall-watch" not in out.stderr  # not the watcher itself


def test_an_arming_inside_another_is_a_no_op():
    """The inner one's end leaves the outer watching at its own interval (it had
    set the shared interval to 0: 18,402 dumps in half a second)."""
    out = _python("""
        import threading
        from train.signals import stall_watch

        def stuck():
            threading.Event().wait(2.5)

        with stall_watch.armed(1.0):
            with stall_watch.armed(1.0):
                pass
            stuck()
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count(HEADER) == 2, out.stderr[-2000:]


def test_zero_turns_the_watch_off():
    out = _python("""
        import time
        from train.signals import stall_watch

        with stall_watch.armed(0):
            time.sleep(1.5)
    """)
    assert out.returncode == 0 and out.stderr == "", out.stderr


@pytest.mark.integration
def test_a_training_run_held_inside_a_save_dumps_the_save_and_ends_well(shards, tmp_path):
    """`mae pretrain` with a save held 3 s (the fault drill) and a 1 s watch: the
    dumps name the checkpoint save, the run ends 0 with its 8 steps, and the watch
    is off before the process ends."""
    run = tmp_path / "run"
    out = run_cmd(mae_pretrain(shards, run, "log.stall_dump_s=1", "faults.slow_save_s=3"), run)
    assert out.returncode == 0, out.stderr[-4000:]
    dumps = out.stderr.split(HEADER)[1:]
    assert len(dumps) >= 2, out.stderr[-4000:]  # two 3 s saves (steps 4 and 8)
    assert sum('train/checkpoint.py", line' in d and "in save" in d for d in dumps) >= 2
    assert "thread MainThread:" in dumps[0] and "thread checkpoint-lock-heartbeat:" in "".join(dumps)  # every thread
    after_a_step = out.stderr.split("step 1/8", 1)[1]
    first = re.search(r"no optimizer step for (\d+) s", after_a_step)
    assert first and int(first.group(1)) < 3  # each step starts the count again


def test_the_watch_is_a_config_option_checked_like_the_others():
    from train.config import ConfigError, load_config

    assert load_config("tiny_cpu", []).log.stall_dump_s == 300  # half DeepSpeed's 10-minute group timeout
    assert load_config("tiny_cpu", ["log.stall_dump_s=0"]).log.stall_dump_s == 0
    for bad in ("-1", "nan", "1e9", "0.001"):
        with pytest.raises(ConfigError, match="log.stall_dump_s"):
            load_config("tiny_cpu", [f"log.stall_dump_s={bad}"])


def test_a_job_the_tests_wait_on_too_long_fails_with_every_process_stack_and_leaves_nothing_running(tmp_path):
    """The harness side (``run_cmd``): a launcher whose worker, in a session of its
    own as torchrun's ranks are, hangs."""
    worker = "import os, time\ndef held_in_a_collective():\n    print(os.getpid(), flush=True)\n    time.sleep(120)\n" \
             "held_in_a_collective()"
    launcher = ("import subprocess, sys\n"
                f"subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True).wait()")
    with pytest.raises(AssertionError, match="still running after 5 s") as failed:
        run_cmd([sys.executable, "-c", launcher], tmp_path, timeout=5)
    assert "held_in_a_collective" in str(failed.value)  # the worker's frame, from its own stack dump
    worker_pid = int((tmp_path / "log.txt").read_text().split()[0])
    assert not _running(worker_pid)


def _running(pid: int) -> bool:
    """Alive, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_single_hung_process_is_aborted_with_its_own_stacks(tmp_path):
    """`mae pretrain` is one process: the root itself is aborted first, not only
    what runs below it."""
    code = "import time\ndef held_in_a_read():\n    time.sleep(120)\nheld_in_a_read()"
    with pytest.raises(AssertionError, match="still running after 3 s") as failed:
        run_cmd([sys.executable, "-c", code], tmp_path, timeout=3)
    assert "held_in_a_read" in str(failed.value)
