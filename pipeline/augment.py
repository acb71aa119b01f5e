"""Augmentation shared by every decode backend: crop boxes, flips, normalization,
and the fine-tuning recipe's RandAugment and random erasing parameters.

Pretraining (the paper): RandomResizedCrop(224, scale=(0.2, 1.0), ratio=(3/4, 4/3),
bicubic) and a horizontal flip; nothing else. Fine-tuning adds RandAugment
(``pipeline.randaugment``) and random erasing (``pipeline.erasing``); evaluation is
a centre crop of ``crop_fraction`` of the shorter side (0.875: resize to 256, crop
224). Crop boxes follow torchvision's algorithm (10 tries of area/log-aspect
sampling, then a centre crop clamped to the ratio range). Every parameter comes
from a per-sample RNG keyed by (seed, epoch, sample id, stream), so augmentation
does not depend on workers, ranks, batches or resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from infra.options import option, require, require_choice
from pipeline.erasing import draw_erase
from pipeline.randaugment import draw_rand_augment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_STREAM, RANDAUG_STREAM, ERASE_STREAM = 0, 1, 2  # independent per-sample RNG streams
CROP_SAMPLERS = ("retry", "clamped")


@dataclass(frozen=True)
class AugmentConfig:
    img_size: int = option(224, "input side after RandomResizedCrop (the model's image size)")
    scale: tuple[float, float] = option((0.2, 1.0), "RandomResizedCrop area range (the paper: 0.2-1)")
    ratio: tuple[float, float] = option((3 / 4, 4 / 3), "RandomResizedCrop aspect-ratio range")
    flip_prob: float = option(0.5, "horizontal flip probability")
    crop_sampler: str = option("retry", "'retry': torchvision's RandomResizedCrop (10 draws, then a centre crop); "
                                        "'clamped': one draw, its sides clamped to the image, as the official linear "
                                        "probe's (cpu, and dali with data.dali.crop=plan)")
    deterministic: bool = option(False, "centre crop, no flip: for evaluation and cross-backend checks")
    crop_fraction: float = option(1.0, "deterministic mode: centre square's side / the shorter side "
                                       "(0.875 = resize to 256, crop 224)")
    rand_augment_layers: int = option(0, "RandAugment ops per image (0: off; fine-tuning: 2, as timm's "
                                         "rand-m9-mstd0.5-inc1)")
    rand_augment_magnitude: float = option(9.0, "RandAugment magnitude, 0-10")
    rand_augment_magnitude_std: float = option(0.5, "std of each op's magnitude around it")
    erase_prob: float = option(0.0, "random erasing probability (fine-tuning: 0.25): one box of 2-33% of the "
                                    "image filled with N(0, 1) noise after normalization")
    mean: tuple[float, float, float] = option(IMAGENET_MEAN, "per-channel mean of normalization (RGB, 0-1)")
    std: tuple[float, float, float] = option(IMAGENET_STD, "per-channel std of normalization (RGB, 0-1)")

    def __post_init__(self) -> None:
        require(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1, "scale",
                f"must be [lo, hi] with 0 < lo <= hi <= 1, got {list(self.scale)}")
        require(len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1], "ratio",
                f"must be [lo, hi] with 0 < lo <= hi, got {list(self.ratio)}")
        require(self.img_size > 0, "img_size", f"must be positive, got {self.img_size}")
        require_choice(self, "crop_sampler", CROP_SAMPLERS)
        require(0 <= self.flip_prob <= 1, "flip_prob", f"must be in [0, 1], got {self.flip_prob}")
        require(len(self.mean) == 3 and all(0 <= m <= 1 for m in self.mean), "mean",
                f"must be three numbers in [0, 1] (pixels scaled to 0-1), got {list(self.mean)}")
        require(len(self.std) == 3 and all(0 < s <= 1 for s in self.std), "std",
                f"must be three numbers in (0, 1], got {list(self.std)}")
        require(0 < self.crop_fraction <= 1, "crop_fraction", f"must be in (0, 1], got {self.crop_fraction}")
        require(self.rand_augment_layers >= 0, "rand_augment_layers", f"must be >= 0, got {self.rand_augment_layers}")
        require(0 <= self.rand_augment_magnitude <= 10, "rand_augment_magnitude",
                f"must be in [0, 10], got {self.rand_augment_magnitude}")
        require(self.rand_augment_magnitude_std >= 0, "rand_augment_magnitude_std",
                f"must be >= 0, got {self.rand_augment_magnitude_std}")
        require(0 <= self.erase_prob <= 1, "erase_prob", f"must be in [0, 1], got {self.erase_prob}")

    @property
    def rand_augment(self) -> bool:
        return self.rand_augment_layers > 0 and not self.deterministic

    @property
    def erasing(self) -> bool:
        return self.erase_prob > 0 and not self.deterministic

    @property
    def fill(self) -> tuple[int, int, int]:
        """The mean colour in uint8: what geometric ops fill uncovered pixels with."""
        return tuple(min(255, round(255 * m)) for m in self.mean)


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


def sample_rng(seed: int, epoch: int, sample_id: int, stream: int = CROP_STREAM) -> np.random.Generator:
    """The RNG of one sample's augmentation in one epoch; ``stream`` separates crops,
    RandAugment and erasing so each backend can draw only what it applies."""
    key = [seed, epoch, int(sample_id)] + ([stream] if stream != CROP_STREAM else [])
    return np.random.default_rng(key)


def rand_augment_params(cfg: AugmentConfig, seed: int, epoch: int, ids: Sequence[int]) -> torch.Tensor:
    """(B, layers, 2) RandAugment ops and arguments of samples ``ids`` (``pipeline.randaugment``)."""
    out = np.zeros((len(ids), cfg.rand_augment_layers, 2), dtype=np.float32)
    for i, gid in enumerate(ids):
        out[i] = draw_rand_augment(sample_rng(seed, epoch, gid, RANDAUG_STREAM), cfg.rand_augment_layers,
                                   cfg.rand_augment_magnitude, cfg.rand_augment_magnitude_std)
    return torch.from_numpy(out)


def erase_params(cfg: AugmentConfig, seed: int, epoch: int, ids: Sequence[int]) -> torch.Tensor:
    """(B, 5) erasing boxes of samples ``ids`` (``pipeline.erasing``)."""
    boxes = [draw_erase(sample_rng(seed, epoch, gid, ERASE_STREAM), cfg.erase_prob, cfg.img_size, cfg.img_size)
             for gid in ids]
    return torch.from_numpy(np.stack(boxes)) if boxes else torch.zeros(0, 5, dtype=torch.int64)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float],
                            ratio: tuple[float, float], sampler: str = "retry") -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) as torchvision's RandomResizedCrop, or
    (``sampler`` "clamped") as the official MAE linear probe's: one draw of area and
    aspect, each side clamped to the image, so a draw that does not fit is a crop of
    the whole side rather than another draw (its areas can fall below ``scale``)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    if sampler == "clamped":
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = min(width, max(1, int(round(math.sqrt(target_area * aspect)))))
        h = min(height, max(1, int(round(math.sqrt(target_area / aspect)))))
        return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
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


def center_crop_box(width: int, height: int, fraction: float = 1.0) -> tuple[int, int, int, int]:
    """The central square of side ``fraction`` x min(width, height): 0.875 is the
    evaluation crop "resize the shorter side to 256, crop 224"."""
    side = max(1, int(round(min(width, height) * fraction)))
    return (width - side) // 2, (height - side) // 2, side, side


def crop_and_flip(width: int, height: int, cfg: AugmentConfig, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool]:
    if cfg.deterministic:
        return center_crop_box(width, height, cfg.crop_fraction), False
    box = random_resized_crop_box(width, height, rng, cfg.scale, cfg.ratio, cfg.crop_sampler)
    return box, bool(rng.random() < cfg.flip_prob)
