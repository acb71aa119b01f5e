"""The Loader protocol: its config, the ``Batch`` it yields, and the backend registry.

A Loader yields ``Batch``es of images ``[B, 3, S, S]`` — normalized in the
configured dtype, or uint8 — plus labels, keys and sample ids, on the device it
was built for, and saves/restores its exact position in the sample plan.
Backends are chosen by name; a backend's library is imported only when it is
chosen, and a missing one raises ImportError naming the pip extra.

``LoaderConfig`` is the whole data configuration: the trainer's ``data`` section
*is* this dataclass, so every option here is reachable from YAML
(``data.plan.window_shards=8``, ``data.storage.cache_limit_gb=100``).
"""

from __future__ import annotations

import importlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from infra.options import option, require, require_choice, require_fraction, require_positive, require_text
from pipeline.augment import AugmentConfig
from pipeline.images import ImagePolicy
from pipeline.mixture import SourceConfig
from pipeline.plan import PlanConfig
from pipeline.storage.config import StorageConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# name -> (module, class, pip extra that provides its library).
BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "cpu": ("pipeline.decode.cpu", "CpuLoader", None),
    "dali": ("pipeline.decode.dali", "DaliLoader", "dali"),
    "ffcv": ("pipeline.decode.ffcv", "FfcvLoader", "ffcv"),
    "synthetic": ("pipeline.decode.synthetic", "SyntheticLoader", None),  # trainer benchmarks only
}


@dataclass(frozen=True)
class DaliOptions:
    crop: str = option("plan", "'plan': crop boxes and flips from the sample plan (the cpu backend's exact "
                               "crops, unchanged by resume or a rebuild); 'random': DALI's own RNG")
    hw_decoder_load: float = option(0.65, "share of JPEGs for the hardware JPEG decoder (A100/H100/H200)")
    decode: str = option("roi", "'roi': decode only each crop's region; 'whole': decode every image whole, then "
                                "crop on the device (the same crops; the hardware decoder may decode whole images only)")

    def __post_init__(self) -> None:
        require_choice(self, "crop", ("plan", "random"))
        require_choice(self, "decode", ("roi", "whole"))
        require_fraction(self, "hw_decoder_load")


@dataclass(frozen=True)
class LoaderConfig:
    url: str = option("shards", "dataset folder or URL holding manifest.json (one dataset; data.sources for several)")
    sources: tuple[SourceConfig, ...] = option((), "several datasets mixed, replacing url: [{url, weight or samples, "
                                                   "name, endpoint_url}, ...] (docs/DATA.md)")
    epoch_samples: int | None = option(None, "samples per epoch over data.sources when some have a weight "
                                             "(default: those sources' own total)")
    backend: str = option("cpu", "cpu | dali | ffcv (reads a .beton: mae shard --format beton) | synthetic "
                                 "(random tensors, for benchmarks)")
    batch_size: int = option(64, "samples per rank per step (the trainer's micro-batch)")
    num_workers: int = option(8, "cpu: DataLoader worker processes; dali: decode threads; ffcv: numba threads")
    drop_last: bool = option(False, "drop this rank's partial last batch of an epoch")
    overlap_epochs: bool = option(True, "start the next epoch (fork its workers, build its DALI graph, fetch its "
                                        "first shards) while this one's last batches are consumed")
    max_corrupt_fraction: float = option(0.01, "of a rank's epoch; more corrupt samples stop the run")
    dtype: str = option("float32", "float32 | bfloat16 | float16: dtype of normalized images")
    normalize: bool = option(True, "false: uint8 images (normalize later, e.g. in the model)")
    augment: AugmentConfig = option(factory=AugmentConfig)
    plan: PlanConfig = option(factory=PlanConfig)
    storage: StorageConfig = option(factory=StorageConfig)
    images: ImagePolicy = option(factory=ImagePolicy)
    dali: DaliOptions = option(factory=DaliOptions)

    def __post_init__(self) -> None:
        require(self.backend in BACKENDS, "backend", f"must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        require_text(self, "url")
        require_positive(self, "batch_size")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        require_fraction(self, "max_corrupt_fraction")
        require_choice(self, "dtype", tuple(DTYPES))
        require(self.augment.crop_sampler == "retry" or self.backend in ("cpu", "synthetic")
                or (self.backend == "dali" and self.dali.crop == "plan"), "augment.crop_sampler",
                f"{self.augment.crop_sampler!r} needs the cpu backend or dali with data.dali.crop=plan (the "
                f"{self.backend} backend draws crops its own way)")
        require(self.normalize or not self.augment.erasing, "normalize",
                "must be true with augment.erase_prob > 0 (erasing fills normalized pixels with N(0, 1) noise)")
        require(all(isinstance(s, SourceConfig) for s in self.sources), "sources", "must be SourceConfig entries")
        labels = [s.label for s in self.sources]
        require(len(set(labels)) == len(labels), "sources", f"need distinct names (set name: ...), got {labels}")
        require(self.epoch_samples is None or (self.epoch_samples >= 0 and any(s.weight for s in self.sources)),
                "epoch_samples", "needs a data.sources entry with a weight, and must be >= 0")


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
    sources: Counter = field(default_factory=Counter)  # source name -> samples delivered
    warmup_s: float = 0.0  # time to this process's first batch (ffcv: numba JIT compile)
    epochs_started_early: int = 0  # epochs set up before the last one ended (data.overlap_epochs)


@runtime_checkable
class Loader(Protocol):
    stats: LoaderStats
    epoch: int
    last_epoch: int | None  # the last epoch the consumer reads, if it knows: none after it is started early

    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...
    def epoch_samples(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def dist_rank_world() -> tuple[int, int]:
    """Global rank and world size: the initialised process group's, else the
    launcher's environment (1 process: 0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_loader(config: LoaderConfig, rank: int | None = None, world_size: int | None = None,
                 device: str | torch.device = "cpu") -> Loader:
    """The loader of ``config.backend`` for this rank (default: from the process
    group or the launcher's environment), yielding batches on ``device``."""
    module, cls, extra = BACKENDS[config.backend]
    try:
        backend = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        hint = f"pip install 'maescale[{extra}]'" if extra else "reinstall maescale"
        raise ImportError(f"decode backend {config.backend!r} needs a library that is not installed "
                          f"({e.name or e}); {hint}") from e
    env_rank, env_world = dist_rank_world()
    return backend(config, env_rank if rank is None else rank, env_world if world_size is None else world_size,
                   torch.device(device))
