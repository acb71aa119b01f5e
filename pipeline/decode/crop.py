"""Decode + RandomResizedCrop + flip of one image on the CPU: a fast path and the
reference it is tested against.

Reference: PIL decode (``Image.draft`` DCT scaling where the crop allows), one
antialiased bicubic crop-resize — torchvision's semantics.
Fast path, for baseline JPEGs: libjpeg-turbo through simplejpeg, decoding at the
largest DCT scale (1/2, 1/4, 1/8) that keeps the crop at least the output size —
the DCT does the antialiased power-of-two shrink — then OpenCV's bicubic for the
remaining factor, which is below 2. Anything the fast path cannot take (CMYK,
progressive quirks, corrupt bytes) goes through the reference, which also names
the reason a bad image is bad.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from pipeline.augment import AugmentConfig, crop_and_flip
from pipeline.decode.jpeg import DECODER_COLORSPACES, jpeg_header
from pipeline.images import BadImage, ImagePolicy, check_size, load_pixels, open_image

Box = tuple[int, int, int, int]  # left, top, width, height

cv2.setNumThreads(1)  # one image per worker process; threads would oversubscribe


def decode_crop(data: bytes, policy: ImagePolicy, aug: AugmentConfig, rng: np.random.Generator,
                fast: bool = True) -> tuple[np.ndarray, str | None]:
    """Bytes -> augmented uint8 (S, S, 3) and the mode it was converted from (or None)."""
    header = jpeg_header(data) if fast else None
    if header is None:
        return decode_crop_reference(data, policy, aug, rng)
    width, height, colorspace = header
    check_size(width, height, policy)
    if colorspace not in DECODER_COLORSPACES:  # CMYK/YCCK: PIL converts those
        return decode_crop_reference(data, policy, aug, rng)
    mode_reason = "grayscale" if colorspace == "Gray" else None
    if mode_reason and policy.mode_policy == "skip":
        raise BadImage(mode_reason, colorspace)
    box, flip = crop_and_flip(width, height, aug, rng)
    try:
        arr = _fast_crop(data, width, height, box, aug.img_size)
    except (ValueError, RuntimeError, cv2.error):
        return decode_crop_reference(data, policy, aug, rng, (box, flip))
    return (cv2.flip(arr, 1) if flip else arr), mode_reason  # cv2: a vectorized copy; numpy's [:, ::-1] is not


def decode_crop_reference(data: bytes, policy: ImagePolicy, aug: AugmentConfig, rng: np.random.Generator,
                          box_flip: tuple[Box, bool] | None = None) -> tuple[np.ndarray, str | None]:
    img, mode_reason = open_image(data, policy)
    width, height = img.size
    (x, y, cw, ch), flip = box_flip or crop_and_flip(width, height, aug, rng)
    S = aug.img_size
    if img.format == "JPEG":  # decode at the smallest DCT scale that keeps the crop >= S
        img.draft("RGB", (math.ceil(width * S / cw), math.ceil(height * S / ch)))
    rgb = load_pixels(img)
    fx, fy = rgb.size[0] / width, rgb.size[1] / height
    out = np.array(rgb.resize((S, S), Image.BICUBIC, box=(x * fx, y * fy, (x + cw) * fx, (y + ch) * fy)))
    return (np.ascontiguousarray(out[:, ::-1]) if flip else out), mode_reason


def _fast_crop(data: bytes, width: int, height: int, box: Box, S: int) -> np.ndarray:
    x, y, cw, ch = box
    # smallest decode that keeps the crop >= S on both sides
    arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=math.ceil(width * S / cw),
                                 min_height=math.ceil(height * S / ch))
    fy, fx = arr.shape[0] / height, arr.shape[1] / width
    x0, y0 = int(x * fx), int(y * fy)
    x1, y1 = max(x0 + 1, round((x + cw) * fx)), max(y0 + 1, round((y + ch) * fy))
    crop = arr[y0:y1, x0:x1]
    shrink = crop.shape[1] >= 2 * S or crop.shape[0] >= 2 * S  # only when DCT scaling could not help
    return cv2.resize(crop, (S, S), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
