"""Augmentation parameters shared by every decode backend.

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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    img_size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    deterministic: bool = False  # centre crop, no flip: for evaluation and cross-backend checks
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"AugmentConfig.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"AugmentConfig.ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if self.img_size < 1:
            raise ValueError(f"AugmentConfig.img_size must be positive, got {self.img_size}")


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
