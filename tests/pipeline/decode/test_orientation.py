"""EXIF orientation has one meaning on every path: the shard writer turns images
upright (counted as a conversion), and the decode backends read stored pixels —
so `cpu` and `dali` agree on a shard that still carries the tag, and a valid
rotated image is never counted corrupt."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from tests.helpers.shards import exif_oriented_jpeg, jpeg_bytes, write_raw_shards

from pipeline.augment import AugmentConfig
from pipeline.loader import LoaderConfig, build_loader
from pipeline.plan import PlanConfig
from pipeline.shards.tar_format import index_tar, read_members
from pipeline.shards.writer import ShardWriterConfig, write_shards

ORIENTATION_TAG = 0x0112  # EXIF


def test_the_writer_turns_rotated_images_upright_and_counts_it(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for orientation in (1, 3, 6, 8):
        (src / f"o{orientation}.jpg").write_bytes(exif_oriented_jpeg(orientation, seed=orientation))
    (src / "plain.png").write_bytes(jpeg_bytes((80, 60), fmt="PNG"))
    summary = write_shards(str(src), str(tmp_path / "out"), ShardWriterConfig(shuffle=False))
    assert summary.converted == {"exif_orientation": 3} and not summary.manifest.rejects
    assert "converted: exif_orientation=3" in summary.format()
    shard = tmp_path / "out" / summary.manifest.shards[0].name
    with open(shard, "rb") as f:
        stored = {e.key.split("_", 1)[1]: read_members(f, e) for e in index_tar(f, shard.name)}
    assert set(stored["plain"]) == {"png", "json"}  # untouched: original bytes
    assert stored["o1"]["jpg"] == exif_oriented_jpeg(1, seed=1)  # upright already: original bytes
    for orientation in (3, 6, 8):
        original = Image.open(io.BytesIO(exif_oriented_jpeg(orientation, seed=orientation)))
        upright = np.asarray(ImageOps.exif_transpose(original), dtype=np.float32)
        written = Image.open(io.BytesIO(stored[f"o{orientation}"]["jpg"]))
        assert written.getexif().get(ORIENTATION_TAG) is None  # the tag is gone, the pixels are turned
        assert written.size == (upright.shape[1], upright.shape[0])
        assert np.abs(np.asarray(written, dtype=np.float32) - upright).mean() < 4


@pytest.fixture(scope="module")
def tagged_shards(tmp_path_factory) -> str:
    """A shard written elsewhere: every EXIF orientation on non-square images."""
    root = tmp_path_factory.mktemp("tagged")
    samples = [(f"{n:06d}", {"jpg": exif_oriented_jpeg(n % 8 + 1, size=(96, 64), seed=n), "cls": b"0"})
               for n in range(16)]
    write_raw_shards(root, [samples[:8], samples[8:]], classes=["photo"])
    return str(root)


def _read(url: str, backend: str) -> tuple[torch.Tensor, list[str], dict]:
    cfg = LoaderConfig(url=url, backend=backend, batch_size=4, num_workers=1, normalize=False,
                       max_corrupt_fraction=0.0, augment=AugmentConfig(img_size=32, deterministic=True),
                       plan=PlanConfig(shuffle=False))
    loader = build_loader(cfg, 0, 1)
    batches = list(loader)
    return torch.cat([b.images for b in batches]).float(), [k for b in batches for k in b.keys], dict(loader.stats.skipped)


def test_cpu_and_dali_read_tagged_images_alike_and_never_as_corrupt(tagged_shards):
    cpu, cpu_keys, cpu_skips = _read(tagged_shards, "cpu")
    dali, dali_keys, dali_skips = _read(tagged_shards, "dali")
    assert cpu_skips == dali_skips == {}
    assert cpu_keys == dali_keys and len(cpu_keys) == 16
    diff = (cpu - dali).abs()
    assert diff.mean() < 6 and (diff > 40).float().mean() < 0.02
    # stored pixels, not turned: dark left half, bright right half in every image
    left, right = cpu[..., :12].mean(), cpu[..., 20:].mean()
    assert right - left > 100
