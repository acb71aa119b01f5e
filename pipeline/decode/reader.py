"""One shard reader for every backend that reads tar shards (``cpu``, ``dali``).

``read_batches`` walks a rank's planned batches and returns each sample's bytes,
through a ``ShardReader`` that keeps a few shards open (pinned in the cache) and
prefetches the next ones in threads.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from pipeline.errors import ShardFormatError
from pipeline.shards.labels import rule_of
from pipeline.shards.tar_format import SampleIndex, index_shard, read_members

if TYPE_CHECKING:
    from pipeline.loader import LoaderConfig
    from pipeline.mixture import DataSources
    from pipeline.plan import SamplePlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedData:
    """What reading a rank's planned samples needs of its loader, and no more. An
    epoch's workers and reader threads hold this, not the loader: a loader dropped
    while its next epoch runs early is then freed at once, which stops that epoch."""

    config: LoaderConfig
    plan: SamplePlan
    manifest: DataSources


class ShardReader:
    """Per-process access to a dataset's samples by (shard, index), keeping a few
    shards open (and pinned in the cache) and fetching in threads both the shards
    a batch is about to read (all at once) and the next ones. A fetched shard is
    opened (pinned) as soon as it lands, so the cache cannot evict it before this
    reader uses it: no download is wasted."""

    def __init__(self, data: DataSources, keep_open: int, prefetch: int) -> None:
        self.data = data  # shard g: data.shard(g), fetched through data.store_of(g)
        # labels of tars indexed in place: each source's rule, against its classes
        self.rules = [rule_of(t.options) for t in data.tables]
        self.class_index = [{c: i for i, c in enumerate(data.classes or t.classes)} for t in data.tables]
        self.keep_open, self.prefetch = max(1, keep_open), prefetch
        self._open: OrderedDict[int, tuple[BinaryIO, list[SampleIndex]]] = OrderedDict()
        # a thread per shard a batch can hold open, and per prefetched one: nothing queues
        self._pool = cf.ThreadPoolExecutor(self.keep_open + prefetch, thread_name_prefix="shard-fetch")
        self._futures: dict[int, cf.Future] = {}

    def fetch(self, shards: Iterable[int]) -> None:
        """Start fetching these shards now, side by side (a batch's own, before it
        reads them: the batch waits for the slowest, not for their sum)."""
        for s in shards:
            if s not in self._futures and s not in self._open:
                self._futures[s] = self._pool.submit(self.data.store_of(s).open_shard, self.data.shard(s))

    def schedule(self, upcoming: list[int]) -> None:
        """Start fetching the next shards this reader will need."""
        self.fetch(upcoming[: self.prefetch])

    def sample(self, shard: int, index: int) -> tuple[str, dict[str, bytes]]:
        f, samples = self._shard(shard)
        entry = samples[index]
        members = read_members(f, entry)
        source = self.data.source_of_shard(shard)
        rule = self.rules[source]
        return entry.key, members if rule is None else rule.members(entry.key, members, self.class_index[source])

    def _shard(self, shard: int) -> tuple[BinaryIO, list[SampleIndex]]:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        future = self._futures.pop(shard, None)
        info = self.data.shard(shard)
        # pinned while open; a prefetched one was opened when it landed (or raises its fetch error)
        f = future.result() if future is not None else self.data.store_of(shard).open_shard(info)
        samples = index_shard(f, info)
        if len(samples) != info.samples:
            f.close()
            raise ShardFormatError(f"{info.name}: {len(samples)} samples in the tar, manifest says {info.samples}")
        renamed = [s for s in samples if s.renamed_from]
        if renamed:
            log.warning("%s: %d samples repeat an earlier key and are read under new keys (first: %s -> %s)",
                        info.name, len(renamed), renamed[0].renamed_from, renamed[0].key)
        self._open[shard] = (f, samples)
        while len(self._open) > self.keep_open:
            _, (old, _) = self._open.popitem(last=False)
            old.close()
        return self._open[shard]

    def close(self) -> None:
        for f, _ in self._open.values():
            f.close()
        self._open.clear()
        for future in self._futures.values():
            future.cancel()
            future.add_done_callback(_close_landed)  # one still fetching closes when it lands
        self._futures.clear()
        self._pool.shutdown(wait=False)


def _close_landed(future: cf.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def read_batches(loader: PlannedData, ids: np.ndarray,
                 batches: Iterable[int]) -> Iterator[tuple[np.ndarray, list[tuple[int, str, dict[str, bytes]]]]]:
    """The samples of batches ``batches`` (numbers into ``ids`` cut in batch_size
    pieces), in order: per batch its planned ids and ``(id, "<shard>/<key>",
    members)`` of each sample, read through one ShardReader: a batch's shards not
    open yet are fetched side by side before it reads them, and the ones after
    are prefetched."""
    bs, batches = loader.config.batch_size, list(batches)
    mine = np.concatenate([ids[j * bs:(j + 1) * bs] for j in batches]) if batches else ids[:0]
    shard_of, index_of = loader.plan.locate(mine)
    order = list(dict.fromkeys(shard_of.tolist()))  # shards in first-use order
    first_use = {s: k for k, s in enumerate(order)}
    reader = ShardReader(loader.manifest, keep_open=loader.config.plan.window_shards + 1,
                         prefetch=loader.config.storage.prefetch_shards)
    try:
        pos = 0
        for j in batches:
            batch_ids = ids[j * bs:(j + 1) * bs]
            if len(batch_ids):
                reader.fetch(dict.fromkeys(shard_of[pos:pos + len(batch_ids)].tolist()))
                reader.schedule(order[first_use[int(shard_of[pos])] + 1:])
            samples = []
            for k, gid in enumerate(batch_ids.tolist()):
                key, members = reader.sample(int(shard_of[pos + k]), int(index_of[pos + k]))
                samples.append((gid, f"{loader.manifest.label(int(shard_of[pos + k]))}/{key}", members))
            yield batch_ids, samples
            pos += len(batch_ids)
    finally:
        reader.close()


def warm_first_batch(loader: PlannedData, ids: np.ndarray) -> None:
    """Start fetching, in threads of this (the parent) process, the shards the first
    batch of ``ids`` needs into the node's cache — while the DataLoader workers are
    still starting (fork, object-store client). The worker that reads a shard then
    finds it cached, or waits on its download lock instead of fetching it again. An
    error here is left for that worker to meet and report; datasets read in place
    need nothing."""
    if not len(ids):
        return
    shard_of, _ = loader.plan.locate(ids[:loader.config.batch_size])
    data = loader.manifest
    stores = {s: data.store_of(s) for s in dict.fromkeys(shard_of.tolist())}
    cached = [(store, data.shard(s)) for s, store in stores.items() if store.cache is not None]
    if not cached:
        return
    pool = cf.ThreadPoolExecutor(len(cached), thread_name_prefix="first-batch")
    for store, shard in cached:
        pool.submit(store.local_path, shard)
    pool.shutdown(wait=False)
