"""What every decode backend shares: the ``DecodedBatch`` contract and ``PlannedLoader``.

A backend implements ``_batches(ids, epoch)``, yielding one ``DecodedBatch`` per
planned batch, in plan order — or ``_start(ids, epoch)``, which does an epoch's
set-up (fork workers, build a DALI graph) at once and returns it as an ``EpochRun``.
``PlannedLoader`` does the rest the same way for all of them: the sample plan and
this rank's position in it, resume, corrupt-sample accounting against the
tolerance, normalization on the device, and starting the next epoch before this
one ends (``data.overlap_epochs``).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from infra.metrics import sink
from pipeline.augment import Normalizer, erase_params, rand_augment_params
from pipeline.erasing import random_erase
from pipeline.decode.reader import PlannedData
from pipeline.errors import CorruptDataError, ManifestError, ResumeStateError
from pipeline.loader import DTYPES, Batch, LoaderConfig, LoaderStats
from pipeline.mixture import DataSources
from pipeline.plan import PLAN_VERSION, SamplePlan, check_segments, resume_segments
from pipeline.randaugment import rand_augment

log = logging.getLogger(__name__)
STATE_VERSION = PLAN_VERSION  # a saved position means something only under the order it was saved in


@dataclass
class DecodedBatch:
    """One planned batch as a backend hands it over."""

    images: torch.Tensor  # (b, 3, S, S): uint8, or final (normalized, on device) if the backend normalizes
    labels: torch.Tensor  # (b,) int64, -1 where unlabelled
    keys: list[str]  # "<shard>/<key>" of each kept sample
    ids: torch.Tensor  # (b,) global sample ids of the kept samples
    planned: int  # samples of the plan this batch stands for: kept + skipped
    skips: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of samples dropped from it
    converted: list[str] = field(default_factory=list)  # mode reasons of images converted to RGB

    def pin_memory(self) -> DecodedBatch:
        """DataLoader(pin_memory=True) calls this in its pinning thread."""
        self.images = self.images.pin_memory()
        return self


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def fix_malloc_thresholds(mmap_bytes: int = 4 * 2**20, trim_bytes: int = 32 * 2**20) -> bool:
    """Serve large allocations (batches are MiBs) with mmap, returned to the OS on
    free, and keep up to ``trim_bytes`` of free heap for reuse.

    glibc otherwise raises its mmap threshold after each large free, so batch-sized
    buffers come from the heap and the process keeps ~40 of them resident (seen: RSS
    climbing by ~9 MiB a batch to +450 MiB). Setting the threshold pins it, and pins
    the trim threshold at 128 KiB with it: the heap then gave back the pages of a
    shard's received chunks (~256 KiB each) as they were freed and faulted them in
    again for the next shard, up to 138 page faults per MiB read in memory mode (0
    with 32 MiB kept). No-op off glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_bytes)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_bytes))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def startup_objects_frozen() -> Iterator[None]:
    """The objects alive now (the imported modules: torch alone is ~200,000) out of
    the collector's reach for the duration, then back.

    The first full collection after start-up walks them all (~0.1 s). Unfrozen, it
    fell inside the manifest's first request (building the S3 client allocates
    enough to set it off), and again in each DataLoader worker, whose walk also
    copies the parent's pages it touches. So the loader reads its manifest, forks
    its workers and waits for its first batch inside this; the workers keep the
    frozen objects, the parent gets them back, and objects that died meanwhile are
    collected as usual. A program that froze objects itself is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


_END = object()


def first_batch_frozen(batches: Iterator[Any]) -> Iterator[Any]:
    """``batches``, the first one fetched inside ``startup_objects_frozen``."""
    with startup_objects_frozen():
        first = next(batches, _END)
    if first is _END:
        return
    yield first
    yield from batches


class EpochRun:
    """One epoch's batches, set up already (workers forked, a DALI graph built).
    ``close()`` releases what the set-up holds, whether or not the batches were
    ever taken: closing a generator that never ran runs none of its code, so a
    run started early and then dropped needs ``release`` to stop its workers."""

    def __init__(self, batches: Iterator[DecodedBatch], release: Callable[[], None] = lambda: None,
                 poll: Callable[[], None] = lambda: None) -> None:
        self.batches, self.release = batches, release
        self.poll = poll  # called between the batches of the epoch before, to move on without waiting

    def close(self) -> None:
        batches, self.batches = self.batches, iter(())
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        release, self.release, self.poll = self.release, lambda: None, lambda: None
        release()


class NextEpoch:
    """The run of an epoch started before its turn, with the position it starts
    from; ``take`` hands it over if the loader is at that position, and closes it
    if not."""

    def __init__(self) -> None:
        self.position: tuple | None = None
        self.run: EpochRun | None = None

    def put(self, position: tuple, run: EpochRun) -> None:
        self.close()
        self.position, self.run = position, run

    def take(self, position: tuple) -> EpochRun | None:
        run, matches = self.run, self.position == position
        self.position, self.run = None, None
        if run is not None and not matches:
            run.close()
        return run if matches else None

    def poll(self) -> None:
        if self.run is None:
            return
        try:
            self.run.poll()
        except Exception as e:  # noqa: BLE001 - best effort: the epoch then starts at its turn, and meets it there
            log.warning("dropped the next epoch started early (%s: %s); it starts at its turn", type(e).__name__, e)
            self.close()

    def close(self) -> None:
        run, self.position, self.run = self.run, None, None
        if run is not None:
            run.close()


_OPEN: weakref.WeakSet[NextEpoch] = weakref.WeakSet()  # every NextEpoch that held a run
_EXIT_HOOK = False


def _close_open_epochs() -> None:
    for next_epoch in list(_OPEN):
        next_epoch.close()


def _close_from_any_thread(next_epoch: NextEpoch) -> None:
    """A freed loader's finalizer: the cycle collector may run it on any thread,
    the early epoch's own pin-memory or feed thread included, which could not
    join itself; off the main thread the closing gets a thread of its own."""
    if threading.current_thread() is threading.main_thread():
        next_epoch.close()
    else:
        threading.Thread(target=next_epoch.close, name="close-early-epoch").start()


class PlannedLoader:
    """Position tracking, resume, normalization and corrupt-sample accounting shared
    by the backends; a backend implements ``_batches``."""

    normalizes = False  # the backend yields images normalized, on device, in the dtype
    rand_augments = False  # the backend applies RandAugment itself (else: here, on the device)
    dataset_format = "tar"  # manifest options["format"] this backend reads

    def __init__(self, config: LoaderConfig, rank: int, world_size: int, device: torch.device) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.config, self.rank, self.world_size = config, rank, world_size
        with startup_objects_frozen():  # the manifest's first request
            self.manifest = DataSources(config)  # one dataset, or every data.sources entry end to end
        for spec, table in zip(self.manifest.specs, self.manifest.tables):
            self._check_format(spec.url, table.options.get("format", "tar"), len(table))
        self.plan = SamplePlan(self.manifest.shard_sizes(), config.plan, self.manifest.plan_quotas())
        self.fingerprint = self.manifest.fingerprint
        self.stats = LoaderStats()
        self.device = device
        self.dtype = DTYPES[config.dtype]
        self.normalizer = Normalizer(config.augment.mean, config.augment.std, device)
        self.epoch = 0
        self.segments: list[list[int]] = [[world_size, 0]]
        self.data = PlannedData(config, self.plan, self.manifest)  # what workers read with
        self.next_epoch = NextEpoch()
        self.last_epoch: int | None = None  # set by a consumer that knows it reads no epoch after this one
        # A loader dropped unclosed stops its next epoch when it is freed; at exit
        # ``_close_open_epochs`` does, before multiprocessing's exit hook would SIGTERM
        # those workers (they defer it a minute). Nothing that epoch holds may refer
        # back to the loader, or it would never be freed; torch's own clean-up of a
        # worker pool that cyclic GC collects waits out that minute (its queues'
        # finalizers run first).
        weakref.finalize(self, _close_from_any_thread, self.next_epoch)
        fix_malloc_thresholds()

    # -- position
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.segments = epoch, [[self.world_size, 0]]
            self.next_epoch.close()

    def close(self) -> None:
        """Stop the next epoch's workers if it was started early (a run that ends
        in an epoch's last batches). Iterating again later still works."""
        self.next_epoch.close()

    def _rank_ids(self) -> tuple[np.ndarray, int]:
        return self.plan.rank_sequence(self.epoch, self.segments, self.rank)

    def epoch_samples(self) -> int:
        return self.plan.rank_size(self.epoch, self.segments, self.rank)[0]

    def __len__(self) -> int:
        size, consumed = self.plan.rank_size(self.epoch, self.segments, self.rank)
        remaining = size - consumed
        bs = self.config.batch_size
        return remaining // bs if self.config.drop_last else -(-remaining // bs)

    def state_dict(self) -> dict[str, Any]:
        """The position: an epoch whose batches are all delivered (a checkpoint at its
        very end, its iterator not yet finished) is saved as the next one's start,
        where it resumes anyway, so that a new mix can start there."""
        epoch, segments = self.epoch, [list(s) for s in self.segments]
        if len(self) == 0:  # every rank has delivered its whole block: the same consumed count on each
            epoch, segments = epoch + 1, [[self.world_size, 0]]
        return {"version": STATE_VERSION, "epoch": epoch, "segments": segments,
                "dataset": self.fingerprint, "mix": self.manifest.mix_state(), "seed": self.config.plan.seed,
                "shuffle": self.config.plan.shuffle, "window_shards": self.config.plan.window_shards,
                "uneven": self.config.plan.uneven}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ResumeStateError(
                f"loader state was saved under sample plan version {state.get('version')!r}; this maescale orders "
                f"samples by plan version {STATE_VERSION} (docs/DATA.md), so the data position cannot carry over: "
                "finish the run with the maescale that started it, or start a new checkpoint.dir")
        if state.get("dataset") != self.fingerprint:
            raise ResumeStateError("loader state was saved for another dataset (manifest fingerprint differs)")
        plan = self.config.plan
        for key in ("seed", "shuffle", "window_shards", "uneven"):
            if state.get(key) != getattr(plan, key):
                raise ResumeStateError(f"loader state was saved with plan.{key}={state.get(key)!r}, "
                                       f"this loader has {getattr(plan, key)!r}; the order would differ")
        epoch = state.get("epoch")
        if type(epoch) is not int or epoch < 0:
            raise ResumeStateError(f"loader state: epoch must be an integer >= 0, got {str(epoch)[:40]}")
        saved = [list(s) for s in check_segments(state.get("segments"))]
        self._check_mix(state.get("mix"), saved)
        segments = resume_segments(saved, self.world_size)
        self.plan.rank_size(epoch, segments, 0)  # each segment's consumed fits its blocks
        self.epoch, self.segments = epoch, segments
        self.next_epoch.close()

    def _check_mix(self, saved: Any, segments: list[list[int]]) -> None:
        """Another mix (weights, counts) changes the order: fine at an epoch's start, not mid-epoch."""
        if saved == self.manifest.mix_state():
            return
        if any(consumed for _, consumed in segments):
            raise ResumeStateError(f"loader state was saved mid-epoch with data sources {saved}, this loader has "
                                   f"{self.manifest.mix_state()}; change the mix at an epoch boundary")
        log.info("data sources changed at an epoch boundary: %s -> %s", saved, self.manifest.mix_state())

    def _check_format(self, url: str, fmt: object, shards: int) -> None:
        if not shards:
            raise ManifestError(f"dataset {url} has no samples")
        if fmt != self.dataset_format:
            raise ManifestError(f"dataset {url} is in {fmt!r} format, which the {self.config.backend!r} backend does "
                                f"not read; use backend {'ffcv' if fmt == 'beton' else 'cpu or dali'} or re-shard "
                                f"with `mae shard --format {self.dataset_format}`")

    # -- iteration
    def _span(self, ids: np.ndarray, consumed: int) -> np.ndarray:
        """What is left of an epoch's ``ids`` after ``consumed``; with drop_last, without the partial batch."""
        bs = self.config.batch_size
        return ids[consumed:consumed + (len(ids) - consumed) // bs * bs] if self.config.drop_last else ids[consumed:]

    def __iter__(self) -> Iterator[Batch]:
        ids, consumed = self._rank_ids()
        todo = self._span(ids, consumed)
        started = self.next_epoch.take((self.epoch, self.segments))
        planned = -(-len(todo) // self.config.batch_size)
        lead = self.overlap_lead() if self.config.overlap_epochs and self.epoch != self.last_epoch else 0
        skipped, ended = 0, False
        try:
            for n, b in enumerate(self._planned_batches(todo, self.epoch, started), 1):
                skipped = self._account(b, ids, skipped)
                if lead and planned - n == min(lead, planned - 1):  # once, ``lead`` batches before the end
                    self._start_next_epoch()
                elif lead and planned - n < lead:
                    self.next_epoch.poll()
                # A batch whose every sample was corrupt is still yielded, empty: every rank
                # yields the same number of batches an epoch, so ranks stay in step (the
                # trainer skips that micro-step on every rank). Dropping it moved this rank
                # into its next epoch a batch early, and ranks drifted epochs apart.
                yield Batch(self._finish(b.images, b.ids), b.labels, b.keys, b.ids)
            ended = True
        finally:
            if not ended:  # stopped mid-epoch (an error, a run's end, a checkpoint to resume from): not next
                self.next_epoch.close()
        self.epoch, self.segments = self.epoch + 1, [[self.world_size, 0]]

    def _account(self, b: DecodedBatch, ids: np.ndarray, skipped: int) -> int:
        """Move the position past batch ``b`` of epoch ``ids``, count what it
        delivered, skipped and converted; returns the epoch's skips so far, or
        raises when they exceed the tolerance."""
        self._count_sources(ids[self.segments[-1][1]:self.segments[-1][1] + b.planned], b.ids)
        self.segments[-1][1] += b.planned
        self.stats.converted.update(b.converted)
        for reason in b.converted:
            sink().inc("mae_pipeline_samples_converted_total", reason=reason)
        for key, reason in b.skips:
            self.stats.skipped[reason] += 1
            sink().inc("mae_pipeline_samples_skipped_total", backend=self.config.backend, reason=reason)
            log.warning("skipped corrupt sample %s: %s", key, reason)
        skipped += len(b.skips)
        budget = int(self.config.max_corrupt_fraction * len(ids))
        if skipped > budget:
            raise CorruptDataError(
                f"{skipped} corrupt samples on rank {self.rank} this epoch exceed max_corrupt_fraction="
                f"{self.config.max_corrupt_fraction} of {len(ids)} ({dict(self.stats.skipped)}); last: "
                f"{b.skips[-1][0]} ({b.skips[-1][1]})")
        self.stats.images += len(b.keys)
        self.stats.batches += 1
        return skipped

    def overlap_lead(self) -> int:
        """How many batches before an epoch's end the next one starts (0: not
        early): the backend's batches in flight, so that its new workers start
        as the old ones run out of work. A backend with nothing to set up keeps 0."""
        return 0

    def _start_next_epoch(self) -> None:
        """Set up the epoch after this one now (its workers forked, its first
        shards fetched), so that its first batch does not wait for that."""
        epoch, segments = self.epoch + 1, [[self.world_size, 0]]
        ids, consumed = self.plan.rank_sequence(epoch, segments, self.rank)
        todo = self._span(ids, consumed)
        if not len(todo):
            return
        try:
            with startup_objects_frozen():
                run = self._start(todo, epoch)
        except Exception as e:  # noqa: BLE001 - best effort (a fork out of memory...): it starts at its turn
            log.warning("could not start epoch %d early (%s: %s); it starts at its turn", epoch, type(e).__name__, e)
            return
        self.next_epoch.put((epoch, segments), run)
        self.stats.epochs_started_early += 1
        global _EXIT_HOOK
        if not _EXIT_HOOK:  # registered now, after torch's and multiprocessing's exit hooks: it runs before them,
            _EXIT_HOOK = True  # while torch still shuts workers down (it does nothing once its own hook ran)
            atexit.register(_close_open_epochs)
        _OPEN.add(self.next_epoch)

    def _planned_batches(self, ids: np.ndarray, epoch: int, started: EpochRun | None = None) -> Iterator[DecodedBatch]:
        """The backend's batches of ``ids`` (those of ``started``, set up early,
        if given): its set-up and first batch run with the start-up objects
        frozen, and what the set-up holds is released however this ends."""
        with startup_objects_frozen():
            run = started or self._start(ids, epoch)
        try:
            yield from first_batch_frozen(run.batches)
        finally:
            run.close()

    def _start(self, ids: np.ndarray, epoch: int) -> EpochRun:
        """The batches of ``ids``, set up at once (a backend with nothing to set
        up: on the first batch)."""
        return EpochRun(self._batches(ids, epoch))

    def _finish(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """A backend's images -> the batch's: RandAugment on the device (unless the
        backend did it), normalization (unless the backend did it), random erasing."""
        aug, seed = self.config.augment, self.config.plan.seed
        if aug.rand_augment and not self.rand_augments:
            params = rand_augment_params(aug, seed, self.epoch, ids.tolist())
            images = rand_augment(images.to(self.device, non_blocking=True), params, aug.fill)
        if not self.normalizes:
            images = (self.normalizer(images, self.dtype) if self.config.normalize
                      else images.to(self.device, non_blocking=True))
        if aug.erasing:
            images = random_erase(images, erase_params(aug, seed, self.epoch, ids.tolist()))
        return images

    def _count_sources(self, planned: np.ndarray, kept: torch.Tensor) -> None:
        """Per source: samples delivered, and those planned but skipped as corrupt."""
        names = self.manifest.names
        n_planned = np.bincount(self.plan.source_of(planned), minlength=len(names))
        n_kept = np.bincount(self.plan.source_of(kept.numpy()), minlength=len(names))
        for i in np.flatnonzero(n_planned).tolist():
            if n_kept[i]:
                self.stats.sources[names[i]] += int(n_kept[i])
                sink().inc("mae_source_samples_total", int(n_kept[i]), source=names[i])
            if n_planned[i] > n_kept[i]:
                sink().inc("mae_source_samples_skipped_total", int(n_planned[i] - n_kept[i]), source=names[i])

    def _batches(self, ids: np.ndarray, epoch: int) -> Iterator[DecodedBatch]:
        raise NotImplementedError
