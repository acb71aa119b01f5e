"""Real photos that ship inside scikit-image and scikit-learn, no download.

Random crops of them, re-encoded as JPEG at ImageNet-like sizes (~500x375, q~90),
make realistic datasets for tests, benchmarks and the demo. Needs the ``demo``
extra (scikit-image, scikit-learn).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")


def bundled_photos() -> dict[str, np.ndarray]:
    """name -> RGB uint8 (H, W, 3), from the packages' own files."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as e:
        raise ImportError("bundled photos need scikit-image and scikit-learn: pip install 'maescale[demo]'") from e
    photos = {name: getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS}
    sk = load_sample_images()
    for fname, img in zip(sk.filenames, sk.images):
        photos[Path(fname).stem] = img
    return photos


def random_crop_jpeg(photo: np.ndarray, rng: np.random.Generator, size: tuple[int, int], quality: int) -> bytes:
    """A random crop (10-100% of the area, any position) resized to ``size`` (w, h)."""
    h, w = photo.shape[:2]
    area = rng.uniform(0.1, 1.0) * h * w
    aspect = size[0] / size[1]
    cw = int(min(w, round((area * aspect) ** 0.5)))
    ch = int(min(h, round(cw / aspect)))
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    img = Image.fromarray(photo[y:y + ch, x:x + cw]).resize(size, Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def write_photo_folder(dest: str | os.PathLike[str], count: int, labelled: bool = True, size: tuple[int, int] = (500, 375),
                       quality: int = 90, seed: int = 0) -> list[Path]:
    """``count`` JPEG crops under ``dest``; with ``labelled`` one subfolder per source photo
    (a class), else flat. Portrait and landscape alternate, as in ImageNet."""
    photos = bundled_photos()
    names = sorted(photos)
    rng = np.random.default_rng(seed)
    dest = Path(dest)
    paths = []
    for i in range(count):
        name = names[i % len(names)]
        wh = size if i % 4 else (size[1], size[0])
        folder = dest / name if labelled else dest
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}_{i:06d}.jpg"
        path.write_bytes(random_crop_jpeg(photos[name], rng, wh, quality))
        paths.append(path)
    return paths


def write_digits_folder(dest: str | os.PathLike[str], indices: np.ndarray, labelled: bool = True, size: int = 32,
                        quality: int = 95) -> list[Path]:
    """scikit-learn's labelled 8x8 digits (samples ``indices``), upscaled bicubically
    to ``size`` px, as RGB JPEGs; with ``labelled`` in one subfolder per class (0-9)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    dest = Path(dest)
    paths = []
    for i in indices.tolist():
        gray = (digits.images[i] * (255 / 16)).astype(np.uint8)
        img = Image.fromarray(gray).resize((size, size), Image.BICUBIC).convert("RGB")
        folder = dest / str(digits.target[i]) if labelled else dest
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"digit_{i:04d}.jpg"
        img.save(path, format="JPEG", quality=quality)
        paths.append(path)
    return paths
