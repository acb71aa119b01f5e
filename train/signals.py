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
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


@contextlib.contextmanager
def signals_noted() -> Iterator[None]:
    """Within: a stop signal is noted on stderr, a second one ends the process at
    once; the handlers are restored after, for a program that goes on. A signal
    the process ignores (``nohup``) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield  # a job run by a program's own thread: its signals are the program's
        return
    seen = []

    def note(signum: int, frame: object) -> None:
        if seen:
            os._exit(128 + signum)
        seen.append(signum)
        os.write(2, f"{signal.Signals(signum).name} received while exiting: the job has already ended\n".encode())

    old = {sig: signal.signal(sig, note) for sig in STOP_SIGNALS if signal.getsignal(sig) != signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def exiting_with(code: int) -> int:
    """``code``, with stop signals noted for the rest of the process: an entry
    point's last step before the interpreter's own teardown."""
    signals_noted().__enter__()  # never exited: the process is
    return code
