"""Data for the metrics tests: real-photo shards with one corrupt image, on S3."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.manifest import MANIFEST_NAME, ShardInfo, ShardManifest
from pipeline.sample_photos import write_photo_folder
from pipeline.tar_shards import TarShardWriter


def corrupt_dataset(root: Path, s3, bucket: str, prefix: str) -> ShardManifest:
    """96 photo crops + 1 truncated JPEG in 4 shards, uploaded to ``s3://bucket/prefix``."""
    photos = write_photo_folder(root / "src", 96, size=(64, 48), seed=5)
    samples = [(f"{i:05d}", {"jpg": p.read_bytes(), "cls": b"0"}) for i, p in enumerate(photos)]
    good = photos[0].read_bytes()
    samples.insert(50, ("00050_bad", {"jpg": good[: len(good) // 2], "cls": b"0"}))
    out = root / "shards"
    out.mkdir(parents=True)
    infos = []
    for i in range(4):
        part = samples[i * 25:(i + 1) * 25]
        name = f"shard-{i:06d}.tar"
        with open(out / name, "wb") as f:
            w = TarShardWriter(f)
            for key, members in part:
                w.add(key, members)
            w.close()
        data = (out / name).read_bytes()
        infos.append(ShardInfo(name, len(part), len(data), hashlib.sha256(data).hexdigest()))
    manifest = ShardManifest(shards=infos, classes=["photo"])
    (out / MANIFEST_NAME).write_text(manifest.to_json())
    client = s3.client()
    for p in out.iterdir():
        client.upload_file(str(p), bucket, f"{prefix}/{p.name}")
    return manifest
