"""Shard-building helpers shared by the tests: small JPEGs and hand-made shards
(bypassing the writer's validation, to feed readers what it would refuse)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import xxhash
from PIL import Image

from pipeline.shards.manifest import MANIFEST_NAME, ShardInfo, ShardManifest
from pipeline.shards.tar_format import TarShardWriter


def jpeg_bytes(size=(96, 80), seed=0, mode="RGB", fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize(size, Image.BICUBIC)
    if mode != "RGB":
        img = img.convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt, quality=90)
    return out.getvalue()


def write_raw_shards(dest: Path, shards: list[list[tuple[str, dict[str, bytes]]]], classes=()) -> ShardManifest:
    """Shards written as given (no validation) plus a manifest: for feeding readers
    data the writer would have refused."""
    dest.mkdir(parents=True, exist_ok=True)
    infos = []
    for i, samples in enumerate(shards):
        name = f"shard-{i:06d}.tar"
        with open(dest / name, "wb") as f:
            w = TarShardWriter(f)
            for key, members in samples:
                w.add(key, members)
            w.close()
        data = (dest / name).read_bytes()
        infos.append(ShardInfo(name, len(samples), len(data), hashlib.sha256(data).hexdigest(),
                               xxh3_128=xxhash.xxh3_128_hexdigest(data)))
    manifest = ShardManifest(shards=infos, classes=list(classes))
    (dest / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def numbered_shards(dest: Path, sizes: list[int], image_size=(64, 48)) -> ShardManifest:
    """Shards of small valid JPEGs whose label is their global index."""
    shards, n = [], 0
    for size in sizes:
        samples = []
        for _ in range(size):
            samples.append((f"{n:06d}", {"jpg": jpeg_bytes(image_size, seed=n), "cls": str(n).encode()}))
            n += 1
        shards.append(samples)
    return write_raw_shards(dest, shards)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def exif_oriented_jpeg(orientation: int, size=(96, 64), seed=0) -> bytes:
    """A JPEG whose stored pixels are ``size`` (w, h) and whose EXIF orientation tag
    says how to turn them upright (as a phone camera writes it). The left half is
    dark and the right half bright, so a wrong turn shows."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
    arr[:, size[0] // 2:] += 180
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A small, valid PNG whose header claims ``width`` x ``height`` pixels: a
    decompression bomb as far as any header check can tell."""
    import struct
    import zlib

    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def flip_a_byte(path: Path) -> None:
    """Bit rot: one bit of the file's middle byte flipped."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def negative_member_size(data: bytearray) -> None:
    """The first tar header's size field set to -1, its checksum fixed up: a header
    as valid as a hostile writer makes it, whose size Python's int() would accept."""
    data[124:136] = b"-0000000001\0"
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\0 " % sum(data[:512])


def log_downloads(monkeypatch, log: Path, line) -> None:
    """Append ``line(store, shard)`` to ``log`` for every shard download a
    ``ShardStore`` starts, in this process and in the ones it forks (DataLoader
    workers): a file, not a list in memory."""
    from pipeline.storage.store import ShardStore

    download = ShardStore._download

    def logged(self, shard, *args, **kwargs):
        with open(log, "a") as f:
            f.write(line(self, shard) + "\n")
        return download(self, shard, *args, **kwargs)

    monkeypatch.setattr(ShardStore, "_download", logged)
