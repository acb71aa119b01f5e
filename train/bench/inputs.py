"""What checking untrusted input costs (`mae bench inputs`), side by side in one run:

(a) loading a manifest of many shards: ``ShardManifest.from_json`` (every field
    validated) vs the same JSON taken on trust (``json.loads`` + ``ShardInfo(**s)``,
    what the loader did before validation);
(b) the shard writer's per-image check on real-photo JPEGs: the full decode that
    proves an image usable (``validate_image``, what the writer ran before) vs
    ``check_image``, which also reads the EXIF orientation — on plain JPEGs and on
    JPEGs that carry EXIF (as camera photos do), whose tag must be parsed.

Rounds alternate the two sides (A B A B) and medians are reported.
"""

from __future__ import annotations

import hashlib
import io
import json
import statistics
import time
from collections.abc import Callable

import numpy as np

from pipeline.images import ORIENTATION_TAG, ImagePolicy, check_image, validate_image
from pipeline.shards.manifest import ShardInfo, ShardManifest


def synthetic_manifest(shards: int) -> str:
    """A manifest of ``shards`` shards of 256 MiB, as `mae shard` writes it."""
    infos = [ShardInfo(f"shard-{i:06d}.tar", 1000, 256 * 2**20, hashlib.sha256(str(i).encode()).hexdigest())
             for i in range(shards)]
    return ShardManifest(infos, classes=[f"n{i:08d}" for i in range(1000)]).to_json()


def trusting_load(text: str) -> list[ShardInfo]:
    """The manifest taken on trust: what the loader did before it validated fields."""
    return [ShardInfo(**s) for s in json.loads(text)["shards"]]


def alternate(a: Callable[[], object], b: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, run alternately."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for fn, out in ((a, times[0]), (b, times[1])):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def bench_manifest(shards: int, rounds: int) -> dict[str, float]:
    text = synthetic_manifest(shards)
    if ShardManifest.from_json(text).shards != trusting_load(text):
        raise RuntimeError("the validated manifest differs from the trusted one")
    trusted, validated = alternate(lambda: trusting_load(text), lambda: ShardManifest.from_json(text), rounds)
    return {"shards": shards, "mib": len(text) / 2**20, "trusted_s": trusted, "validated_s": validated,
            "ratio": validated / trusted}


def _with_exif(jpeg: bytes) -> bytes:
    """The same photo re-saved with an EXIF block (orientation 1: upright)."""
    from PIL import Image

    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 1
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(out, format="JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def bench_image_checks(images: int, rounds: int) -> dict[str, object]:
    from infra.testing.photos import bundled_photos, random_crop_jpeg

    photos = list(bundled_photos().values())
    rng = np.random.default_rng(0)
    plain = [random_crop_jpeg(photos[i % len(photos)], rng, (500, 375), 90) for i in range(images)]
    policy = ImagePolicy()
    report: dict[str, object] = {"images": images}
    for name, data in (("plain", plain), ("exif", [_with_exif(d) for d in plain])):
        def decode_only(data: list[bytes] = data) -> None:
            for d in data:
                validate_image(d, policy)

        def with_orientation(data: list[bytes] = data) -> None:
            for d in data:
                check_image(d, policy)

        before, after = alternate(decode_only, with_orientation, rounds)
        report[name] = {"before_ms_per_image": before / images * 1e3, "after_ms_per_image": after / images * 1e3,
                        "overhead": after / before - 1}
    return report


def bench_inputs(shards: int = 100_000, images: int = 300, rounds: int = 3) -> dict[str, object]:
    return {"rounds": rounds, "manifest": bench_manifest(shards, rounds), "images": bench_image_checks(images, rounds)}
