"""The `dali` backend in DALI's CPU mode (what runs without a GPU): the plan's
order from a real S3 server, corrupt samples skipped in the middle of a stream
(before DALI and after a real DALI decode failure), resume, dtypes."""

import logging
import subprocess
import sys

import pytest
import torch
from tests.helpers.shards import jpeg_bytes, numbered_shards, write_raw_shards

import pipeline.decode.dali as dali_backend
from pipeline.augment import AugmentConfig
from pipeline.loader import DaliOptions, LoaderConfig, build_loader
from pipeline.plan import PlanConfig
from pipeline.storage.config import StorageConfig
from pipeline.shards.writer import ShardWriterConfig, write_shards


def _cfg(url, backend="dali", **kw) -> LoaderConfig:
    return LoaderConfig(url=url, backend=backend, batch_size=kw.pop("batch_size", 4),
                        num_workers=kw.pop("num_workers", 1), augment=kw.pop("augment", AugmentConfig(img_size=32)),
                        plan=kw.pop("plan", PlanConfig(window_shards=2)), **kw)


def _drain(loader):
    batches = list(loader)
    ids = [i for b in batches for i in b.sample_ids.tolist()]
    return batches, ids


def dht_broken_jpeg(seed: int) -> bytes:
    """A JPEG whose Huffman table segment is cut short: DALI's decoder fails on it."""
    return jpeg_bytes((96, 72), seed=seed).replace(b"\xff\xc4", b"\xff\xc4\x00\x03\x00", 1)


@pytest.mark.integration
def test_streams_from_s3_in_the_plans_order_with_the_cpu_backends_crops(photos, s3_env, tmp_path):
    s3_env.create_bucket("dali")
    write_shards(str(photos), "s3://dali/ds", ShardWriterConfig(shard_bytes=400_000))
    storage = StorageConfig(cache_dir=str(tmp_path / "cache"))
    aug = AugmentConfig(img_size=64)
    ranks = []
    for rank in (0, 1):
        dali = build_loader(_cfg("s3://dali/ds", batch_size=8, storage=storage, augment=aug), rank, 2)
        cpu = build_loader(_cfg("s3://dali/ds", "cpu", batch_size=8, storage=storage, augment=aug), rank, 2)
        d_batches, d_ids = _drain(dali)
        c_batches, c_ids = _drain(cpu)
        assert d_ids == c_ids and len(d_ids) == 23  # ceil(45 / 2), padded
        for d, c in zip(d_batches, c_batches):
            assert d.images.shape == (len(d.keys), 3, 64, 64) and d.images.dtype == torch.float32
            assert d.keys == c.keys and d.labels.tolist() == c.labels.tolist()
            # same crop boxes and flips; JPEG decoders and resize kernels differ a little
            assert (d.images - c.images).abs().mean() < 0.12
        assert dali.stats.images == len(d_ids) and not dali.stats.skipped
        ranks.append(set(d_ids))
    assert ranks[0] | ranks[1] == set(range(45))


def _mixed_dataset(root):
    samples = [(f"{n:06d}", {"jpg": jpeg_bytes((96, 72), seed=n), "cls": str(n).encode()}) for n in range(24)]
    samples[3] = ("000003", {"jpg": b"", "cls": b"3"})  # empty
    samples[7] = ("000007", {"jpg": jpeg_bytes((96, 72), seed=7)[:-400], "cls": b"7"})  # truncated
    samples[12] = ("000012", {"jpg": b"<html>not an image</html>" * 20, "cls": b"12"})  # garbage
    samples[15] = ("000015", {"png": jpeg_bytes((96, 72), seed=15, fmt="PNG"), "cls": b"15"})  # valid, not JPEG
    samples[16] = ("000016", {"jpg": jpeg_bytes((96, 72), seed=16, mode="L"), "cls": b"16"})  # grayscale
    write_raw_shards(root, [samples[:12], samples[12:]])
    return {3: "empty", 7: "truncated", 12: "not_an_image"}


def test_corrupt_samples_mid_stream_are_skipped_counted_and_named(tmp_path, caplog):
    bad = _mixed_dataset(tmp_path)
    cfg = _cfg(str(tmp_path), plan=PlanConfig(shuffle=False), max_corrupt_fraction=0.2)
    loader = build_loader(cfg, 0, 1)
    with caplog.at_level(logging.WARNING):
        batches, ids = _drain(loader)
    assert ids == [i for i in range(24) if i not in bad]  # what follows a bad sample still arrives, in order
    assert [lbl for b in batches for lbl in b.labels.tolist()] == ids
    assert dict(loader.stats.skipped) == {"empty": 1, "truncated": 1, "not_an_image": 1}
    assert dict(loader.stats.converted) == {"not_jpeg": 1, "grayscale": 1}
    for i, reason in bad.items():
        assert f"shard-00000{i // 12}.tar/{i:06d}: {reason}" in caplog.text
    assert all(torch.isfinite(b.images).all() for b in batches)


def test_a_decode_failure_rebuilds_the_pipeline_and_skips_only_the_bad_samples(tmp_path, monkeypatch, caplog):
    """Bytes that pass the host checks but kill DALI (here: the checks are turned
    off, so DALI's decoder really fails on cut Huffman tables)."""
    samples = [(f"{n:06d}", {"jpg": jpeg_bytes((96, 72), seed=n), "cls": str(n).encode()}) for n in range(30)]
    for k in (5, 17, 18):
        samples[k] = (f"{k:06d}", {"jpg": dht_broken_jpeg(k), "cls": str(k).encode()})
    write_raw_shards(tmp_path, [samples[:15], samples[15:]])
    monkeypatch.setattr(dali_backend, "decoder_ready_jpeg", lambda data, policy: (data, 96, 72, None))
    loader = build_loader(_cfg(str(tmp_path), plan=PlanConfig(shuffle=False), max_corrupt_fraction=0.2), 0, 1)
    with caplog.at_level(logging.WARNING):
        batches, ids = _drain(loader)
    assert ids == [i for i in range(30) if i not in (5, 17, 18)]
    assert dict(loader.stats.skipped) == {"decode_failed": 3}
    assert loader.rebuilds >= 2  # batch 1 and batch 4 each killed a pipeline
    assert "rebuilding the pipeline" in caplog.text and "shard-000001.tar/000017: decode_failed" in caplog.text
    assert sum(len(b.keys) for b in batches) == 27


def test_host_checks_catch_what_would_kill_dali():
    from pipeline.decode.jpeg import decoder_ready_jpeg
    from pipeline.images import BadImage, ImagePolicy

    with pytest.raises(BadImage) as e:
        decoder_ready_jpeg(dht_broken_jpeg(1), ImagePolicy())
    assert e.value.reason in ("truncated", "corrupt")
    data, w, h, converted = decoder_ready_jpeg(jpeg_bytes((96, 72), seed=1), ImagePolicy())
    assert (w, h, converted) == (96, 72, None)


@pytest.fixture(scope="module")
def numbered(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("numbered")
    numbered_shards(root, [10, 7, 12, 9], image_size=(96, 72))
    return str(root)


def test_resume_mid_epoch_continues_exactly(numbered):
    full = build_loader(_cfg(numbered, batch_size=5), 0, 1)
    full.set_epoch(2)
    f_batches, f_ids = _drain(full)
    first = build_loader(_cfg(numbered, batch_size=5), 0, 1)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    it.close()
    resumed = build_loader(_cfg(numbered, batch_size=5), 0, 1)
    resumed.load_state_dict(state)
    r_batches, r_ids = _drain(resumed)
    assert [i for b in head for i in b.sample_ids.tolist()] + r_ids == f_ids
    # crops come from the plan's per-sample RNG, so the resumed pixels are the same too
    assert torch.equal(torch.cat([b.images for b in r_batches]), torch.cat([b.images for b in f_batches[3:]]))


def test_random_crop_mode_and_output_dtypes(numbered):
    loader = build_loader(_cfg(numbered, dali=DaliOptions(crop="random"), dtype="bfloat16"), 0, 1)
    batches, ids = _drain(loader)
    assert sorted(ids) == list(range(38))
    assert batches[0].images.dtype == torch.bfloat16 and batches[0].images.shape == (4, 3, 32, 32)
    raw = build_loader(_cfg(numbered, normalize=False), 0, 1)
    b = next(iter(raw))
    assert b.images.dtype == torch.uint8 and b.images.shape == (4, 3, 32, 32) and b.images.max() > 100


def test_whole_decode_crops_the_same_boxes_as_roi_decode(numbered):
    """dali.decode='whole' decodes each image whole and slices the plan's box out:
    the very pixels of ROI decode (DALI's CPU mode, one libjpeg-turbo for both)."""
    def run(**options):
        return _drain(build_loader(_cfg(numbered, batch_size=5, dali=DaliOptions(**options)), 0, 1))

    (roi, roi_ids), (whole, whole_ids) = run(), run(decode="whole")
    assert whole_ids == roi_ids and sorted(roi_ids) == list(range(38))
    assert torch.equal(torch.cat([b.images for b in whole]), torch.cat([b.images for b in roi]))
    assert torch.cat([b.images for b in roi]).std() > 0.3  # real pixels, not a blank both would share
    drawn, drawn_ids = run(decode="whole", crop="random")  # DALI's own crops: every sample once, the size asked
    assert sorted(drawn_ids) == list(range(38)) and drawn[0].images.shape == (5, 3, 32, 32)


def test_choosing_a_missing_backend_names_the_extra(numbered):
    code = ("import sys; sys.modules['nvidia'] = None; sys.modules['ffcv'] = None\n"
            "import pipeline.loader as L, pipeline.decode.cpu\n"
            "for b in ('dali', 'ffcv'):\n"
            "    try:\n"
            f"        L.build_loader(L.LoaderConfig(url={numbered!r}, batch_size=2, backend=b), 0, 1)\n"
            "    except ImportError as e:\n"
            "        print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pip install 'maescale[dali]'" in out.stdout and "pip install 'maescale[ffcv]'" in out.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("decode", ["roi", "whole"])
def test_mixed_decode_on_the_gpu_matches_cpu_mode(numbered, decode):
    """nvJPEG (device='mixed') hands torch CUDA tensors; same plan, same crops."""
    gpu = build_loader(_cfg(numbered, batch_size=8, dali=DaliOptions(decode=decode)), 0, 1, device="cuda")
    cpu = build_loader(_cfg(numbered, batch_size=8), 0, 1)
    for g, c in zip(gpu, cpu):
        assert g.images.is_cuda and g.images.dtype == torch.float32
        assert g.keys == c.keys
        assert (g.images.cpu() - c.images).abs().mean() < 0.1  # nvJPEG vs libjpeg-turbo
