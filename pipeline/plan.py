"""The sample plan: which sample every rank reads, in what order, every epoch.

Order is a pure function of (seed, epoch) and the manifest's shard sizes:
1. shards are permuted;
2. consecutive runs of ``window_shards`` shards form windows, and the samples of
   each window are permuted together (a manifest-indexed permutation: exact and
   reproducible, unlike a streaming shuffle buffer whose output depends on
   timing; it mixes samples across shards while a reader needs only one window of
   shards on local disk at a time);
3. the epoch sequence is cut into equal contiguous blocks, one per rank, so a
   rank touches few shards. ``uneven='pad'`` repeats the first samples to fill
   the last block, ``'drop'`` leaves the tail out of this epoch; either way every
   rank gets the same number of samples, hence the same number of steps.

Resume: a position is (epoch, segments), each segment ``[world_size, consumed
per rank]``. With the same world size the rank continues at ``consumed`` — the
remaining sequence is identical. With another world size the samples no rank has
consumed yet (pads excluded, the dropped tail included) are re-partitioned, so each
remaining sample of the epoch is seen exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from infra.options import option, require, require_choice

UNEVEN_POLICIES = ("pad", "drop")


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
class RankPart:
    ids: np.ndarray  # global sample ids, in reading order
    is_pad: np.ndarray  # True where the id repeats one assigned elsewhere (pad policy)


class SamplePlan:
    """Deterministic per-epoch sample order over shards, split across ranks."""

    def __init__(self, shard_sizes: Sequence[int], config: PlanConfig | None = None) -> None:
        if not shard_sizes or min(shard_sizes) < 0:
            raise ValueError("a sample plan needs at least one shard and non-negative sizes")
        self.config = config or PlanConfig()
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        self.total = int(self.offsets[-1])

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global ids -> (shard index, index within shard)."""
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        return shard, ids - self.offsets[shard]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every sample id once, in this epoch's global order."""
        cfg = self.config
        n_shards = len(self.shard_sizes)
        if not cfg.shuffle:
            return np.arange(self.total, dtype=np.int64)
        rng = np.random.default_rng([cfg.seed, epoch])
        shard_order = rng.permutation(n_shards)
        parts = []
        for start in range(0, n_shards, cfg.window_shards):
            window = shard_order[start:start + cfg.window_shards]
            ids = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in window])
            parts.append(rng.permutation(ids))
        return np.concatenate(parts).astype(np.int64)

    def partition(self, seq: np.ndarray, world_size: int) -> tuple[list[RankPart], np.ndarray]:
        """Equal contiguous blocks per rank, and the dropped tail (drop policy)."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        n = len(seq)
        if self.config.uneven == "drop":
            per = n // world_size
            parts = [RankPart(seq[r * per:(r + 1) * per], np.zeros(per, bool)) for r in range(world_size)]
            return parts, seq[per * world_size:]
        per = -(-n // world_size)
        if n == 0:
            return [RankPart(seq[:0], np.zeros(0, bool)) for _ in range(world_size)], seq[:0]
        pad = per * world_size - n
        padded = np.concatenate([seq, np.resize(seq, pad)])  # repeats from the start
        flags = np.concatenate([np.zeros(n, bool), np.ones(pad, bool)])
        return [RankPart(padded[r * per:(r + 1) * per], flags[r * per:(r + 1) * per]) for r in range(world_size)], seq[:0]

    def remainder(self, seq: np.ndarray, world_size: int, consumed: int) -> np.ndarray:
        """Samples of ``seq`` not yet read after every rank consumed ``consumed``."""
        parts, tail = self.partition(seq, world_size)
        rest = [p.ids[consumed:][~p.is_pad[consumed:]] for p in parts]
        return np.concatenate(rest + [tail])

    def rank_sequence(self, epoch: int, segments: Sequence[Sequence[int]], rank: int) -> tuple[np.ndarray, int]:
        """(this rank's ids for the current segment, how many of them are consumed)."""
        seq = self.epoch_order(epoch)
        for world, consumed in segments[:-1]:
            seq = self.remainder(seq, world, consumed)
        world, consumed = segments[-1]
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        return self.partition(seq, world)[0][rank].ids, consumed


def resume_segments(segments: list[list[int]], world_size: int) -> list[list[int]]:
    """Segments to continue from a saved position under ``world_size``."""
    if not segments:
        return [[world_size, 0]]
    if segments[-1][0] == world_size:
        return [list(s) for s in segments]
    return [list(s) for s in segments] + [[world_size, 0]]
