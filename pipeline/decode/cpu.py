"""The `cpu` decode backend: torch DataLoader workers decoding on the host CPU.

Each DataLoader worker owns the batches ``j`` with ``j % num_workers == worker`` of
this rank's plan, and the DataLoader hands batches out round-robin, so the output
order is exactly the plan's whatever the worker count. Workers fetch shards
through the shared on-disk cache (prefetching the next ones in threads), decode
and crop (``pipeline.decode.crop``: libjpeg-turbo at the smallest DCT scale the
crop allows, then one bicubic resize; PIL as the reference), flip, and return
uint8 — 4x less to move between processes than float; normalization happens after
the copy to the device.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import signal
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from infra.metrics import sink
from pipeline.augment import sample_rng
from pipeline.decode.crop import decode_crop
from pipeline.images import BadImage
from pipeline.loader import PlannedLoader
from pipeline.manifest import ShardInfo
from pipeline.storage import ShardStore
from pipeline.tar_shards import SampleIndex, ShardFormatError, image_member, index_tar, label_of, read_members

log = logging.getLogger(__name__)


class ShardReader:
    """Per-process access to a dataset's samples by (shard, index), keeping a few
    shards open (and pinned in the cache) and prefetching upcoming ones."""

    def __init__(self, store: ShardStore, shards: list[ShardInfo], keep_open: int, prefetch: int) -> None:
        self.store, self.shards = store, shards
        self.keep_open, self.prefetch = max(1, keep_open), prefetch
        self._open: OrderedDict[int, tuple[BinaryIO, list[SampleIndex]]] = OrderedDict()
        self._pool = cf.ThreadPoolExecutor(max(1, prefetch), thread_name_prefix="shard-prefetch")
        self._futures: dict[int, cf.Future] = {}

    def schedule(self, upcoming: list[int]) -> None:
        """Start fetching the next shards this reader will need."""
        for s in upcoming[: self.prefetch]:
            if s not in self._futures and s not in self._open:
                self._futures[s] = self._pool.submit(self.store.local_path, self.shards[s])

    def sample(self, shard: int, index: int) -> tuple[str, dict[str, bytes]]:
        f, samples = self._shard(shard)
        entry = samples[index]
        return entry.key, read_members(f, entry)

    def _shard(self, shard: int) -> tuple[BinaryIO, list[SampleIndex]]:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        future = self._futures.pop(shard, None)
        if future is not None:
            future.result()  # prefetched into the cache (or raises its fetch error)
        f = self.store.open_shard(self.shards[shard])  # pinned while open
        info = self.shards[shard]
        samples = index_tar(f, info.name)
        if len(samples) != info.samples:
            f.close()
            raise ShardFormatError(f"{info.name}: {len(samples)} samples in the tar, manifest says {info.samples}")
        self._open[shard] = (f, samples)
        while len(self._open) > self.keep_open:
            _, (old, _) = self._open.popitem(last=False)
            old.close()
        return self._open[shard]

    def close(self) -> None:
        for f, _ in self._open.values():
            f.close()
        self._open.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


def read_batches(loader: PlannedLoader, ids: np.ndarray,
                 batches: Iterable[int]) -> Iterator[tuple[np.ndarray, list[tuple[int, str, dict[str, bytes]]]]]:
    """The samples of batches ``batches`` (numbers into ``ids`` cut in batch_size
    pieces), in order: per batch its planned ids and ``(id, "<shard>/<key>",
    members)`` of each sample, read through one ShardReader that prefetches the
    shards it will need next."""
    bs, batches = loader.config.batch_size, list(batches)
    mine = np.concatenate([ids[j * bs:(j + 1) * bs] for j in batches]) if batches else ids[:0]
    shard_of, index_of = loader.plan.locate(mine)
    order = list(dict.fromkeys(shard_of.tolist()))  # shards in first-use order
    first_use = {s: k for k, s in enumerate(order)}
    shards = loader.manifest.shards
    reader = ShardReader(loader.store, shards, keep_open=loader.config.plan.window_shards + 1,
                         prefetch=loader.config.storage.prefetch_shards)
    try:
        pos = 0
        for j in batches:
            batch_ids = ids[j * bs:(j + 1) * bs]
            if len(batch_ids):
                reader.schedule(order[first_use[int(shard_of[pos])] + 1:])
            samples = []
            for k, gid in enumerate(batch_ids.tolist()):
                key, members = reader.sample(int(shard_of[pos + k]), int(index_of[pos + k]))
                samples.append((gid, f"{shards[int(shard_of[pos + k])].name}/{key}", members))
            yield batch_ids, samples
            pos += len(batch_ids)
    finally:
        reader.close()


class _RankEpoch(IterableDataset):
    """One rank's remaining batches of one epoch, split over DataLoader workers."""

    def __init__(self, loader: CpuLoader, ids: np.ndarray, epoch: int) -> None:
        self.loader, self.config, self.epoch, self.ids = loader, loader.config, epoch, ids

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batches = range(worker, -(-len(self.ids) // self.config.batch_size), workers)
        for ids, samples in read_batches(self.loader, self.ids, batches):
            yield self._batch(ids, samples)

    def _batch(self, ids: np.ndarray, samples: list[tuple[int, str, dict[str, bytes]]]) -> tuple:
        cfg = self.config
        images, labels, keys, kept, skips, converted = [], [], [], [], [], []
        for gid, name, members in samples:
            try:
                data = image_member(members)
                arr, mode_reason = decode_crop(data, cfg.policy, cfg.augment, sample_rng(cfg.plan.seed, self.epoch, gid))
            except BadImage as e:
                skips.append((name, e.reason))
                continue
            if mode_reason:
                converted.append(mode_reason)
            images.append(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1))
            labels.append(label_of(members))
            keys.append(name)
            kept.append(gid)
        S = cfg.augment.img_size
        stacked = torch.stack(images) if images else torch.empty(0, 3, S, S, dtype=torch.uint8)
        sink().inc("mae_pipeline_images_decoded_total", len(images), backend="cpu")
        return stacked, torch.tensor(labels, dtype=torch.int64), keys, torch.tensor(kept, dtype=torch.int64), len(ids), skips, converted


WORKER_STOP_GRACE_S = 60


def _defer_stop_signals(worker_id: int) -> None:
    """Preemption (SIGTERM) and Ctrl-C reach every process of a job. The trainer
    handles them — finishes the step, saves, shuts its workers down — so a worker
    must not die first: on SIGTERM it only schedules its own exit (SIGALRM) after
    a grace period, in case nobody shuts it down."""
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.alarm(WORKER_STOP_GRACE_S))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sink().worker_init()


class CpuLoader(PlannedLoader):
    """The reference decode path (PIL in DataLoader worker processes)."""

    def _batches(self, ids: np.ndarray, epoch: int) -> Iterator[tuple]:
        dataset = _RankEpoch(self, ids, epoch)
        workers = self.config.num_workers
        loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                            pin_memory=self.device.type == "cuda", worker_init_fn=_defer_stop_signals,
                            prefetch_factor=2 if workers else None, persistent_workers=False)
        it = iter(loader)
        try:
            yield from it
        finally:  # also on close() or an exception upstream: stop workers now, gracefully
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

