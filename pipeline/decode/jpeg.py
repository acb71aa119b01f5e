"""JPEG checks from the bytes alone, before any decoder sees them.

``jpeg_header`` reads size and colour space from the header (libjpeg-turbo via
simplejpeg), ``jpeg_complete`` finds the end-of-image marker a truncated file has
lost, and ``decoder_ready_jpeg`` is what a GPU decoder (nvJPEG through DALI, which
dies on a bad file instead of skipping it) may be handed.
"""

from __future__ import annotations

import simplejpeg

from pipeline.images import BadImage, ImagePolicy, check_size, open_image, reencode_jpeg

JPEG_MAX_SIDE = 65500  # libjpeg's limit on either side
DECODER_COLORSPACES = ("RGB", "YCbCr", "Gray")  # what nvJPEG and our fast CPU path take as is


def jpeg_header(data: bytes) -> tuple[int, int, str] | None:
    """``(width, height, colorspace)`` of a JPEG, or None for anything else."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # let the reference decoder name what is wrong
    return width, height, colorspace


def jpeg_complete(data: bytes) -> bool:
    """Whether a JPEG's last marker is its end (EOI). A truncated file loses it; in
    entropy-coded data 0xFF is always stuffed, so EOI cannot appear there by chance.
    Bytes after EOI (padding, camera trailers) are allowed within the last 64 KiB."""
    return data.rfind(b"\xff\xd9", max(0, len(data) - 65536)) > 2


def decoder_ready_jpeg(data: bytes, policy: ImagePolicy) -> tuple[bytes, int, int, str | None]:
    """Check an image before a GPU decoder sees it: ``(jpeg bytes, width, height,
    converted-from)``. Baseline RGB/YCbCr/grayscale JPEGs pass through untouched;
    anything else PIL can read (PNG, WebP, CMYK JPEG, ...) is re-encoded to an RGB
    JPEG (q95). Raises ``BadImage`` for bytes the decoder must not see."""
    if not data:
        raise BadImage("empty")
    header = jpeg_header(data)
    if header is not None and header[2] in DECODER_COLORSPACES:
        width, height, colorspace = header
        check_size(width, height, policy)
        if not jpeg_complete(data):
            raise BadImage("truncated", "no JPEG end-of-image marker")
        mode_reason = "grayscale" if colorspace == "Gray" else None
        if mode_reason and policy.mode_policy == "skip":
            raise BadImage(mode_reason, colorspace)
        return data, width, height, mode_reason
    img, mode_reason = open_image(data, policy)  # names what is wrong, or converts
    width, height = img.size
    if max(width, height) > JPEG_MAX_SIDE:  # no JPEG holds it: a re-encode would fail with a bare OSError
        raise BadImage("too_long", f"{width}x{height}: the decoder takes JPEGs, whose sides stop at {JPEG_MAX_SIDE}")
    return reencode_jpeg(data, policy, None, 95), width, height, mode_reason or "not_jpeg"
