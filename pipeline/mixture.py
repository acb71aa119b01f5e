"""Several shard datasets read as one: ``data.sources``, mixed by weight or by count.

Each source is a dataset URL (any scheme, its own manifest). Its shards follow the
previous source's in one shard list, its samples one range of ids. Each epoch a
source contributes an exact number of samples, its *quota*:

- ``samples: N`` — N per epoch. More than the source holds repeats it (each
  sample ⌊N/size⌋ or ⌈N/size⌉ times, each time with its own augmentation); fewer
  reads a random part of it, whole shards first, so only those are downloaded.
- ``weight: w`` — a share of the weighted part of the epoch,
  ``data.epoch_samples`` minus the other sources' quotas (default: the weighted
  sources' own total, so weights rebalance without changing the epoch's length),
  split exactly by the largest-remainder rule.
- neither — the source's size: each sample once.

The plan interleaves every source's visits in one permutation (pipeline/plan.py),
so any stretch of a run reads the sources in proportion to their quotas (within
sampling noise) and a whole epoch reads exactly the quotas. Per-source samples,
corrupt samples and bytes are counted in metrics labelled by the source's name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from infra.metrics import sink
from infra.options import option, require
from pipeline.errors import ManifestError, MixError
from pipeline.plan import SourceQuota
from pipeline.shards.manifest import ShardInfo
from pipeline.shards.manifest_index import ShardTable
from pipeline.storage.config import StorageConfig, require_endpoint
from pipeline.storage.store import ShardStore, report_event

if TYPE_CHECKING:
    from pipeline.loader import LoaderConfig

log = logging.getLogger(__name__)
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Passes over one source in one epoch: the plan lists every pass of every shard, so
# a quota of 1e8 samples from 37 (2.7M passes) took 32 s and 2.4 GB per rank, and
# 1e15 asked for a PiB.
MAX_PASSES = 1000


@dataclass(frozen=True)
class SourceConfig:
    url: str = option("", "dataset folder or URL holding manifest.json")
    name: str | None = option(None, "label in metrics and logs (default: the URL's last path part)")
    weight: float | None = option(None, "share of the weighted part of each epoch (see data.epoch_samples)")
    samples: int | None = option(None, "exact samples per epoch: more than the source holds repeats it, fewer "
                                       "reads a random part")
    endpoint_url: str | None = option(None, "this source's S3-compatible endpoint (default: data.storage.endpoint_url)")

    def __post_init__(self) -> None:
        require(isinstance(self.url, str) and self.url.strip() != "", "url", "must name a dataset folder or URL")
        require(self.weight is None or self.samples is None, "weight", "and samples exclude each other: give one")
        require(self.weight is None or (math.isfinite(self.weight) and self.weight > 0), "weight",
                f"must be positive, got {self.weight}")
        require(self.samples is None or self.samples >= 0, "samples", f"must be >= 0, got {self.samples}")
        require(self.name is None or bool(SOURCE_NAME.fullmatch(self.name)), "name",
                f"must be 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit, got {self.name!r}")
        require_endpoint(self, "endpoint_url")

    @property
    def label(self) -> str:
        """The source's name: given, or the URL's last path part (never its host's
        user or password), made of characters safe in a metric label."""
        if self.name:
            return self.name
        tail = self.url.rstrip("/").rsplit("/", 1)[-1].rsplit("@", 1)[-1]
        return re.sub(r"[^A-Za-z0-9_.-]", "_", tail).lstrip("._-")[:64] or "data"


def epoch_quotas(sources: Sequence[SourceConfig], sizes: Sequence[int], epoch_samples: int | None) -> list[int]:
    """Samples per epoch of each source (module docstring); at most ``MAX_PASSES``
    passes over a source in one epoch."""
    quotas = _quotas(sources, sizes, epoch_samples)
    for spec, size, quota in zip(sources, sizes, quotas):
        if size and quota > MAX_PASSES * size:
            raise MixError(f"source {spec.label} would be read {quota / size:,.0f} times an epoch ({quota:,} samples of "
                           f"its {size:,}); at most {MAX_PASSES:,}: lower its samples, weight or data.epoch_samples")
    return quotas


def _quotas(sources: Sequence[SourceConfig], sizes: Sequence[int], epoch_samples: int | None) -> list[int]:
    fixed = {i: (s.samples if s.samples is not None else sizes[i]) for i, s in enumerate(sources) if s.weight is None}
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    if not weighted:
        return [fixed[i] for i in range(len(sources))]
    share = sum(sizes[i] for i in weighted) if epoch_samples is None else epoch_samples - sum(fixed.values())
    if share < 0:
        raise MixError(f"data.epoch_samples={epoch_samples} is less than the {sum(fixed.values())} samples the sources "
                       "without a weight take per epoch")
    total_weight = sum(Fraction(sources[i].weight) for i in weighted)
    exact = {i: share * Fraction(sources[i].weight) / total_weight for i in weighted}
    quotas = {i: math.floor(q) for i, q in exact.items()}
    by_remainder = sorted(weighted, key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in by_remainder[:share - sum(quotas.values())]:
        quotas[i] += 1
    return [fixed[i] if i in fixed else quotas[i] for i in range(len(sources))]


def _count_bytes(name: str) -> Callable[[str, int], None]:
    """A store's event handler: the usual metrics, plus bytes fetched for this source."""
    def on_event(event: str, n: int) -> None:
        report_event(event, n)
        if event == "bytes_fetched":
            sink().inc("mae_source_bytes_fetched_total", n, source=name)

    return on_event


class DataSources:
    """The datasets a loader reads, seen as one manifest: every source's shards end
    to end (``shards[g]``, ``store_of(g)``), its classes and options, and each
    source's quota for the plan."""

    def __init__(self, config: LoaderConfig) -> None:
        specs = list(config.sources) or [SourceConfig(url=config.url)]
        self.specs = specs
        self.names = [s.label for s in specs]
        self.stores = [ShardStore(s.url, _storage_of(config.storage, s), on_event=_count_bytes(name))
                       for s, name in zip(specs, self.names)]
        self.tables: list[ShardTable] = [store.read_table() for store in self.stores]
        self.quotas = epoch_quotas(specs, [t.total_samples for t in self.tables], config.epoch_samples)
        for spec, table, quota in zip(specs, self.tables, self.quotas):
            if quota > 0 and not table.total_samples:
                raise MixError(f"source {spec.label} ({spec.url}) has no samples but is asked for {quota} per epoch")
        if len(specs) == 1 and not self.tables[0].total_samples:
            raise ManifestError(f"dataset {specs[0].url} has no samples")
        if not sum(self.quotas):
            raise MixError(f"the data sources give no samples per epoch (quotas: "
                           f"{', '.join(f'{n} {q}' for n, q in zip(self.names, self.quotas))})")
        self.first_shard = np.concatenate([[0], np.cumsum([len(t) for t in self.tables])]).astype(np.int64)
        self.shards = _ShardList(self)
        self.classes = _shared_classes(self.tables, self.names)
        if len(specs) > 1:
            log.info("data sources: %s", ", ".join(f"{n} {q} samples/epoch of {t.total_samples}"
                                                   for n, q, t in zip(self.names, self.quotas, self.tables)))

    # -- the combined manifest
    @property
    def options(self) -> dict[str, object]:
        return self.tables[0].options

    @property
    def total_samples(self) -> int:
        return sum(t.total_samples for t in self.tables)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def shard_sizes(self) -> np.ndarray:
        return np.concatenate([t.samples for t in self.tables])

    def plan_quotas(self) -> list[SourceQuota]:
        return [SourceQuota(int(a), int(b), q) for a, b, q in zip(self.first_shard, self.first_shard[1:], self.quotas)]

    def source_of_shard(self, g: int) -> int:
        return int(np.searchsorted(self.first_shard, g, side="right")) - 1

    def shard(self, g: int) -> ShardInfo:
        s = self.source_of_shard(g)
        return self.tables[s][g - int(self.first_shard[s])]

    def store_of(self, g: int) -> ShardStore:
        return self.stores[self.source_of_shard(g)]

    def label(self, g: int) -> str:
        """How keys and logs name shard ``g``: its name, after its source's when mixing."""
        name = self.shard(g).name
        return f"{self.names[self.source_of_shard(g)]}/{name}" if len(self.tables) > 1 else name

    # -- what a saved position must match
    @property
    def fingerprint(self) -> str:
        prints = [t.fingerprint() for t in self.tables]
        return prints[0] if len(prints) == 1 else hashlib.sha256(" ".join(prints).encode()).hexdigest()[:16]

    def mix_state(self) -> list[list[object]]:
        """Each source's name and per-epoch quota: the order depends on them."""
        return [[name, quota] for name, quota in zip(self.names, self.quotas)]


class _ShardList(Sequence):
    """All sources' shards as one sequence of ``ShardInfo`` (made on access)."""

    def __init__(self, data: DataSources) -> None:
        self.data = data

    def __len__(self) -> int:
        return int(self.data.first_shard[-1])

    def __getitem__(self, g: int) -> ShardInfo:  # type: ignore[override]
        if not -len(self) <= g < len(self):
            raise IndexError(g)
        return self.data.shard(g % len(self))


def _storage_of(storage: StorageConfig, spec: SourceConfig) -> StorageConfig:
    return storage if spec.endpoint_url is None else dataclasses.replace(storage, endpoint_url=spec.endpoint_url)


def _shared_classes(tables: list[ShardTable], names: list[str]) -> list[str]:
    """The labelled sources' common class list; none when they disagree (labels
    then index each source's own classes)."""
    lists = {tuple(t.classes) for t in tables if t.classes}
    if len(lists) > 1:
        log.warning("data sources %s have different class lists: Batch.labels index each source's own classes",
                    ", ".join(n for n, t in zip(names, tables) if t.classes))
        return []
    return list(lists.pop()) if lists else []
