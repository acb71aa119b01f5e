"""The one home of image checks: what is an image, what is usable, how it is read.

Every image is judged once by the same rules: at write time (so bad files never
reach a shard) and again at read time (shards from elsewhere, bit rot). A bad image
gets a short, stable *reason* used in logs, manifests and metrics labels.

EXIF orientation has one meaning everywhere: the shard writer applies it (the
image is re-encoded upright, without the tag, and counted as an
``exif_orientation`` conversion), and every decode backend reads the pixels as
stored. A shard written elsewhere that still carries the tag is therefore read
the same way by ``cpu``, ``dali`` and ``ffcv`` — never counted corrupt.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from infra.options import option, require_choice, require_positive

# Reasons an image is rejected. Mode reasons (cmyk, grayscale, 16bit) only reject
# under ``mode_policy='skip'``; by default those images are converted to RGB.
REASONS = ("empty", "not_an_image", "truncated", "corrupt", "decompression_bomb", "too_small", "too_long",
           "too_large", "cmyk", "grayscale", "16bit", "unsupported_mode", "decode_failed", "bad_label")
MODE_REASONS = {"CMYK": "cmyk", "L": "grayscale", "LA": "grayscale", "1": "grayscale",
                "I;16": "16bit", "I;16B": "16bit", "I;16L": "16bit", "I;16N": "16bit", "I": "16bit"}
CONVERTIBLE_MODES = {"RGB", "RGBA", "P", "PA", "RGBX", "YCbCr"}
ORIENTATION_TAG = 0x0112  # EXIF
EXIF_SEARCH_BYTES = 2**17  # a JPEG's EXIF segment (APP1) comes first, before the image data
# EXIF orientation -> the transpose that turns the stored pixels upright (as PIL's exif_transpose)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
# File extensions read as images: by the shard writer's source listing, inside
# shards (a sample's image member), and by `mae reconstruct` on a folder.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return "." in base and base.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ImagePolicy:
    """What counts as a usable image."""

    min_side: int = option(8, "images with a shorter side are rejected (too_small)")
    max_pixels: int = option(100_000_000, "header-checked before decoding: decompression bombs")
    mode_policy: str = option("convert", "'convert' CMYK/grayscale/16-bit images to RGB, or 'skip' them")

    def __post_init__(self) -> None:
        require_choice(self, "mode_policy", ("convert", "skip"))
        require_positive(self, "min_side", "max_pixels")


def max_file_bytes(policy: ImagePolicy) -> int:
    """The largest image file worth reading: ``max_pixels`` stored uncompressed at 16
    bits per RGBA channel, plus room for metadata. A larger file is no usable image,
    and reading it whole could take all the memory there is."""
    return 8 * policy.max_pixels + 2**26


class BadImage(Exception):
    """An image that cannot be used; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def open_image(data: bytes, policy: ImagePolicy) -> tuple[Image.Image, str | None]:
    """Open and header-check an image (no pixel decode yet).

    Returns the lazily-decoding PIL image and the mode reason it will be converted
    for (``None`` for RGB). Raises ``BadImage``.
    """
    if not data:
        raise BadImage("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("decompression_bomb", str(e)) from e
    except UnidentifiedImageError as e:
        raise BadImage("not_an_image") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(_decode_failure_reason(e), str(e)) from e
    except Exception as e:  # noqa: BLE001 - a PIL plugin fed hostile bytes raises anything (NotImplementedError, ...)
        raise BadImage("corrupt", f"{type(e).__name__}: {e}") from e
    check_size(*img.size, policy)
    mode_reason = MODE_REASONS.get(img.mode)
    if mode_reason is None and img.mode not in CONVERTIBLE_MODES:
        raise BadImage("unsupported_mode", img.mode)
    if mode_reason is not None and policy.mode_policy == "skip":
        raise BadImage(mode_reason, img.mode)
    return img, mode_reason


def check_size(width: int, height: int, policy: ImagePolicy) -> None:
    """The size rules, from a header alone (before any pixel is decoded)."""
    if width * height > policy.max_pixels:
        raise BadImage("decompression_bomb", f"{width}x{height} exceeds {policy.max_pixels} pixels")
    if min(width, height) < policy.min_side:
        raise BadImage("too_small", f"{width}x{height}")


def load_pixels(img: Image.Image) -> Image.Image:
    """Decode the pixels, mapping decoder failures to reasons; returns RGB."""
    try:
        img.load()
        return to_rgb(img)
    except OSError as e:
        raise BadImage(_decode_failure_reason(e), str(e)) from e
    except (SyntaxError, ValueError, IndexError, EOFError) as e:
        raise BadImage("corrupt", str(e)) from e
    except Exception as e:  # noqa: BLE001 - a PIL plugin fed hostile bytes raises anything (TypeError, struct.error)
        raise BadImage("corrupt", f"{type(e).__name__}: {e}") from e


def _decode_failure_reason(e: Exception) -> str:
    text = str(e).lower()
    return "truncated" if "truncated" in text or "broken data stream" in text else "corrupt"


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):  # 16/32-bit integer: scale the top 8 bits, not clip
        arr = np.asarray(img, dtype=np.uint32)
        shift = 8 if arr.max(initial=0) > 255 else 0
        gray = (arr >> shift).clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return img.convert("RGB")


def validate_image(data: bytes, policy: ImagePolicy) -> tuple[int, int, str | None]:
    """Fully decode once to prove the image is usable: (width, height, converted-from reason)."""
    img, mode_reason = open_image(data, policy)
    rgb = load_pixels(img)
    return rgb.size[0], rgb.size[1], mode_reason


def orientation_transpose(img: Image.Image) -> Image.Transpose | None:
    """How to turn ``img`` upright as its EXIF orientation tag says (None: stored upright,
    no tag, or EXIF that cannot be read)."""
    try:
        return UPRIGHT.get(img.getexif().get(ORIENTATION_TAG))
    except Exception:  # noqa: BLE001 - malformed EXIF is not a reason to lose the image
        return None


def _orientation_turns(img: Image.Image, data: bytes) -> bool:
    if data[:2] == b"\xff\xd8" and b"Exif\x00\x00" not in data[:EXIF_SEARCH_BYTES]:
        return False  # a JPEG without EXIF: nothing to parse
    return orientation_transpose(img) is not None


def check_image(data: bytes, policy: ImagePolicy) -> tuple[str | None, bool]:
    """What the shard writer needs to know, from one full decode that proves the
    image usable: (converted-from reason, whether its EXIF orientation turns it)."""
    img, mode_reason = open_image(data, policy)
    turns = _orientation_turns(img, data)
    load_pixels(img)
    return mode_reason, turns


def reencode_jpeg(data: bytes, policy: ImagePolicy, max_side: int | None, quality: int,
                  upright: bool = False) -> bytes:
    """Decode, shrink so the longer side is at most ``max_side``, re-encode as RGB JPEG
    (no EXIF). ``upright``: first turn the pixels as the EXIF orientation says."""
    img, _ = open_image(data, policy)
    turn = orientation_transpose(img) if upright else None
    if max_side:
        img.draft("RGB", (max_side, max_side))
    rgb = load_pixels(img)
    if turn is not None:
        rgb = rgb.transpose(turn)
    if max_side and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale))), Image.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue()
