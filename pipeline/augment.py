"""Augmentation shared by every decode backend: crop boxes, flips, normalization.

The paper's recipe: RandomResizedCrop(224, scale=(0.2, 1.0), ratio=(3/4, 4/3),
bicubic) and a horizontal flip; nothing else. Crop boxes follow torchvision's
algorithm (10 tries of area/log-aspect sampling, then a centre crop clamped to the
ratio range). Parameters come from a per-sample RNG keyed by (seed, epoch, sample
id), so augmentation does not depend on workers, ranks or resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from infra.options import option, require

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    img_size: int = option(224, "input side after RandomResizedCrop (the model's image size)")
    scale: tuple[float, float] = option((0.2, 1.0), "RandomResizedCrop area range (the paper: 0.2-1)")
    ratio: tuple[float, float] = option((3 / 4, 4 / 3), "RandomResizedCrop aspect-ratio range")
    flip_prob: float = option(0.5, "horizontal flip probability")
    deterministic: bool = option(False, "centre crop, no flip: for evaluation and cross-backend checks")
    mean: tuple[float, float, float] = option(IMAGENET_MEAN, "per-channel mean of normalization (RGB, 0-1)")
    std: tuple[float, float, float] = option(IMAGENET_STD, "per-channel std of normalization (RGB, 0-1)")

    def __post_init__(self) -> None:
        require(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1, "scale",
                f"must be [lo, hi] with 0 < lo <= hi <= 1, got {list(self.scale)}")
        require(len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1], "ratio",
                f"must be [lo, hi] with 0 < lo <= hi, got {list(self.ratio)}")
        require(self.img_size > 0, "img_size", f"must be positive, got {self.img_size}")
        require(0 <= self.flip_prob <= 1, "flip_prob", f"must be in [0, 1], got {self.flip_prob}")
        require(len(self.mean) == 3 and all(0 <= m <= 1 for m in self.mean), "mean",
                f"must be three numbers in [0, 1] (pixels scaled to 0-1), got {list(self.mean)}")
        require(len(self.std) == 3 and all(0 < s <= 1 for s in self.std), "std",
                f"must be three numbers in (0, 1], got {list(self.std)}")


class Normalizer:
    """uint8 pixels <-> normalized floats, ``(x / 255 - mean) / std`` per channel,
    computed as ``(x - 255 mean) / (255 std)`` on the device the images go to."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 device: str | torch.device = "cpu") -> None:
        self.mean255 = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std255 = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> normalized (B, 3, H, W) in ``dtype`` on this normalizer's device."""
        x = images.to(self.mean255.device, non_blocking=True).float()
        return x.sub_(self.mean255).div_(self.std255).to(dtype)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized (B, 3, H, W) -> pixels in [0, 1]."""
        return (x * self.std255 + self.mean255).div(255).clamp(0, 1)


def sample_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, int(sample_id)])


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) as torchvision's RandomResizedCrop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The central square of side min(width, height)."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def crop_and_flip(width: int, height: int, cfg: AugmentConfig, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool]:
    if cfg.deterministic:
        return center_crop_box(width, height), False
    box = random_resized_crop_box(width, height, rng, cfg.scale, cfg.ratio)
    return box, bool(rng.random() < cfg.flip_prob)
