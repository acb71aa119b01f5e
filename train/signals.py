"""The stop signals, and what they do once a job has ended.

SIGTERM, SIGINT, SIGUSR1 (Slurm's usual warning signal) and SIGHUP (a closed
terminal) stop a running job at the end of its step, saved (``StopSignal`` in
``train.trainer``). After the job has ended (saved, summary written), one of them
(a scheduler's time-limit warning landing late) is only noted: the default
action would end the process with 128 + the signal, which a scheduler counts as a
failed job. A second one still ends the process at once. Light on purpose: the
`mae` console script uses it without importing torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


@contextlib.contextmanager
def signals_noted() -> Iterator[None]:
    """Within: a stop signal is noted on stderr, a second one ends the process at
    once; the handlers are restored after, for a program that goes on."""
    restore = _note_signals()
    try:
        yield
    finally:
        restore()


def exiting_with(code: int) -> int:
    """``code``, with stop signals noted for the rest of the process: an entry
    point's last step before the interpreter's own teardown."""
    _note_signals()  # never undone: the process ends
    return code


def _note_signals() -> Callable[[], None]:
    """Note stop signals from now on; returns what undoes it. A watcher thread
    counts them, woken through the signal wakeup fd, so a second signal ends the
    process even while the main thread is stuck inside a C call (a teardown that
    hangs), where a Python handler would never run. A signal the process ignores
    (``nohup``) stays ignored. Only the main thread handles signals: elsewhere
    (a job run by a program's own thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    old = {sig: signal.signal(sig, _noted_by_the_watcher) for sig in STOP_SIGNALS
           if signal.getsignal(sig) != signal.SIG_IGN}
    old_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_end,), name="stop-signal-watcher", daemon=True).start()

    def restore() -> None:
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        os.close(write_end)  # the watcher reads the end of its pipe and closes it

    return restore


def _noted_by_the_watcher(signum: int, frame: object) -> None:
    """The Python-level handler: nothing (the watcher thread acts)."""


def _watch(read_end: int) -> None:
    seen = False
    try:
        while chunk := os.read(read_end, 64):
            for signum in chunk:
                if signum not in STOP_SIGNALS:
                    continue  # another signal with a Python handler also wakes the fd
                if seen:
                    os._exit(128 + signum)
                seen = True
                os.write(2, f"{signal.Signals(signum).name} received while exiting: the job has already "
                            "ended\n".encode())
    finally:
        os.close(read_end)


class StallWatch:
    """A watcher thread, told of every optimizer step: a job that makes no step for
    ``seconds`` writes every thread's stack to stderr (after a line naming the rank
    and pid), and again every ``seconds`` while it stays stuck. A hung collective,
    object-store read or loader is then named by its frames before the process
    group's timeout (DeepSpeed's default: 10 minutes) ends the job. The watcher
    holds the GIL while it reads the frames, so they hold still (faulthandler's own
    timer reads them from a C thread while they change, and can crash the process
    it watches); a thread stuck in a C call has released it. Each dump is one write,
    so the ranks sharing a launcher's stderr do not interleave. One per process: an
    arming inside another is a no-op."""

    def __init__(self) -> None:
        self.last_step = 0.0  # time.monotonic() of the last step (or of arming)
        self._armed = False

    @contextlib.contextmanager
    def armed(self, seconds: float) -> Iterator[None]:
        """Within: watched (``seconds`` 0: not)."""
        if seconds <= 0 or self._armed:
            yield
            return
        self._armed, self.last_step = True, time.monotonic()
        ended = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(ended, seconds), name="stall-watch", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            ended.set()
            watcher.join()
            self._armed = False

    def beat(self) -> None:
        """A step was made: the next dump is ``seconds`` from now."""
        self.last_step = time.monotonic()

    def _watch(self, ended: threading.Event, seconds: float) -> None:
        dumped = float("-inf")
        while not ended.wait(max(0.0, max(self.last_step, dumped) + seconds - time.monotonic())):
            now = time.monotonic()
            if now < max(self.last_step, dumped) + seconds:
                continue  # a step came meanwhile
            dumped = now
            os.write(2, _stacks(f"rank {os.environ.get('RANK', 0)} (process {os.getpid()}): no optimizer step "
                                f"for {now - self.last_step:.0f} s (log.stall_dump_s={seconds:g}); the stack of every "
                                "thread:").encode())


def _stacks(header: str) -> str:
    """``header``, then each thread's name and stack, most recent call last."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = [header]
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue  # the watcher itself
        parts.append(f"  thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(parts) + "\n"


stall_watch = StallWatch()
