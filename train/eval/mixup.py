"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on the device, with label
smoothing: the fine-tuning recipe's batch mixing (timm's ``Mixup`` in 'batch' mode:
mixup 0.8, cutmix 1.0, switch 0.5, smoothing 0.1).

Each batch is mixed with itself reversed. Whether it is mixup or cutmix, lambda
and the cutmix box come from an RNG keyed by (seed, epoch, the batch's first
sample id, its size) — no state to save: a resumed run mixes exactly as the
uninterrupted one. Targets are soft: lambda of the sample's smoothed one-hot plus
1 - lambda of its partner's, with lambda corrected to the pasted box's area.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from infra.options import option, require

MIX_STREAM = 0x6D6978  # keeps the mixing RNG apart from the per-sample augmentation RNG


@dataclass(frozen=True)
class MixupConfig:
    mixup_alpha: float = option(0.8, "Beta(a, a) of mixup's lambda (0: no mixup)")
    cutmix_alpha: float = option(1.0, "Beta(a, a) of cutmix's lambda (0: no cutmix)")
    prob: float = option(1.0, "probability that a batch is mixed at all")
    switch_prob: float = option(0.5, "with both on: probability of cutmix instead of mixup")
    label_smoothing: float = option(0.1, "of the one-hot targets (also without mixing)")

    def __post_init__(self) -> None:
        for name in ("mixup_alpha", "cutmix_alpha"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("prob", "switch_prob"):
            require(0 <= getattr(self, name) <= 1, name, f"must be in [0, 1], got {getattr(self, name)}")
        require(0 <= self.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass(frozen=True)
class Mix:
    """What was done to one batch: lambda (of the original), and the cutmix box."""

    lam: float
    box: tuple[int, int, int, int] | None = None  # top, bottom, left, right (cutmix)


def smooth_one_hot(labels: torch.Tensor, classes: int, smoothing: float) -> torch.Tensor:
    """(B,) -> (B, classes): 1 - smoothing + smoothing / classes on the label, smoothing / classes elsewhere."""
    off = smoothing / classes
    return torch.full((len(labels), classes), off, device=labels.device).scatter_(
        1, labels.view(-1, 1), 1.0 - smoothing + off)


def draw_mix(cfg: MixupConfig, rng: np.random.Generator, height: int, width: int) -> Mix:
    """The batch's mix: none, mixup with lambda ~ Beta, or cutmix with a box of area ~ 1 - lambda."""
    if not cfg.enabled or rng.random() >= cfg.prob:
        return Mix(1.0)
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha == 0 or rng.random() < cfg.switch_prob)
    lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha) if use_cutmix else rng.beta(cfg.mixup_alpha,
                                                                                            cfg.mixup_alpha))
    if not use_cutmix:
        return Mix(lam)
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    area = (bottom - top) * (right - left)
    return Mix(1.0 - area / (height * width), (int(top), int(bottom), int(left), int(right)))


def mix_batch(cfg: MixupConfig, images: torch.Tensor, labels: torch.Tensor, classes: int, seed: int, epoch: int,
              sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Mix]:
    """Mix (B, C, H, W) images with the batch reversed; returns (images, soft targets
    (B, classes) summing to 1, the mix). Seeded by the batch itself: resumable."""
    key = [seed, MIX_STREAM, epoch, int(sample_ids[0]) if len(sample_ids) else 0, len(sample_ids)]
    mix = draw_mix(cfg, np.random.default_rng(key), images.shape[2], images.shape[3])
    targets = smooth_one_hot(labels, classes, cfg.label_smoothing)
    if mix.lam == 1.0:
        return images, targets, mix
    partner = images.flip(0)
    if mix.box is None:
        images = images * mix.lam + partner * (1.0 - mix.lam)
    else:
        top, bottom, left, right = mix.box
        images = images.clone()
        images[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
    return images, targets * mix.lam + targets.flip(0) * (1.0 - mix.lam), mix


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(targets * log_softmax(logits)), in fp32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
