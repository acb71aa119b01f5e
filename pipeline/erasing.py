"""Random erasing (Zhong et al. 2020) as MAE fine-tuning uses it: timm's
``RandomErasing(0.25, mode='pixel')`` — with probability p one box of 2-33% of the
image, aspect ratio 0.3-3.3, is filled with N(0, 1) noise in normalized space.

The box of each sample comes from its own RNG (``augment.sample_rng(...,
stream=ERASE_STREAM)``) on the host; the noise is a counter-based hash of (the
sample's noise seed, pixel index), computed on whatever device holds the batch —
so erasing, like the crops and RandAugment, depends on (seed, epoch, sample id)
only, and a resumed run erases exactly what the uninterrupted one did.
"""

from __future__ import annotations

import math

import numpy as np
import torch

AREA = (0.02, 1 / 3)
LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
ATTEMPTS = 10
_M32 = 0xFFFFFFFF


def draw_erase(rng: np.random.Generator, prob: float, height: int, width: int) -> np.ndarray:
    """One sample's box: int64 [top, left, h, w, noise seed]; h = w = 0 when not erased."""
    out = np.zeros(5, dtype=np.int64)
    if rng.random() >= prob:
        return out
    for _ in range(ATTEMPTS):
        area = rng.uniform(*AREA) * height * width
        aspect = math.exp(rng.uniform(*LOG_ASPECT))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < h < height and 0 < w < width:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            out[:] = (top, left, h, w, int(rng.integers(2**31)))
            break
    return out


def random_erase(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Fill each sample's box (from ``draw_erase``, (B, 5)) of normalized (B, C, H, W)
    images with hashed N(0, 1) noise; in place, returns ``images``."""
    for i in (boxes[:, 2] > 0).nonzero().squeeze(1).tolist():
        top, left, h, w, seed = boxes[i].tolist()
        c = images.shape[1]
        noise = hashed_normal(seed, c * h * w, images.device).view(c, h, w)
        images[i, :, top:top + h, left:left + w] = noise.to(images.dtype)
    return images


def hashed_normal(seed: int, count: int, device: torch.device) -> torch.Tensor:
    """``count`` N(0, 1) floats that depend only on (seed, index): Box-Muller over a
    32-bit integer hash, in int64 arithmetic that every device computes alike."""
    index = torch.arange(count, dtype=torch.int64, device=device)
    key = _mix32(torch.tensor(seed & _M32, dtype=torch.int64, device=device))
    u1 = (_mix32((key + 2 * index) & _M32) + 1).double() / 2.0**32  # (0, 1]
    u2 = _mix32((key + 2 * index + 1) & _M32).double() / 2.0**32  # [0, 1)
    return ((-2.0 * u1.log()).sqrt() * torch.cos(2.0 * math.pi * u2)).float()


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x < 2^32 without leaving int64: c in 16-bit halves."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (xorshift-multiply, good avalanche)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)
