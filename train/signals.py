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
import threading
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
