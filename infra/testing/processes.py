"""Processes the tests and the chaos soak start: killing a launched job the way a
dead node does (the launcher and every process it started, at once, with no chance
to react), and stopping the servers the test harness started.

``torchrun`` starts each rank in a session of its own, so ``killpg`` of the
launcher's group leaves the ranks running (and finishing the run). ``kill_tree``
finds every descendant through /proc, stops them all (SIGSTOP: nobody can notice
the others dying and react, e.g. by a graceful save), then SIGKILLs them.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from pathlib import Path


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, parents first."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def kill_tree(pid: int) -> list[int]:
    """SIGSTOP then SIGKILL ``pid`` and all its descendants; returns the pids."""
    pids = descendants(pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        _signal(pids, sig)
    return pids


def _signal(pids: list[int], sig: signal.Signals) -> None:
    """``sig`` to each of ``pids``; one that has exited meanwhile is skipped."""
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _no_core_files() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an aborted process leaves no core file behind


def dumping_stacks() -> dict:
    """Popen arguments for a job ``abort_with_stacks`` may end: it writes every
    thread's stack when aborted (SIGABRT), and no core; the environment as it is now."""
    return {"env": dict(os.environ, PYTHONFAULTHANDLER="1"), "preexec_fn": _no_core_files}


def abort_with_stacks(pid: int, settle_s: float = 3.0) -> list[int]:
    """For a job that hangs: SIGABRT to ``pid`` and every process below it, children
    first (with ``PYTHONFAULTHANDLER=1`` in their environment each writes every
    thread's stack to its stderr, then dies), then SIGKILL to each of them and to
    any found below since, so no rank is left running in a session of its own (one
    reparented when its parent died is in the first list). Returns the pids."""
    pids = descendants(pid)
    _signal(pids[::-1], signal.SIGABRT)
    time.sleep(settle_s)
    _signal(list(dict.fromkeys(pids + descendants(pid))), signal.SIGKILL)
    return pids


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)
