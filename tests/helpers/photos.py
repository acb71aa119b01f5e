"""Real-photo shard datasets for the training tests."""

from __future__ import annotations

from pathlib import Path


def photo_shards(root: Path, count: int, seed: int = 0, shard_bytes: int = 60_000) -> Path:
    """``count`` real-photo crops (64x48) written by the shard writer into small
    shards under ``root/shards``."""
    from infra.testing.photos import write_photo_folder
    from pipeline.shards.writer import ShardWriterConfig, write_shards

    write_photo_folder(root / "src", count, size=(64, 48), seed=seed)
    write_shards(str(root / "src"), str(root / "shards"), ShardWriterConfig(shard_bytes=shard_bytes))
    return root / "shards"
