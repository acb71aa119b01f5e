"""One writer per checkpoint directory: a lock file naming its holder.

``checkpoint.dir/LOCK`` is JSON: host, boot id, pid (and the pid's start time, so a
reused pid is not mistaken for the holder, and its PID namespace), start time, a
heartbeat and a random token. It is created with ``O_EXCL``; rank 0 holds it for the whole run and a
thread refreshes the heartbeat every ``stale_after_s / 10`` seconds.

A lock is stale, and taken over with a warning, when its holder is gone: on this
host (same boot, same PID namespace) its process is not running; on this host
after a reboot, always; on another host, or in another PID namespace of this one
(a container sharing the host's name: its pids mean nothing here), when its
heartbeat is older than ``stale_after_s``. A live one
is refused with one line naming the holder. Take-overs go one at a time, each
holding ``LOCK.takeover`` (also ``O_EXCL``): of several relaunches that find the
same dead holder at once, one takes the lock and the others find its new lock
when their turn comes (without the turn, one could delete the lock another had
just taken). The heartbeat thread also notices a
lock that vanished or was taken over (storage unmounted, another run decided this
one was dead): ``check()`` then raises, and the run stops before its next save.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from infra.files import NotAFileError, atomic_write, read_regular, require_regular
from train.checkpoint_io import storage_problem
from train.config import CheckpointConfig
from train.engine import raise_first
from train.errors import CheckpointLockError, CheckpointStorageError, TrainError

log = logging.getLogger(__name__)
LOCK_NAME = "LOCK"
UNREADABLE_GRACE_S = 10.0  # a lock file still being written by its creator
MAX_LOCK_BYTES = 2**20  # a lock is a few hundred bytes
TAKEOVER_NAME = "LOCK.takeover"
TAKEOVER_STALE_S = 30.0  # a take-over takes milliseconds: a turn this old was left by a run that died in it


@dataclass(frozen=True)
class LockHolder:
    host: str
    boot_id: str
    pid: int
    pid_start: int | None  # clock ticks after boot (Linux), tells a reused pid apart
    started: float  # unix time
    heartbeat: float  # unix time of the last refresh
    token: str
    pid_ns: int | None = None  # the PID namespace's inode (Linux); None: unknown

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host} pid {self.pid}, running since {since}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks after boot, None where /proc has no such
    process or is absent; a zombie counts as absent."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):  # exited, not yet reaped
        return None
    return int(fields[19])


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def this_process() -> LockHolder:
    now = time.time()
    return LockHolder(socket.gethostname(), _boot_id(), os.getpid(), _process_start(os.getpid()), now, now,
                      secrets.token_hex(8), _pid_namespace())


def _pids_checkable(holder: LockHolder) -> bool:
    """The holder's pid can be looked up here: this host, this boot, this PID
    namespace (as far as either side knows its namespace)."""
    ours = _pid_namespace()
    return (holder.host == socket.gethostname() and holder.boot_id == _boot_id()
            and (holder.pid_ns is None or ours is None or holder.pid_ns == ours))


def stale_reason(holder: LockHolder, stale_after_s: float, now: float | None = None) -> str | None:
    """Why ``holder`` no longer holds its lock, or None while it may be running."""
    now = time.time() if now is None else now
    if _pids_checkable(holder):
        if not _pid_running(holder.pid):
            return "its process is not running"
        started = _process_start(holder.pid)
        if holder.pid_start is not None and started != holder.pid_start:
            return "its process is not running (the pid now belongs to another process)"
        return None
    if holder.host == socket.gethostname() and holder.boot_id != _boot_id():
        return "its host restarted since"
    age = now - holder.heartbeat
    return f"no heartbeat for {age:.0f}s (> {stale_after_s:.0f}s)" if age > stale_after_s else None


def read_holder(path: Path) -> LockHolder | None:
    """The lock's holder; None if the file is missing or not a lock we can read."""
    try:
        data = json.loads(read_regular(path, MAX_LOCK_BYTES))  # a pipe would block the start for good
        holder = LockHolder(**{k: data[k] for k in LockHolder.__dataclass_fields__ if k != "pid_ns"},
                            pid_ns=data.get("pid_ns"))  # absent in locks of earlier versions
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return None
    kinds = {"host": str, "boot_id": str, "pid": int, "started": (int, float), "heartbeat": (int, float),
             "token": str}
    if not all(isinstance(getattr(holder, k), kind) for k, kind in kinds.items()) or not all(
            getattr(holder, k) is None or isinstance(getattr(holder, k), int) for k in ("pid_start", "pid_ns")):
        return None
    return holder


class RunLock:
    """``lock.acquire()`` ... ``lock.check()`` before each save ... ``lock.release()``."""

    def __init__(self, root: Path, stale_after_s: float) -> None:
        self.root, self.path, self.stale_after_s = Path(root), Path(root) / LOCK_NAME, stale_after_s
        self.holder: LockHolder | None = None
        self.problem: str | None = None  # set by the heartbeat thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._identity: tuple[int, int] | None = None
        self._mutex = threading.Lock()  # the heartbeat thread and check() both refresh

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise if a live run holds it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for _ in range(5):
                if self._create() or self._take_over_if_stale():
                    break
            else:
                raise CheckpointLockError(f"could not take the lock {self.path}: other runs keep taking it")
            stat = os.stat(self.root)
        except OSError as e:
            what, need = storage_problem(e)
            raise CheckpointStorageError(f"cannot use checkpoint.dir {self.root}: {what} ({e.strerror or e}); "
                                         f"the run needs {need} there") from e
        self._identity = (stat.st_dev, stat.st_ino)
        self._thread = threading.Thread(target=self._heartbeat, name="checkpoint-lock-heartbeat", daemon=True)
        self._thread.start()

    def _create(self) -> bool:
        holder = this_process()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(asdict(holder)))
                f.flush()
                os.fsync(f.fileno())
        except OSError:  # a full disk: an empty LOCK left behind would refuse the next run
            self.path.unlink(missing_ok=True)
            raise
        self.holder = holder
        return True

    def _take_over_if_stale(self) -> bool:
        """Take over a stale lock (True once ours); raise if its holder is live.
        False: try again (the lock is gone, still being written, or another run
        changed it meanwhile)."""
        holder = read_holder(self.path)
        if holder is None:
            if self.path.is_symlink() and not self.path.exists():
                raise CheckpointLockError(f"the checkpoint lock {self.path} is a symbolic link to a missing file "
                                          f"({os.readlink(self.path)}): remove it")
            if not self.path.exists():
                return False
            try:
                require_regular(self.path)
            except NotAFileError as e:
                raise CheckpointLockError(f"the checkpoint lock {e}: remove it") from None
            age = self._unreadable_age()
            if age < UNREADABLE_GRACE_S:  # its creator may still be writing it: give it the grace, then decide
                time.sleep(min(UNREADABLE_GRACE_S, UNREADABLE_GRACE_S - age) + 0.1)
                return False
            reason, who = "it is unreadable", f"an unreadable lock ({age:.0f}s old)"
        else:
            reason, who = stale_reason(holder, self.stale_after_s), holder.describe()
            if reason is None and self._silent(holder):
                holder = self._wait_while_silent(holder)
                reason = stale_reason(holder, self.stale_after_s)
            if reason is None:
                beat = time.time() - holder.heartbeat
                raise CheckpointLockError(
                    f"checkpoint.dir {self.root} is in use by another run ({who}, heartbeat {beat:.0f}s ago): "
                    f"stop that run or set another checkpoint.dir")
        with self._takeover_turn():
            current = read_holder(self.path)
            if current != holder or (holder is None and self._unreadable_age() < UNREADABLE_GRACE_S):
                return False  # another run took it over first, or it changed: decide afresh
            log.warning("taking over the checkpoint lock %s of %s: %s", self.path, who, reason)
            self.path.unlink(missing_ok=True)
            return self._create()

    def _unreadable_age(self) -> float:
        """Seconds since the lock file was written (0 if it is gone), by the
        storage's clock."""
        try:
            return self._storage_now() - self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _storage_now(self) -> float:
        """The storage's clock: the time stamp of a file written now. Ages of files
        on shared storage are measured against it, not against this host's clock,
        which may run ahead of or behind the file server's. This host's clock where
        nothing can be written."""
        probe = self.root / f".{LOCK_NAME}.clock-{secrets.token_hex(6)}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError:
            return time.time()
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)

    @contextmanager
    def _takeover_turn(self) -> Iterator[None]:
        """Hold ``LOCK.takeover`` while replacing a stale lock; wait while another
        run holds it, and break one left behind (older than ``TAKEOVER_STALE_S``)."""
        path, waited = self.root / TAKEOVER_NAME, time.monotonic()
        clock: float | None = None  # the storage's clock at ``waited``, read once
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                ours = os.fstat(fd)
                os.close(fd)
                break
            except FileExistsError:
                try:
                    turn = path.stat()
                except FileNotFoundError:
                    continue
                clock = self._storage_now() if clock is None else clock
                age = clock + time.monotonic() - waited - turn.st_mtime
                if age > TAKEOVER_STALE_S:
                    self._break_turn(path, turn, age)
                elif time.monotonic() - waited > 2 * TAKEOVER_STALE_S:  # dated ahead of the storage's clock
                    raise CheckpointLockError(f"another run has been taking over the lock {self.path} for "
                                              f"{time.monotonic() - waited:.0f}s: remove {path} if no run is "
                                              "starting") from None
                else:
                    time.sleep(0.05)
        try:
            yield
        finally:
            with suppress(FileNotFoundError):
                if os.stat(path).st_ino == ours.st_ino:  # not a turn another run took after breaking ours
                    path.unlink()

    def _break_turn(self, path: Path, judged: os.stat_result, age: float) -> None:
        """Remove the turn judged left behind, and only it: it is renamed aside
        first, and given back if what was renamed is a turn another run has taken
        since (two runs breaking the same old turn)."""
        aside = path.with_name(f"{path.name}.broken-{secrets.token_hex(6)}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return  # another run broke it first
        renamed = os.stat(aside)
        if (renamed.st_ino, renamed.st_mtime_ns) == (judged.st_ino, judged.st_mtime_ns):
            log.warning("removing %s, left %.0fs ago by a run that stopped while taking over the lock", path, age)
        else:
            with suppress(FileExistsError):
                os.link(aside, path)  # another run's fresh turn: given back as it was
        aside.unlink(missing_ok=True)

    def _interval(self) -> float:
        return max(0.5, self.stale_after_s / 10)

    def _silent(self, holder: LockHolder) -> bool:
        """A holder on another host (or PID namespace) that missed several heartbeats:
        its node may be gone (a relaunch after a node failure), or only slow."""
        return not _pids_checkable(holder) and time.time() - holder.heartbeat > 3 * self._interval()

    def _wait_while_silent(self, holder: LockHolder) -> LockHolder:
        """Wait until the silent ``holder`` goes stale (then it is taken over) or
        beats again (a live run: refused); returns the holder as last read."""
        left = holder.heartbeat + self.stale_after_s - time.time()
        log.warning("the checkpoint lock %s is held by %s, which has not refreshed it for %.0fs: waiting up to "
                    "%.0fs more for it to go stale before taking it over", self.path, holder.describe(),
                    time.time() - holder.heartbeat, max(left, 0))
        while stale_reason(holder, self.stale_after_s) is None:
            time.sleep(min(self._interval(), 5.0))
            current = read_holder(self.path)
            if current is None or current.token != holder.token or current.heartbeat != holder.heartbeat:
                return current or holder  # it beat again, was released or taken: decide afresh
        return holder

    def _heartbeat(self) -> None:
        interval = self._interval()
        while not self._stop.wait(interval):
            self.problem = self._refresh()
            if self.problem:
                return

    def _refresh(self) -> str | None:
        """Renew the heartbeat; a message if the lock is no longer ours."""
        with self._mutex:
            return self._renew()

    def _renew(self) -> str | None:
        assert self.holder is not None
        try:
            stat = os.stat(self.root)
        except OSError as e:
            return f"checkpoint.dir {self.root} vanished ({e.strerror or e})"
        if (stat.st_dev, stat.st_ino) != self._identity:
            return f"checkpoint.dir {self.root} was replaced (deleted and recreated, or unmounted)"
        current = read_holder(self.path)
        if current is None or current.token != self.holder.token:
            who = current.describe() if current else "nobody (the lock file is gone)"
            return f"lost the lock of checkpoint.dir {self.root}: it is now held by {who}"
        self.holder = replace(self.holder, heartbeat=time.time())
        try:
            atomic_write(self.path, json.dumps(asdict(self.holder)))
        except OSError as e:
            what, need = storage_problem(e)
            return f"cannot refresh the lock {self.path}: {what} ({e.strerror or e}); the run needs {need}"
        return None

    def check(self) -> None:
        """Raise if the heartbeat found the lock or the directory gone."""
        problem = self.problem or (self._refresh() if self._thread is not None else None)
        if problem:
            self.problem = problem
            error = CheckpointLockError if problem.startswith("lost the lock") else CheckpointStorageError
            raise error(problem)

    def release(self) -> None:
        """Stop the heartbeat; remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.holder is None:
            return
        current = read_holder(self.path)
        if current is not None and current.token == self.holder.token:
            try:
                self.path.unlink()
            except OSError as e:  # read-only or vanished: the next run sees a dead holder
                log.warning("could not remove the checkpoint lock %s: %s", self.path, e)
        self.holder = None


def take_run_lock(cfg: CheckpointConfig, rank: int) -> RunLock | None:
    """Rank 0 takes ``cfg.dir``'s lock for a run that saves there (None when it does
    not, and on other ranks); if it cannot, every rank raises the same error. A run
    that does not save takes no lock, but is refused a folder a live run holds: it
    would still resume from it and write its summary there (which a Slurm job reads
    to decide whether to requeue)."""
    lock, error = RunLock(Path(cfg.dir), cfg.lock_stale_s) if rank == 0 else None, None
    if lock is not None and not cfg.enabled:
        holder = read_holder(lock.path)
        if holder is not None and stale_reason(holder, cfg.lock_stale_s) is None:
            error = CheckpointLockError(f"checkpoint.dir {lock.root} is in use by another run ({holder.describe()}); "
                                        "a run with checkpoint.enabled=false would still resume from it and write "
                                        "its summary there: set another checkpoint.dir")
        lock = None
    elif lock is not None:
        try:
            lock.acquire()
        except TrainError as e:
            lock, error = None, e
    raise_first(error)
    return lock
