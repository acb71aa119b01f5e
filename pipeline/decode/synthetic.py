"""The `synthetic` backend: random normalized images made on the device.

For measuring the trainer apart from data (GPU run book, `mae bench`), never for
learning. Same Loader protocol and position semantics as the real backends:
``data.url`` is ignored; an epoch is ``SYNTHETIC_EPOCH`` samples split over ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from pipeline.errors import ResumeStateError
from pipeline.loader import DTYPES, Batch, LoaderConfig, LoaderStats

SYNTHETIC_EPOCH = 1_281_167  # ImageNet-1k train size, so schedules read like real ones


class SyntheticLoader:
    def __init__(self, config: LoaderConfig, rank: int, world_size: int, device: torch.device) -> None:
        self.config, self.rank, self.world_size = config, rank, world_size
        self.device, self.dtype = device, DTYPES[config.dtype]
        self.stats = LoaderStats()
        self.epoch, self.consumed = 0, 0
        self.last_epoch: int | None = None
        S, B = config.augment.img_size, config.batch_size
        g = torch.Generator(device="cpu").manual_seed(config.plan.seed * 1000 + rank)
        self._images = torch.randn(B, 3, S, S, generator=g).to(self.device, self.dtype)

    def epoch_samples(self) -> int:
        return SYNTHETIC_EPOCH // self.world_size

    def __len__(self) -> int:
        return (self.epoch_samples() - self.consumed) // self.config.batch_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def close(self) -> None:  # nothing runs between epochs
        pass

    def __iter__(self) -> Iterator[Batch]:
        B = self.config.batch_size
        labels = torch.full((B,), -1, dtype=torch.int64)
        for _ in range(len(self)):
            start = self.rank * self.epoch_samples() + self.consumed
            self.consumed += B
            self.stats.images += B
            self.stats.batches += 1
            yield Batch(self._images, labels, [f"synthetic/{start + i}" for i in range(B)],
                        torch.arange(start, start + B))
        self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"backend": "synthetic", "epoch": self.epoch, "consumed": self.consumed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("backend") != "synthetic":
            raise ResumeStateError("loader state is not from the synthetic backend")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
