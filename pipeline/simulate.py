"""`mae simulate`: what a run will download and cache, computed from the plan alone.

No sample is read. The plan gives every rank's samples (pipeline/plan.py); the
simulator replays what the shard reader (pipeline/decode/reader.py) and the node's
shard cache (pipeline/storage/cache.py) do with them:

- each reader (a DataLoader worker of the ``cpu`` backend, reading batches
  ``w, w+K, ...``; the ``dali`` backend's one feed thread) opens a batch's shards
  in the order they first appear in it, keeps ``window_shards + 1`` open (pinned
  in the cache) and asks the cache for the next ``prefetch_shards`` shards of its
  first-use order at each batch, pinning each as it lands until it is opened;
- the node's cache, shared by its ranks, serves a hit (and marks it recently
  used) or downloads the shard, then evicts least-recently-used entries that no
  reader has open until it is under its limit.

Ranks of a node advance in step (same batch, same time), the way synchronous
data-parallel training drives them. Ranks are alike, so a few nodes stand for
the run. Time to the first batch is the plan's computation (measured here) plus
the manifest load plus the first batches' shards over the node's bandwidth.
"""

from __future__ import annotations

import math
import time
import tracemalloc
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from infra.options import option, require, require_non_negative, require_positive
from pipeline.plan import SamplePlan
from pipeline.storage.cache import eviction_target

if TYPE_CHECKING:
    from pipeline.loader import LoaderConfig

GiB, MiB = 2**30, 2**20


@dataclass(frozen=True)
class SimulationConfig:
    world_size: int = option(8, "ranks of the run")
    ranks_per_node: int = option(8, "ranks sharing one node's shard cache and network")
    epochs: int = option(2, "epochs to replay; the first starts with an empty cache")
    nodes: int = option(1, "nodes to replay, spread over the run (ranks are alike; more nodes average)")
    bandwidth_gbit: float = option(25.0, "network bandwidth of one node, Gbit/s")
    target_images_per_s: float = option(0.0, "the run's images/sec to size the bandwidth for (0: none)")
    manifest_seconds: float = option(0.0, "time to load the manifest (measured by the caller when one was read)")

    def __post_init__(self) -> None:
        require_positive(self, "world_size", "ranks_per_node", "epochs", "nodes", "bandwidth_gbit")
        require_non_negative(self, "target_images_per_s", "manifest_seconds")
        require(self.world_size <= 2**24, "world_size", f"must be at most {2**24}, got {self.world_size}")


@dataclass(frozen=True)
class ReaderSettings:
    """The loader settings that decide traffic (from ``LoaderConfig``)."""

    batch_size: int
    readers: int  # per rank: cpu DataLoader workers, 1 for dali/ffcv
    keep_open: int  # window_shards + 1
    prefetch: int
    cache_limit_bytes: int
    drop_last: bool = False


@dataclass
class EpochTraffic:
    """One epoch on the replayed nodes, summed over them."""

    samples: int = 0
    downloads: int = 0
    bytes: int = 0
    redownloads: int = 0  # downloads of a shard the node had downloaded before (evicted in between)
    redownload_bytes: int = 0
    hits: int = 0


@dataclass
class SimulationReport:
    config: SimulationConfig
    settings: ReaderSettings
    nodes_replayed: int
    ranks_replayed: int
    plan_bytes: int  # peak memory of one rank's plan of an epoch
    plan_seconds: float  # one rank's first batch of sample ids, from shard sizes
    first_batch_bytes: int  # shards one node needs before its ranks' first batches
    max_shard_bytes: int
    epochs: list[EpochTraffic] = field(default_factory=list)
    peak_pinned_bytes: int = 0  # shards held open by a node's readers at once
    peak_cache_bytes: int = 0

    def per_rank(self, epoch: int, what: str) -> float:
        return getattr(self.epochs[epoch], what) / max(1, self.ranks_replayed)

    @property
    def first_batch_seconds(self) -> float:
        return (self.config.manifest_seconds + self.plan_seconds
                + self.first_batch_bytes * 8 / (self.config.bandwidth_gbit * 1e9))

    def node_gbit_needed(self, epoch: int) -> float:
        """Download rate one node needs to feed ``target_images_per_s`` over the run."""
        cfg = self.config
        per_node_ips = cfg.target_images_per_s * min(cfg.ranks_per_node, cfg.world_size) / cfg.world_size
        t = self.epochs[epoch]
        return t.bytes / max(1, t.samples) * per_node_ips * 8 / 1e9


class NodeCache:
    """The node's shard cache as ``ShardCache`` behaves: LRU by last use, entries
    open in a reader pinned; a download that takes it over its limit evicts down to
    ``eviction_target``."""

    def __init__(self, shard_bytes: np.ndarray, limit: int) -> None:
        self.shard_bytes, self.limit = shard_bytes, limit
        self.entries: OrderedDict[int, int] = OrderedDict()  # shard -> bytes, least recently used first
        self.pins: Counter = Counter()
        self.size = self.pinned = self.peak_pinned = self.peak_size = 0
        self.downloaded: set[int] = set()
        self.traffic = EpochTraffic()

    def local_path(self, shard: int) -> None:
        if shard in self.entries:
            self.entries.move_to_end(shard)
            self.traffic.hits += 1
            return
        size = int(self.shard_bytes[shard])
        t = self.traffic
        t.downloads, t.bytes = t.downloads + 1, t.bytes + size
        if shard in self.downloaded:
            t.redownloads, t.redownload_bytes = t.redownloads + 1, t.redownload_bytes + size
        self.downloaded.add(shard)
        self.entries[shard] = size
        self.size += size
        self._evict(keep=shard)
        self.peak_size = max(self.peak_size, self.size)  # above the limit only when open entries fill it

    def _evict(self, keep: int) -> None:
        if self.size <= self.limit:
            return
        target = eviction_target(self.limit, len(self.entries))
        for shard in list(self.entries):
            if self.size <= target:
                return
            if shard != keep and not self.pins[shard]:
                self.size -= self.entries.pop(shard)

    def pin(self, shard: int, by: int) -> None:
        if not self.pins[shard]:
            self.pinned += int(self.shard_bytes[shard])
            self.peak_pinned = max(self.peak_pinned, self.pinned)
        self.pins[shard] += by
        if not self.pins[shard]:
            self.pinned -= int(self.shard_bytes[shard])
            del self.pins[shard]


class _Reader:
    """One ``ShardReader``: its open shards, the batch's shards fetched side by side,
    and its prefetch schedule."""

    def __init__(self, cache: NodeCache, settings: ReaderSettings, batch_shards: list[list[int]],
                 first_shards: list[int]) -> None:
        self.cache, self.settings = cache, settings
        self.batches, self.firsts = batch_shards, first_shards
        self.order = list(dict.fromkeys(s for b in batch_shards for s in b))  # first-use order
        self.first_use = {s: k for k, s in enumerate(self.order)}
        self.open: OrderedDict[int, None] = OrderedDict()
        self.scheduled: set[int] = set()  # fetched ahead, pinned from landing until opened
        self.landing: list[int] = []  # prefetched in this batch, still downloading

    def read(self, j: int) -> None:
        """Batch ``j`` of this reader: schedule prefetches, open its shards."""
        if not self.batches[j]:
            return
        k = self.first_use[self.firsts[j]]
        for s in dict.fromkeys(self.batches[j]):  # a batch's own shards are fetched side by side before it
            if s not in self.open and s not in self.scheduled:  # reads them: all land (pinned) first
                self.scheduled.add(s)
                self._land(s)
        self.landing = []  # prefetch downloads run in threads: they land after this batch opened its shards
        for s in self.order[k + 1:k + 1 + self.settings.prefetch]:
            if s not in self.scheduled and s not in self.open:
                self.scheduled.add(s)
                if s in self.cache.entries:
                    self._land(s)
                else:
                    self.landing.append(s)
        self._open_shards(self.batches[j])
        for s in self.landing:
            self._land(s)

    def _land(self, shard: int) -> None:
        self.cache.local_path(shard)
        self.cache.pin(shard, 1)

    def _open_shards(self, shards: list[int]) -> None:
        for s in shards:
            if s in self.open:
                self.open.move_to_end(s)
                continue
            if s in self.scheduled:  # prefetched: the reader waits for it to land, then owns its pin
                if s in self.landing:
                    self.landing.remove(s)
                    self._land(s)
                self.scheduled.discard(s)
            else:
                self.cache.local_path(s)
                self.cache.pin(s, 1)
            self.open[s] = None
            while len(self.open) > self.settings.keep_open:
                self.cache.pin(self.open.popitem(last=False)[0], -1)

    def close(self) -> None:
        for s in [*self.open, *self.scheduled]:
            self.cache.pin(s, -1)
        self.open.clear()
        self.scheduled.clear()


def reader_batches(plan: SamplePlan, ids: np.ndarray, settings: ReaderSettings) -> list[tuple[list[list[int]], list[int]]]:
    """Per reader of a rank: each of its batches' shards (first-appearance order)
    and the shard of each batch's first sample."""
    bs, k = settings.batch_size, max(1, settings.readers)
    n_batches = len(ids) // bs if settings.drop_last else -(-len(ids) // bs)
    shard = plan.locate(ids[:n_batches * bs] if settings.drop_last else ids)[0]
    batch = np.arange(len(shard)) // bs
    key = batch * (int(shard.max()) + 1 if len(shard) else 1) + shard
    _, first = np.unique(key, return_index=True)
    first.sort()
    per_batch: list[list[int]] = [[] for _ in range(n_batches)]
    for b, s in zip(batch[first].tolist(), shard[first].tolist()):
        per_batch[b].append(s)
    firsts = [p[0] if p else -1 for p in per_batch]
    return [([per_batch[j] for j in range(w, n_batches, k)], [firsts[j] for j in range(w, n_batches, k)])
            for w in range(k)]


def node_ranks(world: int, per_node: int, nodes: int) -> list[list[int]]:
    """The ranks of ``nodes`` nodes spread over the run."""
    total = -(-world // per_node)
    picks = sorted(set(np.linspace(0, total - 1, min(nodes, total)).round().astype(int).tolist()))
    return [list(range(n * per_node, min(world, (n + 1) * per_node))) for n in picks]


def measure_plan(plan_factory: Callable[[], SamplePlan], world: int, rank: int = 0) -> tuple[int, float]:
    """(peak bytes, seconds) of one rank's first epoch of sample ids from a fresh plan
    (numpy's RNG module, loaded once per process, is loaded before)."""
    np.random.default_rng(0)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        plan = plan_factory()
        plan.rank_sequence(0, [[world, 0]], rank)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, seconds


def simulate(plan_factory: Callable[[], SamplePlan], shard_bytes: np.ndarray, settings: ReaderSettings,
             config: SimulationConfig) -> SimulationReport:
    """Replay ``config.epochs`` epochs of ``config.nodes`` nodes; ``plan_factory()``
    makes the run's ``SamplePlan`` (called for the measurement and the replay)."""
    peak, seconds = measure_plan(plan_factory, config.world_size)
    plan = plan_factory()
    nodes = node_ranks(config.world_size, config.ranks_per_node, config.nodes)
    report = SimulationReport(config, settings, len(nodes), sum(map(len, nodes)), peak, seconds, 0,
                              int(np.max(shard_bytes)))
    report.epochs = [EpochTraffic() for _ in range(config.epochs)]
    for n, ranks in enumerate(nodes):
        cache = NodeCache(np.asarray(shard_bytes, dtype=np.int64), settings.cache_limit_bytes)
        for epoch in range(config.epochs):
            cache.traffic = report.epochs[epoch]
            readers = _epoch_readers(plan, epoch, ranks, cache, settings, config.world_size)
            if epoch == 0 and n == 0:
                report.first_batch_bytes = sum(int(shard_bytes[s]) for s in
                                               {s for r in readers if r.batches for s in r.batches[0]})
            _replay(readers)
        report.peak_pinned_bytes = max(report.peak_pinned_bytes, cache.peak_pinned)
        report.peak_cache_bytes = max(report.peak_cache_bytes, cache.peak_size)
    return report


def _epoch_readers(plan: SamplePlan, epoch: int, ranks: Sequence[int], cache: NodeCache,
                   settings: ReaderSettings, world: int) -> list[_Reader]:
    readers = []
    for rank in ranks:
        ids, _ = plan.rank_sequence(epoch, [[world, 0]], rank)
        cache.traffic.samples += len(ids)
        readers += [_Reader(cache, settings, b, f) for b, f in reader_batches(plan, ids, settings)]
    return readers


def _replay(readers: list[_Reader]) -> None:
    """Every reader's batch j, then j + 1, ...: ranks in step, workers in turn."""
    for j in range(max((len(r.batches) for r in readers), default=0)):
        for r in readers:
            if j < len(r.batches):
                r.read(j)
    for r in readers:
        r.close()


# ------------------------------------------------------------- `mae simulate`
def reader_settings(data: LoaderConfig) -> ReaderSettings:
    """What a loader config means for traffic: the cpu backend reads in each
    DataLoader worker, the others in one thread."""
    readers = max(1, data.num_workers) if data.backend == "cpu" else 1
    return ReaderSettings(data.batch_size, readers, data.plan.window_shards + 1, data.storage.prefetch_shards,
                          data.storage.cache_limit_bytes, data.drop_last)


def synthetic_shards(samples: int, shards: int, shard_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(samples, bytes) of ``shards`` equal shards holding ``samples`` in all."""
    require(shards >= 1 and samples >= shards, "shards", f"need 1 <= shards <= samples, got {shards} and {samples}")
    sizes = np.full(shards, samples // shards, dtype=np.int64)
    sizes[:samples % shards] += 1
    return sizes, np.full(shards, shard_bytes, dtype=np.int64)


def simulate_data(data: LoaderConfig, config: SimulationConfig, synthetic: tuple[int, int, int] | None = None,
                  started: float | None = None) -> tuple[SimulationReport, str]:
    """Simulate the run ``data`` describes: its datasets' manifests (indexes) are
    read, no shard; or ``synthetic`` = (samples, shards, bytes per shard)."""
    import dataclasses

    if synthetic is not None:
        sizes, nbytes = synthetic_shards(*synthetic)
        quotas = None
        what = f"synthetic: {int(sizes.sum()):,} samples in {len(sizes):,} shards of {synthetic[2] / MiB:.0f} MiB"
    else:
        from pipeline.mixture import DataSources

        sources = DataSources(data)
        sizes, quotas = sources.shard_sizes(), sources.plan_quotas()
        nbytes = np.concatenate([t.nbytes for t in sources.tables])
        what = ", ".join(f"{n}: {q:,} of {t.total_samples:,} samples/epoch in {len(t):,} shards"
                         for n, q, t in zip(sources.names, sources.quotas, sources.tables))
        if started is not None:
            config = dataclasses.replace(config, manifest_seconds=time.perf_counter() - started)
    return simulate(lambda: SamplePlan(sizes, data.plan, quotas), nbytes, reader_settings(data), config), what


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def _rate(gbit: float) -> str:
    return f"{gbit / 1e3:,.2f} Tbit/s" if gbit >= 1e3 else f"{gbit:,.2f} Gbit/s"


def report_lines(r: SimulationReport, what: str) -> list[str]:
    """The simulation as `mae simulate` prints it."""
    cfg, st = r.config, r.settings
    nodes = -(-cfg.world_size // cfg.ranks_per_node)
    lines = [f"{what}; {cfg.world_size:,} ranks ({nodes:,} nodes x {min(cfg.ranks_per_node, cfg.world_size)}), "
             f"window {st.keep_open - 1}, {st.readers} reader(s)/rank, prefetch {st.prefetch}, batch {st.batch_size}, "
             f"cache {_size(st.cache_limit_bytes)}/node; replayed {r.nodes_replayed} node(s), {cfg.epochs} epochs",
             f"plan         one rank: {_size(r.plan_bytes)} peak, {r.plan_seconds:.3f} s to its sample ids "
             f"({r.per_rank(0, 'samples'):,.0f} samples/epoch)",
             f"first batch  {r.first_batch_seconds:.2f} s: manifest {cfg.manifest_seconds:.2f} s + plan "
             f"{r.plan_seconds:.2f} s + {_size(r.first_batch_bytes)} of shards per node at {cfg.bandwidth_gbit:g} Gbit/s"]
    for e in range(len(r.epochs)):
        lines.append(f"epoch {e:<6} per rank {_size(r.per_rank(e, 'bytes'))} downloaded "
                     f"({r.per_rank(e, 'downloads'):,.1f} shards), {r.per_rank(e, 'redownloads'):,.1f} re-downloads "
                     f"({_size(r.per_rank(e, 'redownload_bytes'))}) under the cache limit, "
                     f"{r.per_rank(e, 'hits'):,.0f} cache hits")
    lines.append(f"cache        peak {_size(r.peak_cache_bytes)} per node, of which held open or prefetched by readers "
                 f"{_size(r.peak_pinned_bytes)}")
    if cfg.target_images_per_s:
        need = [r.node_gbit_needed(e) for e in range(len(r.epochs))]
        lines.append(f"bandwidth    at {cfg.target_images_per_s:,.0f} img/s: "
                     + ", ".join(f"epoch {e} {_rate(g)} per node ({_rate(g * nodes)} in all)" for e, g in enumerate(need))
                     + ("; MORE than the node's network" if max(need) > cfg.bandwidth_gbit else ""))
    if r.peak_cache_bytes > st.cache_limit_bytes:
        lines.append(f"warning      the cache ran over its limit to {_size(r.peak_cache_bytes)} (readers held "
                     f"{_size(r.peak_pinned_bytes)} open or prefetched): the node's disk needs that much, and "
                     f"shards leave the cache as soon as they close; raise data.storage.cache_limit_gb to "
                     f"{max(math.ceil(r.peak_pinned_bytes / GiB * 100) / 100, 0.01):.2f} or more")
    return lines
