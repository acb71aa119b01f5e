"""Data for the metrics tests: real-photo shards with one corrupt image, on S3."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.shards import write_raw_shards

from pipeline.shards.manifest import ShardManifest
from infra.testing.photos import write_photo_folder


def corrupt_dataset(root: Path, s3, bucket: str, prefix: str) -> ShardManifest:
    """96 photo crops + 1 truncated JPEG in 4 shards, uploaded to ``s3://bucket/prefix``."""
    photos = write_photo_folder(root / "src", 96, size=(64, 48), seed=5)
    samples = [(f"{i:05d}", {"jpg": p.read_bytes(), "cls": b"0"}) for i, p in enumerate(photos)]
    good = photos[0].read_bytes()
    samples.insert(50, ("00050_bad", {"jpg": good[: len(good) // 2], "cls": b"0"}))
    manifest = write_raw_shards(root / "shards", [samples[i * 25:(i + 1) * 25] for i in range(4)], classes=["photo"])
    client = s3.client()
    for p in (root / "shards").iterdir():
        client.upload_file(str(p), bucket, f"{prefix}/{p.name}")
    return manifest
