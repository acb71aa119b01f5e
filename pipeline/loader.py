"""The Loader protocol and what every decode backend shares.

A Loader yields ``Batch``es of normalized images ``[B, 3, S, S]`` (plus keys and
labels) on the requested device and dtype, and saves/restores its exact position
in the sample plan. Backends are chosen by name (``cpu``, ``dali``, ``ffcv``); a
backend's library is imported only when it is chosen, and a missing one raises
ImportError naming the pip extra.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from infra.metrics import sink
from pipeline.augment import AugmentConfig
from pipeline.images import ImagePolicy
from pipeline.manifest import ShardManifest
from pipeline.plan import PlanConfig, SamplePlan, resume_segments
from pipeline.storage import ShardStore, StorageConfig

log = logging.getLogger(__name__)
STATE_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# name -> (module, class, pip extra that provides its library).
BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "cpu": ("pipeline.decode.cpu", "CpuLoader", None),
    "dali": ("pipeline.decode.dali", "DaliLoader", "dali"),
    "ffcv": ("pipeline.decode.ffcv", "FfcvLoader", "ffcv"),
    "synthetic": ("pipeline.decode.synthetic", "SyntheticLoader", None),  # trainer benchmarks only
}


class CorruptDataError(RuntimeError):
    """More samples were corrupt than the configured tolerance allows."""


class ResumeStateError(ValueError):
    """A saved loader position does not fit this dataset or loader."""


@dataclass(frozen=True)
class LoaderConfig:
    url: str
    batch_size: int
    backend: str = "cpu"
    num_workers: int = 2
    drop_last: bool = False  # drop this rank's partial last batch of the epoch
    max_corrupt_fraction: float = 0.01  # of this rank's epoch; beyond it the run stops
    device: str = "cpu"
    dtype: str = "float32"
    normalize: bool = True  # False: uint8 images (normalize inside the model / compiled graph)
    # dali: 'plan' takes crop boxes and flips from the sample plan's keyed RNG (the cpu
    # backend's exact crops; unchanged by resume or a pipeline rebuild), 'random' uses
    # DALI's own fn.decoders.image_random_crop and coin_flip.
    dali_crop: str = "plan"
    hw_decoder_load: float = 0.65  # dali on A100/H100: share of JPEGs sent to the hardware decoder
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    policy: ImagePolicy = field(default_factory=ImagePolicy)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown decode backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        if self.batch_size < 1:
            raise ValueError(f"LoaderConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"LoaderConfig.num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.max_corrupt_fraction <= 1:
            raise ValueError(f"LoaderConfig.max_corrupt_fraction must be in [0, 1], got {self.max_corrupt_fraction}")
        if self.dali_crop not in ("plan", "random"):
            raise ValueError(f"LoaderConfig.dali_crop must be 'plan' or 'random', got {self.dali_crop!r}")
        if not 0 <= self.hw_decoder_load <= 1:
            raise ValueError(f"LoaderConfig.hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        if self.dtype not in DTYPES:
            raise ValueError(f"LoaderConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) on the loader's device: normalized in its dtype, or uint8
    labels: torch.Tensor  # (B,) int64; -1 where the dataset is unlabelled
    keys: list[str]  # "<shard>/<key>" of each image
    sample_ids: torch.Tensor  # (B,) global sample ids in the plan


@dataclass
class LoaderStats:
    images: int = 0
    batches: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    converted: Counter = field(default_factory=Counter)  # mode reason -> count (converted to RGB)
    warmup_s: float = 0.0  # time to this process's first batch (ffcv: numba JIT compile)


@runtime_checkable
class Loader(Protocol):
    stats: LoaderStats

    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def fix_malloc_mmap_threshold(threshold: int = 4 * 2**20) -> bool:
    """Serve large allocations (batches are MiBs) with mmap, returned to the OS on free.

    glibc otherwise raises its mmap threshold after each large free, so batch-sized
    buffers come from the heap and the process keeps ~40 of them resident (seen: RSS
    climbing by ~9 MiB a batch to +450 MiB). Setting the threshold pins it. No-op
    off glibc.
    """
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def dist_rank_world() -> tuple[int, int]:
    """Global rank and world size: the initialised process group's, else the
    launcher's environment (1 process: 0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_loader(config: LoaderConfig, rank: int | None = None, world_size: int | None = None) -> Loader:
    module, cls, extra = BACKENDS[config.backend]
    try:
        backend = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        hint = f"pip install 'maescale[{extra}]'" if extra else "reinstall maescale"
        raise ImportError(f"decode backend {config.backend!r} needs a library that is not installed "
                          f"({e.name or e}); {hint}") from e
    env_rank, env_world = dist_rank_world()
    return backend(config, env_rank if rank is None else rank, env_world if world_size is None else world_size)


def dataset_fingerprint(manifest: ShardManifest) -> str:
    digest = hashlib.sha256()
    for s in manifest.shards:
        digest.update(f"{s.name}:{s.samples}:{s.sha256}\n".encode())
    return digest.hexdigest()[:16]


class PlannedLoader:
    """Position tracking, resume, normalization and corrupt-sample accounting shared
    by the backends. A backend implements ``_batches(ids, epoch)``, yielding
    ``(images, labels, keys, ids, planned, skips, converted)`` per planned batch in
    plan order: uint8 images (b,3,S,S) — or final ones when ``normalizes`` is set —,
    ``planned`` the batch's size in the plan, ``skips`` the ``(key, reason)`` of
    samples dropped from it and ``converted`` the mode reasons of images converted
    to RGB."""

    normalizes = False  # the backend yields images normalized, on device, in the dtype
    dataset_format = "tar"  # manifest options["format"] this backend reads

    def __init__(self, config: LoaderConfig, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.store = ShardStore(config.url, config.storage)
        self.manifest = self.store.read_manifest()
        if not self.manifest.shards:
            raise ValueError(f"dataset {config.url} has no samples")
        fmt = self.manifest.options.get("format", "tar")
        if fmt != self.dataset_format:
            raise ValueError(f"dataset {config.url} is in {fmt!r} format, which the {config.backend!r} backend does not "
                             f"read; use backend {'ffcv' if fmt == 'beton' else 'cpu or dali'} or re-shard with "
                             f"`mae shard --format {self.dataset_format}`")
        self.plan = SamplePlan([s.samples for s in self.manifest.shards], config.plan)
        self.fingerprint = dataset_fingerprint(self.manifest)
        self.stats = LoaderStats()
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        aug = config.augment
        self._mean = torch.tensor(aug.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(aug.std, device=self.device).view(1, 3, 1, 1) * 255
        self.epoch = 0
        self.segments: list[list[int]] = [[world_size, 0]]
        fix_malloc_mmap_threshold()

    # -- position
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.segments = epoch, [[self.world_size, 0]]

    def _rank_ids(self) -> tuple[np.ndarray, int]:
        return self.plan.rank_sequence(self.epoch, self.segments, self.rank)

    def epoch_samples(self) -> int:
        return len(self._rank_ids()[0])

    def __len__(self) -> int:
        ids, consumed = self._rank_ids()
        remaining = len(ids) - consumed
        bs = self.config.batch_size
        return remaining // bs if self.config.drop_last else -(-remaining // bs)

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self.epoch, "segments": [list(s) for s in self.segments],
                "dataset": self.fingerprint, "seed": self.config.plan.seed, "shuffle": self.config.plan.shuffle,
                "window_shards": self.config.plan.window_shards, "uneven": self.config.plan.uneven}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ResumeStateError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        if state.get("dataset") != self.fingerprint:
            raise ResumeStateError("loader state was saved for another dataset (manifest fingerprint differs)")
        plan = self.config.plan
        for key in ("seed", "shuffle", "window_shards", "uneven"):
            if state.get(key) != getattr(plan, key):
                raise ResumeStateError(f"loader state was saved with plan.{key}={state.get(key)!r}, "
                                       f"this loader has {getattr(plan, key)!r}; the order would differ")
        self.epoch = int(state["epoch"])
        self.segments = resume_segments([list(map(int, s)) for s in state["segments"]], self.world_size)

    # -- iteration
    def __iter__(self) -> Iterator[Batch]:
        ids, consumed = self._rank_ids()
        bs = self.config.batch_size
        end = consumed + (len(ids) - consumed) // bs * bs if self.config.drop_last else len(ids)
        budget = int(self.config.max_corrupt_fraction * len(ids))
        epoch_skipped = 0
        for images, labels, keys, batch_ids, planned, skips, converted in self._batches(ids[consumed:end], self.epoch):
            self.segments[-1][1] += planned
            self.stats.converted.update(converted)
            for reason in converted:
                sink().inc("mae_pipeline_samples_converted_total", reason=reason)
            for key, reason in skips:
                self.stats.skipped[reason] += 1
                sink().inc("mae_pipeline_samples_skipped_total", backend=self.config.backend, reason=reason)
                log.warning("skipped corrupt sample %s: %s", key, reason)
            epoch_skipped += len(skips)
            if epoch_skipped > budget:
                raise CorruptDataError(
                    f"{epoch_skipped} corrupt samples on rank {self.rank} this epoch exceed max_corrupt_fraction="
                    f"{self.config.max_corrupt_fraction} of {len(ids)} ({dict(self.stats.skipped)}); last: "
                    f"{skips[-1][0]} ({skips[-1][1]})")
            if len(keys) == 0:
                continue
            self.stats.images += len(keys)
            self.stats.batches += 1
            if not self.normalizes:
                images = self.normalize(images) if self.config.normalize else images.to(self.device, non_blocking=True)
            yield Batch(images, labels, keys, batch_ids)
        self.epoch, self.segments = self.epoch + 1, [[self.world_size, 0]]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,S,S) -> normalized dtype on device; on a GPU after the copy."""
        x = images.to(self.device, non_blocking=True).float()
        return x.sub_(self._mean).div_(self._std).to(self.dtype)

    def _batches(self, ids: np.ndarray, epoch: int) -> Iterator[tuple]:
        raise NotImplementedError
