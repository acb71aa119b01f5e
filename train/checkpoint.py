"""Crash-safe, verified DeepSpeed checkpoints: save, keep the last K, resume the newest good one.

Layout under ``checkpoint.dir``::

    LOCK                    the run that writes here (train.run_lock)
    step000001000/          DeepSpeed's files (model, ZeRO partitions) + ours:
        rng_rank00000.safetensors   this rank's random streams (train.rng)
        meta.json           model, fingerprint, world size, step, trainer and loader state, config
        COMPLETE            written last: every file's size and sha256 (JSON)
    latest                  the tag of the newest complete checkpoint (for people)

Every file is hashed as it is written (``train.checkpoint_io``); ``COMPLETE`` lists
them all and appears only after every rank finished writing, so a crash in a save
leaves no ``COMPLETE`` and that checkpoint is never used. Before resume (and
export) the files are checked against it — split across ranks — and read as plain
data only. A checkpoint that fails is set aside (``step...corrupt``), counted, and
resume falls back to the newest one that verifies. Rotation keeps ``keep_last``
and never deletes the checkpoint this run resumed from or last wrote.

A storage failure in a save (disk full, read-only, vanished) is agreed on by all
ranks and raised as one line naming the path and what the run needs; the partial
checkpoint is removed and the previous one stays as it was.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infra.files import atomic_write, read_regular, require_regular
from infra.metrics import sink
from pipeline.storage.objects import sha256_file
from train.checkpoint_io import (FileRecord, RecordingCheckpointEngine, load_plain, plain_data_only, storage_problem,
                                 write_hashed)
from train.config import CheckpointConfig
from train.engine import all_ranks, raise_first
from train.errors import (CheckpointIntegrityError, CheckpointLockError, CheckpointStorageError, ResumeError,
                          TrainError, UnsafeCheckpointError)
from train.run_lock import RunLock

log = logging.getLogger(__name__)
TAG_RE = re.compile(r"^step(\d{9})$")
COMPLETE = "COMPLETE"
META = "meta.json"
RECORD_FORMAT = 2
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Resumed:
    tag: str
    step: int
    meta: dict[str, Any]  # meta.json, verified
    rng: dict[str, torch.Tensor] | None  # this rank's random streams; None on another world size
    set_aside: list[str]  # newer checkpoints that failed verification


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.safetensors"


def complete_tags(root: Path) -> list[str]:
    """Tags with a COMPLETE marker, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).exists())


def holds_checkpoints(folder: Path) -> bool:
    """Complete checkpoints in ``folder``, or it is one: weights written there would
    be read in their place."""
    return bool(complete_tags(folder)) or (folder / COMPLETE).exists()


def latest_complete(root: Path) -> str | None:
    """The newest tag with a COMPLETE marker (``latest`` is only a pointer for people:
    a crash between COMPLETE and its update leaves it one behind)."""
    tags = complete_tags(root)
    return tags[-1] if tags else None


# ------------------------------------------------------------------ integrity
def read_record(tag_dir: Path) -> dict[str, FileRecord]:
    """The files listed in ``COMPLETE``; untrusted JSON, checked field by field."""
    try:
        data = _read_json(tag_dir / COMPLETE)
    except FileNotFoundError:
        raise CheckpointIntegrityError(f"{tag_dir} has no {COMPLETE} record: it is not a finished checkpoint") from None
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT or not isinstance(data.get("files"), dict):
        raise CheckpointIntegrityError(f"{tag_dir / COMPLETE} is not a format-{RECORD_FORMAT} integrity record "
                                       "(a checkpoint written before maescale recorded sha256s, or damaged)")
    record = {}
    for name, entry in data["files"].items():
        ok = (isinstance(name, str) and _inside(tag_dir, name) and isinstance(entry, dict)
              and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
              and SHA256_RE.match(entry["sha256"]))
        if not ok:
            raise CheckpointIntegrityError(f"{tag_dir / COMPLETE} has a malformed entry {str(name)[:80]!r}")
        record[name] = FileRecord(entry["bytes"], entry["sha256"])
    if META not in record:
        raise CheckpointIntegrityError(f"{tag_dir / COMPLETE} does not list {META}")
    return record


MAX_RECORD_BYTES = 64 * 2**20  # COMPLETE and meta.json: kilobytes, a few MiB for thousands of ranks


def _read_json(path: Path) -> Any:
    """An untrusted JSON file of a checkpoint: a regular file of bounded size, not
    nested past what the parser can hold. FileNotFoundError passes through."""
    try:
        return json.loads(read_regular(path, MAX_RECORD_BYTES))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # ValueError: over the limit, not UTF-8, not JSON
        raise CheckpointIntegrityError(f"{path} is unreadable ({e.strerror if isinstance(e, OSError) else e})") from None
    except RecursionError:
        raise CheckpointIntegrityError(f"{path} is unreadable (JSON nested too deep)") from None


def _inside(folder: Path, name: str) -> bool:
    """``name`` is a relative path that stays inside ``folder``."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and "\\" not in name


def check_file(tag_dir: Path, name: str, expected: FileRecord) -> str | None:
    """None if the file matches its record, else what is wrong with it."""
    path = tag_dir / name
    try:
        require_regular(path)  # a pipe or a device listed with 0 bytes would pass stat() and hang the hash
        size = path.stat().st_size
        if size != expected.bytes:
            return f"{path} has {size} bytes, its record says {expected.bytes}"
        if sha256_file(path) != expected.sha256:
            return f"{path} does not match its recorded sha256 (altered or corrupt)"
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as e:
        return f"{path} is unreadable ({e.strerror or e})"
    return None


def verify(tag_dir: Path, names: list[str] | None = None) -> dict[str, FileRecord]:
    """Check ``names`` (default: every recorded file) against the record; returns
    the record, raises ``CheckpointIntegrityError`` naming the first bad file."""
    record = read_record(tag_dir)
    for name in sorted(record) if names is None else names:
        problem = check_file(tag_dir, name, record[name])
        if problem:
            raise CheckpointIntegrityError(problem)
    return record


def read_meta(tag_dir: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint, after checking it against the record."""
    verify(tag_dir, [META])
    meta = _read_json(tag_dir / META)
    required = {"model": str, "step": int, "world_size": int, "fingerprint": dict, "config": dict, "trainer": dict}
    for key, kind in required.items():
        if not isinstance(meta.get(key) if isinstance(meta, dict) else None, kind):
            raise CheckpointIntegrityError(f"{tag_dir / META} lacks {key!r} ({kind.__name__})")
    named = TAG_RE.match(tag_dir.name)
    if named and int(named.group(1)) != meta["step"]:
        raise CheckpointIntegrityError(f"{tag_dir / META} says step {meta['step']}, its folder step "
                                       f"{int(named.group(1))}: altered")
    return meta


# Fingerprint keys added after checkpoints were written without them (2026-11-30):
# a checkpoint that lacks one is not compared on it.
ADDED_FINGERPRINT_KEYS = frozenset({"head_classes", "weights", "weight_decay", "betas", "momentum", "layer_decay",
                                    "eval_manifest"})


def fingerprint_differences(saved: dict[str, Any], ours: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: checkpoint value -> this run's value`` for each differing key; inside
    a value that is itself a mapping (the model's architecture), each differing
    key of it (``arch.norm_pix_loss: False -> True``)."""
    found = []
    for k in sorted(saved.keys() | ours.keys()):
        old, new = saved.get(k), ours.get(k)
        if old == new or (k not in saved and not prefix and k in ADDED_FINGERPRINT_KEYS):
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            found += fingerprint_differences(old, new, f"{prefix}{k}.")
        else:
            found.append(f"{prefix}{k}: {old!r} -> {new!r}")
    return found


def checkpoint_bytes(tag_dir: Path) -> int | None:
    try:
        return sum(r.bytes for r in read_record(tag_dir).values())
    except CheckpointIntegrityError:
        return None


def _size(n: int | None) -> str:
    return "an unknown amount" if n is None else f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------ the manager
class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, fingerprint: dict[str, Any], rank: int, world_size: int,
                 lock: RunLock | None = None, slow_save_s: float = 0.0) -> None:
        self.root = Path(cfg.dir)
        self.keep_last = cfg.keep_last
        self.rank, self.world_size = rank, world_size
        self.fingerprint = fingerprint
        self.lock = lock
        self.slow_save_s = slow_save_s  # fault drill: a window to kill the run inside a save
        self.trusted: str | None = None  # the newest checkpoint known good: resumed from, or written by this run

    # -- save
    def save(self, engine: Any, step: int, meta: dict[str, Any], rng: dict[str, torch.Tensor]) -> float:
        """Save on every rank; returns the seconds it took. ``meta`` (rank 0's) goes
        into meta.json, ``rng`` into this rank's random-streams file."""
        from safetensors.torch import save as safetensors_bytes

        t0 = time.perf_counter()
        tag = tag_for(step)
        tag_dir = self.root / tag
        raise_first(self._prepare(tag_dir) if self.rank == 0 else None)
        recorder = RecordingCheckpointEngine.install(engine)
        recorder.start(tag_dir)
        engine.save_checkpoint(str(self.root), tag=tag, client_state={}, save_latest=False)
        recorder.guard(tag_dir, lambda: tag_dir.mkdir(exist_ok=True))
        data = safetensors_bytes({k: v.contiguous() for k, v in rng.items()})
        recorder.record(tag_dir / rng_file(self.rank), lambda f: f.write(data))
        if self.slow_save_s:
            time.sleep(self.slow_save_s)
        gathered = all_ranks((recorder.written, self._failure_message(recorder, tag_dir)))
        error = next((failure for _, failure in gathered if failure), None)
        if error is None and self.rank == 0:
            files = {name: rec for written, _ in gathered for name, rec in written.items()}
            error = self._commit(tag_dir, files, {**meta, "world_size": self.world_size, "step": step,
                                                  "fingerprint": self.fingerprint})
        if error and self.rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)  # frees the space; the previous checkpoint is untouched
        raise_first(CheckpointStorageError(error) if error else None)
        self.trusted = tag
        if self.rank == 0:
            self._prune()
        seconds = time.perf_counter() - t0
        log.info("saved checkpoint %s in %.1fs", tag_dir, seconds)
        return seconds

    def _prepare(self, tag_dir: Path) -> TrainError | None:
        """Rank 0, before a save: the storage and the lock are still there; a leftover
        folder of the same step (a crash in a save, a set-aside failure) goes."""
        try:
            if self.lock is not None:
                self.lock.check()
            elif self.trusted and not self.root.is_dir():
                return CheckpointStorageError(f"cannot write checkpoint {tag_dir}: checkpoint.dir {self.root} vanished")
            if tag_dir.exists():
                log.warning("removing %s left by an earlier save that did not finish", tag_dir)
                shutil.rmtree(tag_dir)
        except CheckpointLockError as e:
            return e
        except CheckpointStorageError as e:
            return CheckpointStorageError(f"cannot write checkpoint {tag_dir}: {e}")
        except OSError as e:
            return CheckpointStorageError(self._storage_message(tag_dir, tag_dir, e))
        return None

    def _failure_message(self, recorder: RecordingCheckpointEngine, tag_dir: Path) -> str | None:
        if recorder.failure is None:
            return None
        path, error = recorder.failure
        return self._storage_message(tag_dir, path, error)

    def _storage_message(self, tag_dir: Path, path: Path, error: BaseException) -> str:
        what, need = storage_problem(error)
        previous = self.trusted
        if need == "free space":
            need = f"about {_size(checkpoint_bytes(self.root / previous) if previous else None)} free for it"
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        detail = getattr(error, "strerror", None) or str(error)
        return (f"cannot write checkpoint {tag_dir} (rank {self.rank}): {what} at {path} ({detail}); the run needs "
                f"{need}; {kept}. Fix the storage and relaunch to resume")

    def _commit(self, tag_dir: Path, files: dict[str, FileRecord], meta: dict[str, Any]) -> str | None:
        """Rank 0: meta.json, then COMPLETE (the record: the checkpoint exists from
        here on), then ``latest`` (a pointer for people; failing to move it is logged)."""
        text = json.dumps(meta, indent=1).encode()
        try:
            files[META] = write_hashed(tag_dir / META, lambda f: f.write(text))
            record = {"format": RECORD_FORMAT, "step": meta["step"],
                      "files": {name: {"bytes": r.bytes, "sha256": r.sha256} for name, r in sorted(files.items())}}
            atomic_write(tag_dir / COMPLETE, json.dumps(record, indent=1))
        except OSError as e:
            return self._storage_message(tag_dir, Path(e.filename or tag_dir), e)
        try:
            atomic_write(self.root / "latest", tag_dir.name)
        except OSError as e:
            log.warning("checkpoint %s is complete, but %s could not be updated: %s", tag_dir, self.root / "latest", e)
        return None

    def _prune(self) -> None:
        tags = complete_tags(self.root)
        keep = set(tags[-self.keep_last:]) | {self.trusted}
        for old in tags:
            if old not in keep:
                shutil.rmtree(self.root / old, ignore_errors=True)
        for p in self.root.iterdir():  # leftovers of crashed saves older than the newest good one
            if TAG_RE.match(p.name) and not (p / COMPLETE).exists() and tags and p.name < tags[-1]:
                shutil.rmtree(p, ignore_errors=True)

    # -- resume
    def refuse_an_earlier_run(self) -> None:
        """``checkpoint.resume=false`` in a run that saves: it starts over, so a
        folder that already holds complete checkpoints is refused, on every rank
        (its saves would replace the earlier run's of the same steps, and a later
        resume would take the newest checkpoint of either run)."""
        error: TrainError | None = None
        try:
            tags = complete_tags(self.root) if self.rank == 0 else []
        except OSError as e:
            tags, error = [], CheckpointStorageError(f"cannot list checkpoint.dir {self.root}: {e.strerror or e}")
        if tags:
            error = ResumeError(
                f"checkpoint.dir {self.root} holds checkpoints of an earlier run (the newest: {tags[-1]}), and "
                "checkpoint.resume=false starts over: its checkpoints would mix with them and a later resume would "
                "take the newest of either run. Use another checkpoint.dir, or move those checkpoints away "
                "(checkpoint.resume=true continues from them)")
        raise_first(error)

    def resume(self, engine: Any, check: Callable[[Path, dict[str, Any]], None] | None = None) -> Resumed | None:
        """Load the newest checkpoint that verifies (None: there is none to resume).
        ``check(tag_dir, meta)``: the loop's own refusals, before anything is loaded
        or set aside."""
        found = self._newest_verified()
        if found is None:
            return None
        tag, failed = found
        tag_dir = self.root / tag
        meta = read_meta(tag_dir)
        self._check_compatible(tag_dir, meta)
        if check is not None:
            check(tag_dir, meta)
        set_aside = self._set_aside([t for t, _ in failed], tag) if failed else []
        RecordingCheckpointEngine.install(engine)  # its loads: plain data, refused by file name
        try:
            with plain_data_only():
                path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_module_strict=True,
                                                 load_optimizer_states=True, load_lr_scheduler_states=False)
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:  # plain data, wrong content
            raise ResumeError(f"DeepSpeed could not load checkpoint {tag_dir}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
        if path is None:
            raise ResumeError(f"DeepSpeed could not load checkpoint {tag_dir}")
        rng, error = self._load_rng(tag_dir) if meta["world_size"] == self.world_size else (None, None)
        raise_first(error)
        self.trusted = tag
        sink().set("mae_checkpoint_resumed_step", meta["step"])
        if failed:
            log.warning("resumed from %s (step %d), an older checkpoint: %s failed verification and were set "
                        "aside", tag_dir, meta["step"], ", ".join(set_aside))
        else:
            log.info("resumed from %s (step %d)", tag_dir, meta["step"])
        return Resumed(tag, meta["step"], meta, rng, set_aside)

    def _newest_verified(self) -> tuple[str, list[tuple[str, str]]] | None:
        """(newest tag that verifies, [(newer tag, its problem)]); None if there are no
        checkpoints; ResumeError if none verifies."""
        tags = complete_tags(self.root)
        failed: list[tuple[str, str]] = []
        for tag in reversed(tags):
            problem = self._check_agreed(self.root / tag)
            if problem is None:
                return tag, failed
            failed.append((tag, problem))
            log.error("checkpoint %s fails verification: %s", self.root / tag, problem)
            sink().inc("mae_checkpoint_verify_failures_total")
        if failed:
            listing = "; ".join(f"{t}: {p}" for t, p in failed)
            raise ResumeError(f"no checkpoint in {self.root} verifies ({listing}); move them aside to start over, "
                              "or restore them from a copy")
        return None

    def _check_agreed(self, tag_dir: Path) -> str | None:
        """Every rank checks its share of the files (every world_size-th): size,
        sha256, and that each .pt file unpickles as plain data. A file needing a
        pickle stops the run on every rank; the first other problem is returned."""
        problems = all_ranks(self._check_share(tag_dir))
        for problem in problems:
            if isinstance(problem, UnsafeCheckpointError):
                raise problem
        return next((str(p) for p in problems if p is not None), None)

    def _check_share(self, tag_dir: Path) -> TrainError | None:
        try:
            names = sorted(read_record(tag_dir))[self.rank::self.world_size]
            verify(tag_dir, names)
            for name in names:
                if name.endswith(".pt"):
                    load_plain(tag_dir / name, mmap=True)  # what DeepSpeed will unpickle, before it does
        except (CheckpointIntegrityError, UnsafeCheckpointError) as e:
            return e
        return None

    def _check_compatible(self, tag_dir: Path, meta: dict[str, Any]) -> None:
        if meta["model"] != self.fingerprint["model"]:
            raise ResumeError(f"checkpoint {tag_dir} is of model {meta['model']}, this run is "
                              f"{self.fingerprint['model']}; use another checkpoint.dir or the same model")
        if "weight_decay_groups" in self.fingerprint.keys() - meta["fingerprint"].keys():  # no setting brings them back
            raise ResumeError(f"checkpoint {tag_dir} was written by a maescale that spared the cls and mask tokens "
                              "from weight decay (its optimizer state has other groups): finish that run with that "
                              "version, or start a new checkpoint.dir")
        diffs = fingerprint_differences(meta["fingerprint"], self.fingerprint)
        if diffs:
            raise ResumeError(f"checkpoint {tag_dir} was written with a config that changes the model or optimizer "
                              f"state or the run ({'; '.join(diffs)}); resume with the same settings or start a new "
                              "checkpoint.dir")
        stage = self.fingerprint.get("zero_stage", 0)
        if meta["world_size"] != self.world_size and stage > 0:
            raise ResumeError(f"checkpoint {tag_dir} holds ZeRO-{stage} optimizer state partitioned for a world "
                              f"size of {meta['world_size']}, and DeepSpeed cannot re-partition it for "
                              f"{self.world_size}: relaunch with a world size of {meta['world_size']} (ZeRO-0 "
                              "checkpoints resume on any, with the same global batch)")

    def _set_aside(self, tags: list[str], resumed: str) -> list[str]:
        """Rank 0 renames checkpoints that failed verification to ``<tag>.corrupt``
        (kept for inspection, never loaded or rotated) and points ``latest`` back."""
        names = [f"{t}.corrupt" for t in tags]
        if self.rank == 0:
            try:
                for tag, name in zip(tags, names):
                    if (self.root / name).exists():  # set aside before: keep the first one
                        shutil.rmtree(self.root / tag, ignore_errors=True)
                    else:
                        os.replace(self.root / tag, self.root / name)
                atomic_write(self.root / "latest", resumed)
            except OSError as e:  # read-only storage: they stay, and fail verification again next time
                log.warning("could not set aside %s: %s", ", ".join(tags), e)
        all_ranks(None)  # the others wait for the renames
        return names

    def _load_rng(self, tag_dir: Path) -> tuple[dict[str, torch.Tensor] | None, ResumeError | None]:
        """This rank's random streams, or the error every rank will raise."""
        from safetensors.torch import load_file

        path = tag_dir / rng_file(self.rank)
        try:
            return load_file(str(path)), None
        except Exception as e:  # missing, or a record forged around a damaged file
            return None, ResumeError(f"cannot read {path}: {type(e).__name__}: {e}")
