"""The sample plan: which sample every rank reads, in what order, every epoch.

Order (plan version 2) is a pure function of (seed, epoch), the shards' sample
counts and each source's samples per epoch (docs/DATA.md, "The sample plan"):

1. *visits*: each source contributes ``samples // size`` full passes over its
   shards and, for the rest, whole shards in a random order plus a random subset
   of one more shard (down-sampling reads few shards, up-sampling repeats them);
2. each source's visits are shuffled and spread over the epoch by their share of
   its samples, and all sources' visits merged in that order (one source: a
   plain shuffle of its shards; several: every stretch of the epoch holds each
   source in proportion to its quota);
3. consecutive runs of ``window_shards`` visits form windows; each window's
   samples are permuted with a generator keyed by (seed, epoch, window), so a
   window is generated only by the ranks that read it;
4. the epoch sequence is cut into equal contiguous blocks, one per rank.
   ``uneven='pad'`` repeats the first samples to fill the last block, ``'drop'``
   leaves the tail out of this epoch; either way every rank gets the same number
   of samples, hence the same number of steps.

A rank's part is computed from the window prefix sums (O(shards)) and the windows
it overlaps (O(samples it reads)); the epoch is never materialized. A sample read
again in the same epoch (up-sampling) carries the pass in its id:
``id = pass * total + sample``, so augmentation (keyed by id) differs per pass.

Resume: a position is (epoch, segments), each segment ``[world_size, consumed
per rank]``. With the same world size the rank continues at ``consumed``. With
another, the samples no rank has consumed yet (pads excluded, a dropped tail
included) are re-partitioned. The unconsumed samples are always a subsequence of
the epoch order, kept as runs of epoch positions (``Runs``), so each hop costs
O(world size), not O(samples).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from infra.options import option, require, require_choice
from pipeline.errors import ResumeStateError

PLAN_VERSION = 2  # bump when the order definition changes: saved positions of another version are refused
UNEVEN_POLICIES = ("pad", "drop")
MAX_SEGMENTS = 1000  # restarts on another world size within one epoch
MAX_WORLD = 2**24
_TAG = 0x504C414E  # "PLAN": keeps plan streams apart from per-sample augmentation streams
VISIT_STREAM, WINDOW_STREAM, SHARD_PICK_STREAM, SUBSET_STREAM = 1, 2, 3, 4


@dataclass(frozen=True)
class PlanConfig:
    seed: int = option(0, "sample order and per-sample augmentation")
    shuffle: bool = option(True, "false: shards and samples in manifest order (evaluation)")
    window_shards: int = option(4, "shards whose samples are shuffled together each epoch (docs/DATA.md)")
    uneven: str = option("pad", "samples % world != 0: 'pad' (repeat a few) or 'drop' the tail")

    def __post_init__(self) -> None:
        require_choice(self, "uneven", UNEVEN_POLICIES)
        require(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")
        require(self.window_shards >= 1, "window_shards", f"must be >= 1, got {self.window_shards}")


@dataclass(frozen=True)
class SourceQuota:
    """One source as the plan sees it: its shards ``[first_shard, end_shard)`` of the
    plan's shard list, and how many of its samples an epoch reads."""

    first_shard: int
    end_shard: int
    samples: int


@dataclass(frozen=True)
class EpochLayout:
    """One epoch's visits in reading order and where its windows start: O(shards)."""

    shard: np.ndarray  # (V,) int64 shard of each visit
    take: np.ndarray  # (V,) int64 samples the visit reads
    passes: np.ndarray  # (V,) int64 pass over its source (0 unless up-sampled)
    partial: np.ndarray  # (V,) int64 source whose random subset of the shard this is; -1: the whole shard
    window_start: np.ndarray  # (windows + 1,) int64 epoch position of each window's first sample

    @property
    def total(self) -> int:
        return int(self.window_start[-1])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.shard, self.take, self.passes, self.partial, self.window_start))


@dataclass(frozen=True)
class Runs:
    """A subsequence of the epoch order, as runs of consecutive epoch positions."""

    start: np.ndarray  # int64 epoch position of each run's first sample
    length: np.ndarray  # int64

    @classmethod
    def whole(cls, total: int) -> Runs:
        return cls(np.array([0], np.int64), np.array([total], np.int64))

    @property
    def total(self) -> int:
        return int(self.length.sum())

    def select(self, lo: np.ndarray, hi: np.ndarray) -> Runs:
        """Items ``[lo[i], hi[i])`` of this subsequence (sorted, disjoint), in order."""
        keep = hi > lo
        lo, hi = lo[keep], hi[keep]
        if not len(lo):
            return Runs(np.zeros(0, np.int64), np.zeros(0, np.int64))
        cum = np.concatenate([[0], np.cumsum(self.length)])
        cuts = np.unique(np.concatenate([cum[(cum > lo[0]) & (cum < hi[-1])], lo, hi]))
        begin, end = cuts[:-1], cuts[1:]
        inside = np.searchsorted(lo, begin, side="right") - 1
        begin, end, inside = begin[inside >= 0], end[inside >= 0], inside[inside >= 0]
        chosen = begin < hi[inside]
        begin, end = begin[chosen], end[chosen]
        run = np.searchsorted(cum, begin, side="right") - 1
        return Runs(self.start[run] + (begin - cum[run]), end - begin).merged()

    def merged(self) -> Runs:
        """Adjacent runs that continue each other joined into one."""
        if len(self.start) < 2:
            return self
        new = np.concatenate([[True], self.start[1:] != self.start[:-1] + self.length[:-1]])
        group = np.cumsum(new) - 1
        return Runs(self.start[new], np.bincount(group, weights=self.length).astype(np.int64))

    def then(self, other: Runs) -> Runs:
        return Runs(np.concatenate([self.start, other.start]), np.concatenate([self.length, other.length]))


class SamplePlan:
    """Deterministic per-epoch sample order over shards (of one or several sources),
    split across ranks, computed per rank without materializing the epoch."""

    def __init__(self, shard_sizes: Sequence[int] | np.ndarray, config: PlanConfig | None = None,
                 quotas: Sequence[SourceQuota] | None = None) -> None:
        sizes = np.asarray(shard_sizes, dtype=np.int64)
        if sizes.ndim != 1 or not len(sizes) or sizes.min() < 0:
            raise ValueError("a sample plan needs at least one shard and non-negative sizes")
        self.config = config or PlanConfig()
        self.shard_sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.total = int(self.offsets[-1])
        self.quotas = list(quotas) if quotas else [SourceQuota(0, len(sizes), self.total)]
        self._check_quotas()
        self.source_starts = np.array([self.offsets[q.first_shard] for q in self.quotas], dtype=np.int64)
        self._layouts: OrderedDict[int, EpochLayout] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _check_quotas(self) -> None:
        expect = 0
        for i, q in enumerate(self.quotas):
            if q.first_shard != expect or q.end_shard < q.first_shard or q.samples < 0:
                raise ValueError(f"source {i}: shards [{q.first_shard}, {q.end_shard}) must follow the previous "
                                 f"source's and its samples ({q.samples}) must be >= 0")
            if q.samples and not self.offsets[q.end_shard] - self.offsets[q.first_shard]:
                raise ValueError(f"source {i} has no samples but is asked for {q.samples} per epoch")
            expect = q.end_shard
        if expect != len(self.shard_sizes):
            raise ValueError(f"sources cover {expect} of {len(self.shard_sizes)} shards")

    @property
    def epoch_total(self) -> int:
        """Samples in one epoch (the sum of the sources' per-epoch samples)."""
        return sum(q.samples for q in self.quotas)

    # -- ids
    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Plan ids -> (shard index, index within shard)."""
        sample = self.sample_of(ids)
        shard = np.searchsorted(self.offsets, sample, side="right") - 1
        return shard, sample - self.offsets[shard]

    def sample_of(self, ids: np.ndarray) -> np.ndarray:
        """Plan ids -> sample ids in the manifest (the pass of an up-sampled read dropped)."""
        ids = np.asarray(ids, dtype=np.int64)
        return ids % self.total if self.total else ids

    def source_of(self, ids: np.ndarray) -> np.ndarray:
        """Plan ids -> index of the source each sample comes from."""
        return np.searchsorted(self.source_starts, self.sample_of(ids), side="right") - 1

    # -- one epoch's layout: O(shards)
    def layout(self, epoch: int) -> EpochLayout:
        if epoch not in self._layouts:
            self._layouts[epoch] = self._build_layout(epoch)
            while len(self._layouts) > 2:
                self._layouts.popitem(last=False)
        return self._layouts[epoch]

    def _rng(self, epoch: int, stream: int, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, epoch, _TAG, stream, *key])

    def _build_layout(self, epoch: int) -> EpochLayout:
        parts = [self._source_visits(epoch, i, q) for i, q in enumerate(self.quotas)]
        shard, take, passes, partial = (np.concatenate([p[k] for p in parts]) for k in range(4))
        if self.config.shuffle and len(shard):
            order = np.argsort(np.concatenate([self._visit_times(epoch, i, p[1]) for i, p in enumerate(parts)]),
                               kind="stable")
            shard, take, passes, partial = shard[order], take[order], passes[order], partial[order]
        w = self.config.window_shards
        sizes = np.add.reduceat(take, np.arange(0, len(take), w)) if len(take) else np.zeros(0, np.int64)
        return EpochLayout(shard, take, passes, partial, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))

    def _visit_times(self, epoch: int, source: int, take: np.ndarray) -> np.ndarray:
        """Where in the epoch (0-1) each of a source's visits goes: the visits in a
        random order, each at a random point of its own stretch of the source's
        samples. Merging every source's visits by time interleaves them in
        proportion to their quotas all through the epoch."""
        rng = self._rng(epoch, VISIT_STREAM, source)
        order = rng.permutation(len(take))
        start = np.empty(len(take), np.float64)
        start[order] = np.cumsum(take[order]) - take[order]
        return (start + rng.random(len(take)) * take) / max(1, int(take.sum()))

    def _source_visits(self, epoch: int, source: int, q: SourceQuota) -> tuple[np.ndarray, ...]:
        """(shard, take, pass, partial) of one source's visits in an epoch."""
        shards = np.arange(q.first_shard, q.end_shard, dtype=np.int64)
        shards = shards[self.shard_sizes[shards] > 0]
        size = int(self.offsets[q.end_shard] - self.offsets[q.first_shard])
        full, rest = divmod(q.samples, size) if size else (0, 0)
        shard = np.tile(shards, full)
        passes = np.repeat(np.arange(full, dtype=np.int64), len(shards))
        covered = rest
        if rest:  # whole shards in a random order while they fit, then a subset of the next one
            pick = self._rng(epoch, SHARD_PICK_STREAM, source).permutation(shards) if self.config.shuffle else shards
            ends = np.cumsum(self.shard_sizes[pick])
            whole = int(np.searchsorted(ends, rest, side="right"))
            covered = int(ends[whole - 1]) if whole else 0
            extra = pick[:whole + (covered < rest)]
            shard, passes = np.concatenate([shard, extra]), np.concatenate([passes, np.full(len(extra), full)])
        take = self.shard_sizes[shard].copy()
        partial = np.full(len(shard), -1, dtype=np.int64)
        if covered < rest:
            take[-1], partial[-1] = rest - covered, source
        return shard, take, passes, partial

    # -- samples at epoch positions: O(positions + windows touched)
    def positions(self, epoch: int, runs: Runs) -> np.ndarray:
        """Plan ids at the epoch positions of ``runs``, in order."""
        layout = self.layout(epoch)
        ws = layout.window_start
        out = []
        for a, n in zip(runs.start.tolist(), runs.length.tolist()):
            b = a + n
            first = int(np.searchsorted(ws, a, side="right")) - 1
            for k in range(first, len(ws) - 1):
                if ws[k] >= b:
                    break
                out.append(self._window_ids(epoch, k, max(a, ws[k]) - ws[k], min(b, ws[k + 1]) - ws[k]))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _window_ids(self, epoch: int, k: int, lo: int, hi: int) -> np.ndarray:
        """Plan ids at positions ``[lo, hi)`` of window ``k``."""
        order = self._window_order(epoch, k)[lo:hi]
        layout = self.layout(epoch)
        w = self.config.window_shards
        take = layout.take[k * w:(k + 1) * w]
        ends = np.cumsum(take)
        v = np.searchsorted(ends, order, side="right")
        within = order - (ends[v] - take[v])
        shard = layout.shard[k * w:(k + 1) * w][v]
        partial = layout.partial[k * w:(k + 1) * w][v]
        for source in np.unique(partial[partial >= 0]).tolist():
            mine = partial == source
            within[mine] = self._subset(epoch, source, int(shard[mine][0]))[within[mine]]
        return self.offsets[shard] + within + layout.passes[k * w:(k + 1) * w][v] * self.total

    def _window_order(self, epoch: int, k: int) -> np.ndarray:
        """Window ``k``'s permutation of its positions (a few kept: consecutive
        runs of a rank and its pad often share a window)."""
        key = (epoch, k)
        if key not in self._windows:
            ws = self.layout(epoch).window_start
            n = int(ws[k + 1] - ws[k])
            self._windows[key] = (self._rng(epoch, WINDOW_STREAM, k).permutation(n) if self.config.shuffle
                                  else np.arange(n, dtype=np.int64))
            while len(self._windows) > 4:
                self._windows.popitem(last=False)
        return self._windows[key]

    def _subset(self, epoch: int, source: int, shard: int) -> np.ndarray:
        """Which samples of ``shard`` a partial visit reads (by index in the shard)."""
        size = int(self.shard_sizes[shard])
        if not self.config.shuffle:
            return np.arange(size, dtype=np.int64)
        return self._rng(epoch, SUBSET_STREAM, source).permutation(size)

    # -- ranks
    def rank_runs(self, epoch: int, segments: Sequence[Sequence[int]], rank: int) -> tuple[Runs, int]:
        """(this rank's epoch positions for the current segment, how many are consumed)."""
        segments = check_segments(segments)
        uneven = self.config.uneven
        seq = Runs.whole(self.layout(epoch).total)
        for i, (world, consumed) in enumerate(segments):
            per = block_size(seq.total, world, uneven)
            if consumed > per:
                raise ResumeStateError(f"loader state: segments[{i}] says {consumed} samples consumed per rank, but "
                                       f"{world} ranks have {per} each there; it was saved for another dataset or plan")
            if i < len(segments) - 1:
                seq = seq.select(*unconsumed(seq.total, world, consumed, uneven))
        world, consumed = segments[-1]
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        return rank_block(seq, world, rank, uneven), consumed

    def rank_sequence(self, epoch: int, segments: Sequence[Sequence[int]], rank: int) -> tuple[np.ndarray, int]:
        """(this rank's plan ids for the current segment, how many of them are consumed)."""
        runs, consumed = self.rank_runs(epoch, segments, rank)
        return self.positions(epoch, runs), consumed

    def rank_size(self, epoch: int, segments: Sequence[Sequence[int]], rank: int) -> tuple[int, int]:
        """(length of ``rank_sequence``, consumed) without computing ids."""
        runs, consumed = self.rank_runs(epoch, segments, rank)
        return runs.total, consumed

    # -- the reference: the whole epoch, materialized (tests and `mae bench plan` only)
    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every plan id of the epoch in order: O(epoch) memory."""
        return self.positions(epoch, Runs.whole(self.layout(epoch).total))


def block_size(n: int, world: int, uneven: str) -> int:
    """Samples per rank when ``n`` are split over ``world`` ranks."""
    return n // world if uneven == "drop" else -(-n // world)


def unconsumed(n: int, world: int, consumed: int, uneven: str) -> tuple[np.ndarray, np.ndarray]:
    """Index ranges ``[lo, hi)`` of a length-``n`` sequence no rank has read after
    each of ``world`` ranks consumed ``consumed`` of its block: pads excluded, a
    dropped tail included. Sorted, so the result is a subsequence in order."""
    per = block_size(n, world, uneven)
    starts = np.arange(world, dtype=np.int64) * per
    lo, hi = starts + consumed, np.minimum(starts + per, n)
    if uneven == "drop" and per * world < n:
        lo, hi = np.append(lo, per * world), np.append(hi, n)
    return lo, hi


def rank_block(seq: Runs, world: int, rank: int, uneven: str) -> Runs:
    """Rank ``rank``'s block of ``seq`` split over ``world``: the pad repeats the
    sequence from its start."""
    n = seq.total
    per = block_size(n, world, uneven)
    a, b = rank * per, (rank + 1) * per
    block = seq.select(np.array([a]), np.array([min(b, n)]))
    pad_at = max(a, n)
    while pad_at < b and n:  # padded position j repeats item (j - n) % n
        lo = (pad_at - n) % n
        hi = min(n, lo + b - pad_at)
        block = block.then(seq.select(np.array([lo]), np.array([hi])))
        pad_at += hi - lo
    return block


def check_segments(segments: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """A saved position's segments, checked: it may come from a checkpoint made elsewhere."""
    if not isinstance(segments, (list, tuple)) or not 1 <= len(segments) <= MAX_SEGMENTS:
        raise ResumeStateError(f"loader state: segments must be a list of 1 to {MAX_SEGMENTS} [world, consumed] "
                               f"pairs, got {str(segments)[:80]}")
    out = []
    for i, s in enumerate(segments):
        ok = (isinstance(s, (list, tuple)) and len(s) == 2
              and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in s)
              and 1 <= s[0] <= MAX_WORLD and s[1] >= 0)
        if not ok:
            raise ResumeStateError(f"loader state: segments[{i}] must be [world size in 1..{MAX_WORLD}, consumed >= 0], "
                                   f"got {str(s)[:80]}")
        out.append((int(s[0]), int(s[1])))
    return out


def resume_segments(segments: list[list[int]], world_size: int) -> list[list[int]]:
    """Segments to continue from a saved position under ``world_size``."""
    if not segments:
        return [[world_size, 0]]
    if segments[-1][0] == world_size:
        return [list(s) for s in segments]
    return [list(s) for s in segments] + [[world_size, 0]]


# ------------------------------------------------------------- reference
def reference_rank_sequence(plan: SamplePlan, epoch: int, segments: Sequence[Sequence[int]],
                            rank: int) -> tuple[np.ndarray, int]:
    """``SamplePlan.rank_sequence`` the plain way (plan version 1's algorithm): the
    whole epoch materialized, split into blocks with explicit pads, remainders
    copied. O(epoch) per rank; for tests and `mae bench plan`."""
    seq = plan.epoch_order(epoch)
    uneven = plan.config.uneven
    for world, consumed in segments[:-1]:
        parts, tail = _reference_partition(seq, world, uneven)
        seq = np.concatenate([ids[consumed:][~pad[consumed:]] for ids, pad in parts] + [tail])
    world, consumed = segments[-1]
    return _reference_partition(seq, world, uneven)[0][rank][0], consumed


def _reference_partition(seq: np.ndarray, world: int, uneven: str) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    n = len(seq)
    per = block_size(n, world, uneven)
    if uneven == "drop":
        return [(seq[r * per:(r + 1) * per], np.zeros(per, bool)) for r in range(world)], seq[per * world:]
    pad = per * world - n
    padded = np.concatenate([seq, np.resize(seq, pad)]) if n else seq
    flags = np.concatenate([np.zeros(n, bool), np.ones(len(padded) - n, bool)])
    return [(padded[r * per:(r + 1) * per], flags[r * per:(r + 1) * per]) for r in range(world)], seq[:0]
