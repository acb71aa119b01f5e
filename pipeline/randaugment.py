"""RandAugment (Cubuk et al. 2020) as MAE fine-tuning uses it: timm's
``rand-m9-mstd0.5-inc1`` — 2 layers, magnitude ~ N(9, 0.5) clipped to [0, 10], the
"increasing" op set, each chosen op applied with probability 0.5.

Two halves, so every backend gives the same pixels for the same sample:
- ``draw_rand_augment`` picks each sample's ops and arguments on the host from its
  own RNG (``augment.sample_rng(..., stream=RANDAUG_STREAM)``), so they depend on
  (seed, epoch, sample id) only: not on workers, ranks, batches or resume;
- ``rand_augment`` applies them to a uint8 batch with batched torch ops, on the CPU
  (the ``cpu`` backend's workers) or on the GPU (after DALI's nvJPEG decode, or
  FFCV), never through PIL. Each op follows PIL's ImageOps/ImageEnhance definition
  (what timm calls); geometric ops sample bicubically and fill with the mean colour.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

OPS = ("auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color",
       "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
SKIP = -1  # op index of a layer that was not applied (probability 1 - APPLY_PROB)
APPLY_PROB = 0.5
MAX_LEVEL = 10.0
TRANSLATE_FRACTION = 0.45  # of the image side at full magnitude
GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")


def _argument(op: str, level: float, negate: bool) -> float:
    """An op's argument at magnitude ``level`` in [0, 10] (timm's "increasing" levels)."""
    sign = -1.0 if negate else 1.0
    frac = level / MAX_LEVEL
    if op == "rotate":
        return sign * 30.0 * frac  # degrees
    if op in ("shear_x", "shear_y"):
        return sign * 0.3 * frac
    if op in ("translate_x", "translate_y"):
        return sign * TRANSLATE_FRACTION * frac  # fraction of the side
    if op == "posterize":
        return float(4 - int(frac * 4))  # bits kept
    if op == "solarize":
        return float(256 - int(frac * 256))  # threshold
    if op == "solarize_add":
        return float(int(frac * 110))
    if op in ("color", "contrast", "brightness", "sharpness"):
        return 1.0 + sign * 0.9 * frac  # enhance factor
    return 0.0  # auto_contrast, equalize, invert


def draw_rand_augment(rng: np.random.Generator, layers: int, magnitude: float, magnitude_std: float) -> np.ndarray:
    """One sample's RandAugment: (layers, 2) float32 of [op index or SKIP, argument].

    Every layer consumes the same four draws (op, apply?, magnitude, sign), so the
    stream is fixed whatever was chosen.
    """
    out = np.zeros((layers, 2), dtype=np.float32)
    for i in range(layers):
        op = int(rng.integers(len(OPS)))
        applied = rng.random() < APPLY_PROB
        level = rng.normal(magnitude, magnitude_std) if magnitude_std > 0 else magnitude
        negate = rng.random() < 0.5
        level = min(max(level, 0.0), MAX_LEVEL)
        out[i] = (op if applied else SKIP, _argument(OPS[op], level, negate))
    return out


def rand_augment(images: torch.Tensor, params: torch.Tensor, fill: tuple[int, int, int]) -> torch.Tensor:
    """Apply per-sample RandAugment to uint8 (B, 3, H, W); params (B, layers, 2)
    from ``draw_rand_augment``. Each op runs once per layer on the samples that drew it."""
    x = images.clone()
    params = params.to(images.device)
    for layer in range(params.shape[1]):
        ops, args = params[:, layer, 0].long(), params[:, layer, 1]
        for k, op in enumerate(OPS):
            sel = (ops == k).nonzero().squeeze(1)
            if sel.numel():
                x[sel] = _OP_FUNCS[op](x[sel], args[sel], fill)
    return x


# ------------------------------------------------------------ colour ops
# Each: uint8 (n, 3, H, W), args (n,) float32 -> uint8 (n, 3, H, W).
def _per_sample(a: torch.Tensor) -> torch.Tensor:
    return a.view(-1, 1, 1, 1)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) uint8 -> (n, 1, H, W) float luma, rounded as PIL's "L"."""
    w = torch.tensor(GRAY, device=x.device).view(1, 3, 1, 1)
    return (x.float() * w).sum(1, keepdim=True).round_()


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: degenerate + factor * (image - degenerate), clipped."""
    d = degenerate.float()
    return (d + _per_sample(factor) * (x.float() - d)).clamp_(0, 255).to(torch.uint8)  # truncates, as PIL


def _invert(x: torch.Tensor, a: torch.Tensor, fill) -> torch.Tensor:
    return 255 - x


def _posterize(x: torch.Tensor, bits: torch.Tensor, fill) -> torch.Tensor:
    shift = (8 - bits).long().clamp(0, 8)
    mask = ((255 >> shift) << shift).to(torch.uint8)  # the top `bits` bits
    return x & _per_sample(mask)


def _solarize(x: torch.Tensor, threshold: torch.Tensor, fill) -> torch.Tensor:
    return torch.where(x.float() >= _per_sample(threshold), 255 - x, x)


def _solarize_add(x: torch.Tensor, add: torch.Tensor, fill) -> torch.Tensor:
    added = _to_uint8(x.float() + _per_sample(add))
    return torch.where(x < 128, added, x)


def _brightness(x: torch.Tensor, f: torch.Tensor, fill) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, f)


def _color(x: torch.Tensor, f: torch.Tensor, fill) -> torch.Tensor:
    return _blend(_gray(x).expand_as(x), x, f)


def _contrast(x: torch.Tensor, f: torch.Tensor, fill) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True).add_(0.5).floor_()  # PIL: int(mean + 0.5)
    return _blend(mean.expand_as(x), x, f)


def _sharpness(x: torch.Tensor, f: torch.Tensor, fill) -> torch.Tensor:
    """Blend with PIL's SMOOTH filter (3x3, centre 5, rest 1, /13); border pixels kept."""
    kernel = torch.ones(3, 1, 3, 3, device=x.device)
    kernel[:, :, 1, 1] = 5.0
    smooth = F.conv2d(x.float(), kernel / 13.0, groups=3).round_()
    degenerate = x.float().clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, f)


def _auto_contrast(x: torch.Tensor, a: torch.Tensor, fill) -> torch.Tensor:
    """Per channel: stretch [min, max] to [0, 255] (unchanged where min == max)."""
    lo = x.amin(dim=(2, 3), keepdim=True).float()
    hi = x.amax(dim=(2, 3), keepdim=True).float()
    scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp_min(1), torch.ones_like(hi))
    offset = torch.where(hi > lo, -lo * scale, torch.zeros_like(lo))
    return (x.float() * scale + offset).floor_().clamp_(0, 255).to(torch.uint8)


def _equalize(x: torch.Tensor, a: torch.Tensor, fill) -> torch.Tensor:
    """Per channel histogram equalization with PIL's lookup table."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).long()
    rows = torch.arange(n * c, device=x.device).unsqueeze(1)
    hist = torch.bincount((rows * 256 + flat).reshape(-1), minlength=n * c * 256).view(n * c, 256)
    last = torch.where(hist > 0, torch.arange(256, device=x.device), -1).amax(1, keepdim=True)  # last non-empty bin
    step = (hist.sum(1, keepdim=True) - hist.gather(1, last)) // 255
    before = hist.cumsum(1) - hist  # pixels below each value
    lut = ((step // 2 + before) // step.clamp_min(1)).clamp_(0, 255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device).expand_as(lut))
    return lut.gather(1, flat).view(n, c, h, w).to(torch.uint8)


# ---------------------------------------------------------- geometric ops
def _warp(x: torch.Tensor, inverse: torch.Tensor, fill: tuple[int, int, int]) -> torch.Tensor:
    """Resample with per-sample affine maps (n, 2, 3) from output to input pixel
    coordinates (PIL's ``Image.transform(AFFINE)`` convention, pixel centres at +0.5);
    bicubic, points outside the image take ``fill``."""
    n, _, h, w = x.shape
    to_norm = torch.tensor([[2.0 / w, 0, -1], [0, 2.0 / h, -1], [0, 0, 1]], device=x.device)
    from_norm = torch.linalg.inv(to_norm)
    full = torch.cat([inverse, torch.tensor([0.0, 0, 1], device=x.device).expand(n, 1, 3)], dim=1)
    theta = (to_norm @ full @ from_norm)[:, :2]
    grid = F.affine_grid(theta, [n, 4, h, w], align_corners=False)
    src = torch.cat([x.float(), torch.ones(n, 1, h, w, device=x.device)], dim=1)
    out = F.grid_sample(src, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
    inside = (out[:, 3:] > 0.5).float()
    colour = torch.tensor(fill, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return _to_uint8(out[:, :3] * inside + colour * (1 - inside))


def _affine(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=1)  # (n, 2, 3)


def _rotate(x: torch.Tensor, degrees: torch.Tensor, fill) -> torch.Tensor:
    """Counter-clockwise about the centre, as PIL's ``rotate``."""
    h, w = x.shape[2:]
    phi = -degrees * (math.pi / 180)
    cos, sin = phi.cos(), phi.sin()
    cx, cy = w / 2.0, h / 2.0
    return _warp(x, _affine([[cos, sin, cx - cos * cx - sin * cy], [-sin, cos, cy + sin * cx - cos * cy]]), fill)


def _shear_x(x: torch.Tensor, f: torch.Tensor, fill) -> torch.Tensor:
    one, zero = torch.ones_like(f), torch.zeros_like(f)
    return _warp(x, _affine([[one, f, zero], [zero, one, zero]]), fill)


def _shear_y(x: torch.Tensor, f: torch.Tensor, fill) -> torch.Tensor:
    one, zero = torch.ones_like(f), torch.zeros_like(f)
    return _warp(x, _affine([[one, zero, zero], [f, one, zero]]), fill)


def _translate_x(x: torch.Tensor, frac: torch.Tensor, fill) -> torch.Tensor:
    one, zero = torch.ones_like(frac), torch.zeros_like(frac)
    return _warp(x, _affine([[one, zero, frac * x.shape[3]], [zero, one, zero]]), fill)


def _translate_y(x: torch.Tensor, frac: torch.Tensor, fill) -> torch.Tensor:
    one, zero = torch.ones_like(frac), torch.zeros_like(frac)
    return _warp(x, _affine([[one, zero, zero], [zero, one, frac * x.shape[2]]]), fill)


_OP_FUNCS: dict[str, Callable[[torch.Tensor, torch.Tensor, tuple[int, int, int]], torch.Tensor]] = {
    "auto_contrast": _auto_contrast, "equalize": _equalize, "invert": _invert, "rotate": _rotate,
    "posterize": _posterize, "solarize": _solarize, "solarize_add": _solarize_add, "color": _color,
    "contrast": _contrast, "brightness": _brightness, "sharpness": _sharpness, "shear_x": _shear_x,
    "shear_y": _shear_y, "translate_x": _translate_x, "translate_y": _translate_y,
}
