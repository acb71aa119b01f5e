"""The `cpu` decode backend: torch DataLoader workers decoding on the host CPU.

Each DataLoader worker owns the batches ``j`` with ``j % num_workers == worker`` of
this rank's plan, and the DataLoader hands batches out round-robin, so the output
order is exactly the plan's whatever the worker count. Workers fetch shards
through the shared on-disk cache (prefetching the next ones in threads), decode
and crop (``pipeline.decode.crop``: libjpeg-turbo at the smallest DCT scale the
crop allows, then one bicubic resize; PIL as the reference), flip, and return
uint8 — 4x less to move between processes than float; with the fine-tuning recipe
they also apply RandAugment there (torch ops on the uint8 crops). Normalization and
random erasing happen after the copy to the device.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from infra.metrics import sink
from pipeline.augment import rand_augment_params, sample_rng
from pipeline.decode.base import DecodedBatch, EpochRun, PlannedLoader
from pipeline.decode.crop import decode_crop
from pipeline.decode.reader import read_batches, warm_first_batch
from pipeline.errors import PipelineError
from pipeline.images import BadImage
from pipeline.randaugment import rand_augment
from pipeline.shards.tar_format import image_member, label_of

log = logging.getLogger(__name__)


class _WorkerError:
    """A data error (a corrupt shard, a failed fetch, a cache folder it cannot write)
    met in a worker, sent to the main process as an item and raised there as it was:
    torch would re-raise it with the worker's whole traceback folded into its message."""

    def __init__(self, error: PipelineError | OSError) -> None:
        self.error = error


class _RankEpoch(IterableDataset):
    """One rank's remaining batches of one epoch, split over DataLoader workers."""

    def __init__(self, loader: CpuLoader, ids: np.ndarray, epoch: int) -> None:
        self.data, self.config, self.epoch, self.ids = loader.data, loader.config, epoch, ids  # not the loader itself
        self.classes = len(loader.manifest.classes)

    def __iter__(self) -> Iterator[DecodedBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batches = range(worker, -(-len(self.ids) // self.config.batch_size), workers)
        try:
            for ids, samples in read_batches(self.data, self.ids, batches):
                yield self._batch(ids, samples)
        except (PipelineError, OSError) as e:
            if info is None:
                raise
            yield _WorkerError(e)

    def _batch(self, ids: np.ndarray, samples: list[tuple[int, str, dict[str, bytes]]]) -> DecodedBatch:
        cfg = self.config
        images, labels, keys, kept, skips, converted = [], [], [], [], [], []
        for gid, name, members in samples:
            try:
                label = label_of(members, self.classes)
                data = image_member(members)
                arr, mode_reason = decode_crop(data, cfg.images, cfg.augment, sample_rng(cfg.plan.seed, self.epoch, gid))
            except BadImage as e:
                skips.append((name, e.reason))
                continue
            if mode_reason:
                converted.append(mode_reason)
            images.append(arr)
            labels.append(label)
            keys.append(name)
            kept.append(gid)
        stacked = uint8_batch(images, cfg.augment.img_size)
        if cfg.augment.rand_augment and images:  # on the uint8 crops, in this worker
            stacked = rand_augment(stacked, rand_augment_params(cfg.augment, cfg.plan.seed, self.epoch, kept),
                                   cfg.augment.fill)
        sink().inc("mae_pipeline_images_decoded_total", len(images), backend="cpu")
        return DecodedBatch(stacked, torch.tensor(labels, dtype=torch.int64), keys, torch.tensor(kept, dtype=torch.int64),
                            len(ids), skips, converted)


def uint8_batch(images: list[np.ndarray], size: int) -> torch.Tensor:
    """(S, S, 3) crops -> one (B, 3, S, S) uint8 batch, channels-last in memory.

    Each crop is copied once, contiguously, into a buffer that a DataLoader worker
    makes in shared memory (as torch's own collate does), so handing the batch to
    the main process copies nothing more; (B, 3, S, S) is a view. Stacking (3, S, S)
    views of HWC crops instead is a transposing, element-by-element copy that costs
    about as much CPU as decoding the image."""
    numel = len(images) * size * size * 3
    if get_worker_info() is not None:
        storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(numel, device="cpu")
        out = torch.empty(0, dtype=torch.uint8).new(storage).view(len(images), size, size, 3)
    else:
        out = torch.empty((len(images), size, size, 3), dtype=torch.uint8)
    for slot, arr in zip(out.numpy(), images):
        slot[...] = arr
    return out.permute(0, 3, 1, 2)


WORKER_STOP_GRACE_S = 60


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _defer_stop_signals(worker_id: int) -> None:
    """Preemption (SIGTERM) and Ctrl-C reach every process of a job. The trainer
    handles them — finishes the step, saves, shuts its workers down — so a worker
    must not die first: on SIGTERM it only schedules its own exit (SIGALRM) after
    a grace period, in case nobody shuts it down. The worker was forked with these
    signals blocked (``_forked_with_stop_signals_blocked``): one that arrived since
    is delivered now, to these handlers."""
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.alarm(WORKER_STOP_GRACE_S))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    sink().worker_init()


def _forked_with_stop_signals_blocked(loader: DataLoader) -> Iterator:
    """``iter(loader)``, whose workers start with SIGTERM and SIGINT blocked until
    ``_defer_stop_signals`` has set their handlers. Otherwise a preemption that
    lands while a worker starts (every epoch forks new ones) meets torch's worker
    handler, which dies on a SIGTERM its parent did not send: the trainer then
    fails with 'DataLoader worker ... killed by signal' instead of saving. Only the
    forking thread's mask changes, and only for the fork."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class CpuLoader(PlannedLoader):
    """The reference decode path (PIL in DataLoader worker processes)."""

    rand_augments = True  # in the workers, on the host
    epoch_class = _RankEpoch  # what a worker makes of its samples (the streaming benchmark's: bytes only)

    def overlap_lead(self) -> int:
        return 2 * self.config.num_workers  # the DataLoader's prefetch window; without workers, nothing to set up

    def _start(self, ids: np.ndarray, epoch: int) -> EpochRun:
        dataset = self.epoch_class(self, ids, epoch)
        workers = self.config.num_workers
        if workers > 1 and self.config.storage.cache_mode == "memory" and not getattr(self, "_warned_memory", False):
            self._warned_memory = True
            log.warning("storage.cache_mode='memory' with %d cpu workers: each worker fetches the shards it reads "
                        "for itself, so a shard may be downloaded up to %d times; use cache_mode='disk' (shared "
                        "by the node's processes) or num_workers <= 1", workers, workers)
        # The DataLoader draws its workers' base seed from this generator, not from
        # torch's global RNG, which is the training loop's: an epoch started early, at
        # another point of the loop, must not shift it (the workers use no torch RNG).
        seeds = torch.Generator().manual_seed(hash((self.config.plan.seed, epoch, self.rank)) % 2**63)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, generator=seeds,
                            pin_memory=self.device.type == "cuda", worker_init_fn=_defer_stop_signals,
                            prefetch_factor=2 if workers else None, persistent_workers=False,
                            # workers are forked whatever the process's default start method (a library
                            # such as LitData sets 'spawn'): they inherit the plan and the reader set-up
                            multiprocessing_context="fork" if workers else None)
        it = _forked_with_stop_signals_blocked(loader) if workers else iter(loader)
        if workers:  # after the fork: no worker inherits these threads
            try:
                warm_first_batch(self.data, ids)
            except BaseException:
                it._shutdown_workers()
                raise
        # stops the workers now, gracefully, also if no batch was ever taken
        return EpochRun(_raising_worker_errors(it), getattr(it, "_shutdown_workers", lambda: None))


def _raising_worker_errors(batches: Iterator) -> Iterator[DecodedBatch]:
    for batch in batches:
        if isinstance(batch, _WorkerError):
            raise batch.error
        yield batch
