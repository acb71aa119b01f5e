"""The `ffcv` backend: `mae shard --format beton` (validation first, a watchdog on
FFCV's writer), staging from a real S3 server, ranks, resume."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from tests.helpers.shards import jpeg_bytes, write_raw_shards

from pipeline.augment import AugmentConfig
from pipeline.errors import BetonWriteError, ManifestError, PipelineError
from pipeline.shards.beton import BETON_NAME, KEYS_NAME, BetonOptions, run_ffcv_writer, write_beton
from pipeline.loader import LoaderConfig, build_loader
from pipeline.shards.manifest import ShardManifest
from pipeline.plan import PlanConfig
from pipeline.storage.config import StorageConfig
from pipeline.storage.objects import sha256_file
from pipeline.shards.writer import ShardWriterConfig


def _cfg(url, **kw) -> LoaderConfig:
    return LoaderConfig(url=url, backend=kw.pop("backend", "ffcv"), batch_size=kw.pop("batch_size", 8),
                        num_workers=2, augment=kw.pop("augment", AugmentConfig(img_size=32)), **kw)


def _ids(loader) -> list[int]:
    return [i for b in loader for i in b.sample_ids.tolist()]


@pytest.fixture(scope="module")
def beton(photo_folder, tmp_path_factory) -> str:
    """The 45 photos plus three bad files, written with the CLI."""
    src = tmp_path_factory.mktemp("beton-src")
    subprocess.run(["cp", "-r", f"{photo_folder}/.", str(src)], check=True)
    (src / "coffee" / "cut.jpg").write_bytes(jpeg_bytes((200, 150), seed=3)[:500])
    (src / "coffee" / "junk.jpg").write_bytes(b"not an image")
    (src / "coffee" / "gray.jpg").write_bytes(jpeg_bytes((200, 150), seed=4, mode="L"))
    dest = tmp_path_factory.mktemp("beton")
    res = subprocess.run([sys.executable, "-m", "train.cli", "shard", str(src), str(dest), "--format", "beton",
                          "--workers", "2", "--stall-timeout", "120"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "46 samples in 1 shards" in res.stdout and "rejected 2" in res.stdout  # gray.jpg is converted
    return str(dest)


def test_beton_dataset_has_a_manifest_keys_and_a_verified_file(beton):
    manifest = ShardManifest.from_json(open(f"{beton}/manifest.json").read())
    assert manifest.options["format"] == "beton" and len(manifest.classes) == 9
    (info,) = manifest.shards
    assert info.name == BETON_NAME and info.samples == 46
    assert sha256_file(f"{beton}/{BETON_NAME}") == info.sha256
    keys = open(f"{beton}/{KEYS_NAME}").read().splitlines()
    assert len(keys) == len(set(keys)) == 46
    assert sorted(r.reason for r in manifest.rejects) == ["not_an_image", "truncated"]


def test_loads_every_sample_once_per_rank_split_with_labels(beton):
    manifest = ShardManifest.from_json(open(f"{beton}/manifest.json").read())
    keys = open(f"{beton}/{KEYS_NAME}").read().splitlines()
    seen = []
    for rank in (0, 1):
        loader = build_loader(_cfg(beton), rank, 2)
        for b in loader:
            assert b.images.shape == (len(b.keys), 3, 32, 32) and b.images.dtype == torch.float32
            assert b.keys == [keys[i] for i in b.sample_ids.tolist()]
            for key, label in zip(b.keys, b.labels.tolist()):
                # keys carry the source file's stem; its folder is the class (gray.jpg sits in coffee/)
                stem, cls = key.split("_", 1)[1], manifest.classes[label]
                assert stem.startswith(cls) or (stem, cls) == ("gray", "coffee")
            seen += b.sample_ids.tolist()
        assert loader.stats.warmup_s > 0
    assert sorted(set(seen)) == list(range(46)) and len(seen) == 46


def test_an_image_longer_than_a_jpeg_can_be_is_shrunk_to_fit(tmp_path):
    """A 70,000 x 16 PNG: FFCV re-encodes every image as JPEG, whose sides stop at
    65,500. Uncapped, its writer stalled on it until the watchdog killed it; now it
    is shrunk to fit, and read back as a sample like any other."""
    src = tmp_path / "src" / "wide"
    src.mkdir(parents=True)
    (src / "long.png").write_bytes(jpeg_bytes((70_000, 16), fmt="PNG"))
    (src / "plain.jpg").write_bytes(jpeg_bytes((96, 80)))
    dest = tmp_path / "beton"
    res = subprocess.run([sys.executable, "-m", "train.cli", "shard", str(src.parent), str(dest), "--format", "beton",
                          "--workers", "1", "--stall-timeout", "120"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 samples in 1 shards" in res.stdout
    loader = build_loader(_cfg(str(dest), batch_size=2), 0, 1)
    batches = list(loader)
    assert sum(len(b.keys) for b in batches) == 2 and not loader.stats.skipped
    assert sorted(k.split("_", 1)[1] for b in batches for k in b.keys) == ["long", "plain"]


def test_a_loader_thread_that_dies_is_an_error_not_a_hang(beton, monkeypatch):
    """FFCV decodes in a thread of its own, which ends an epoch by queueing None;
    one that died of an exception queued nothing, and the trainer waited forever.
    The fault: its fourth batch raises inside that thread."""
    from ffcv.loader.epoch_iterator import EpochIterator

    run_pipeline = EpochIterator.run_pipeline

    def failing(self, b_ix, *args):
        if b_ix == 3:
            raise MemoryError("injected in FFCV's loader thread")
        return run_pipeline(self, b_ix, *args)

    monkeypatch.setattr(EpochIterator, "run_pipeline", failing)
    loader = build_loader(_cfg(beton, batch_size=5), 0, 1)
    seen, raised = [], []

    def consume():
        try:
            for b in loader:
                seen.extend(b.sample_ids.tolist())
        except PipelineError as e:
            raised.append(e)

    consumer = threading.Thread(target=consume, daemon=True)  # a hang must not hold the test up
    consumer.start()
    consumer.join(120)
    assert not consumer.is_alive(), "the loader still waits for a batch that can never come"
    assert len(raised) == 1 and "ffcv: its loader thread stopped before the end of the epoch" in str(raised[0])
    assert len(seen) == 15  # the three batches decoded before the fault were handed out


def test_resume_mid_epoch_continues_the_plan(beton):
    full = build_loader(_cfg(beton, batch_size=5), 0, 1)
    full.set_epoch(1)
    expected = _ids(full)
    first = build_loader(_cfg(beton, batch_size=5), 0, 1)
    first.set_epoch(1)
    it = iter(first)
    head = [i for _ in range(4) for i in next(it).sample_ids.tolist()]
    state = first.state_dict()
    it.close()
    resumed = build_loader(_cfg(beton, batch_size=5), 0, 1)
    resumed.load_state_dict(state)
    assert head + _ids(resumed) == expected
    assert expected != list(range(46))  # shuffled by the plan, not FFCV


def test_a_beton_that_lies_about_itself_is_refused_before_ffcv_reads_it(beton, tmp_path):
    """FFCV trusts the file: fewer records than the manifest says aborted the process
    in OpenCV or hung its loader thread for good; a huge count was a numpy traceback."""
    import numpy as np

    from pipeline.decode.ffcv import check_beton

    good = f"{beton}/{BETON_NAME}"
    check_beton(good, 46)
    data = bytearray(open(good, "rb").read())
    for offset, value, message in [(8, 5, "its header holds 5 samples, the manifest 46"),
                                   (8, 2**62, "its header holds 4611686018427387904 samples"),
                                   (16, len(data) + 1, "its allocation table at byte"),
                                   (0, 7, "format version 7")]:
        forged = bytearray(data)
        width = 2 if offset == 0 else 8
        forged[offset:offset + width] = np.array([value], dtype=f"<u{width}").tobytes()
        (tmp_path / "forged.beton").write_bytes(bytes(forged))
        with pytest.raises(ManifestError, match=message):
            check_beton(str(tmp_path / "forged.beton"), 46)
    with pytest.raises(ManifestError, match="the manifest 47"):
        check_beton(good, 47)


def test_mae_inspect_summarizes_and_verifies_a_beton(beton):
    """It called every beton 'truncated or corrupt tar'."""
    res = subprocess.run([sys.executable, "-m", "train.cli", "inspect", beton, "--verify"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    first = open(f"{beton}/{KEYS_NAME}").read().splitlines()[0]
    assert f"first keys of {BETON_NAME}: {first}, " in res.stdout
    assert "verified 1 shards: checksums and sample counts match" in res.stdout


def test_backends_refuse_the_other_format(beton, photo_folder, tmp_path):
    with pytest.raises(ManifestError, match="'beton' format.*use backend ffcv"):
        build_loader(_cfg(beton, backend="cpu"), 0, 1)
    from pipeline.shards.writer import write_shards

    write_shards(str(photo_folder), str(tmp_path / "tar"), ShardWriterConfig())
    with pytest.raises(ManifestError, match="'tar' format"):
        build_loader(_cfg(str(tmp_path / "tar")), 0, 1)


@pytest.mark.integration
def test_beton_on_s3_is_staged_to_the_cache_and_checked(photo_folder, s3_env, tmp_path):
    s3_env.create_bucket("beton")
    write_beton(str(photo_folder), "s3://beton/ds", ShardWriterConfig(workers=2), BetonOptions(workers=2))
    storage = StorageConfig(cache_dir=str(tmp_path / "cache"))
    loader = build_loader(_cfg("s3://beton/ds", storage=storage, plan=PlanConfig(seed=3)), 0, 1)
    assert sorted(_ids(loader)) == list(range(45))
    staged = list((tmp_path / "cache").glob("*"))
    assert any(p.stat().st_size == loader.manifest.shards[0].bytes for p in staged)


def test_a_hung_ffcv_writer_is_killed_with_a_clear_error(tmp_path):
    """FFCV's writer waits forever when a worker dies on a bad image; the watchdog
    must not. (Staging built by hand, bypassing validation, to make a worker die.)"""
    samples = [(f"{n:06d}", {"jpg": jpeg_bytes((96, 80), seed=n), "cls": b"1"}) for n in range(40)]
    samples[20] = ("000020", {"jpg": jpeg_bytes((96, 80), seed=20)[:300], "cls": b"1"})
    write_raw_shards(tmp_path / "staging", [samples])
    out = tmp_path / "out.beton"
    start = time.monotonic()
    with pytest.raises(BetonWriteError, match="made no progress for 4 s") as e:
        run_ffcv_writer(str(tmp_path / "staging"), str(out), BetonOptions(stall_timeout_s=4, workers=2), 40)
    assert time.monotonic() - start < 60
    assert "truncated" in str(e.value)  # the worker's own error is shown
    assert not os.path.exists(out)  # no partial file left


def test_a_kept_staging_folder_makes_a_rerun_skip_validation(photo_folder, tmp_path):
    opts = BetonOptions(workers=2, staging_dir=str(tmp_path / "staging"))
    first = write_beton(str(photo_folder), str(tmp_path / "a"), ShardWriterConfig(shard_bytes=400_000), opts)
    again = write_beton(str(photo_folder), str(tmp_path / "b"), ShardWriterConfig(shard_bytes=400_000), opts)
    assert first.written == len(list((tmp_path / "staging").glob("*.tar"))) > 1 and first.skipped_existing == 0
    assert again.written == 0 and again.skipped_existing == first.written
    assert open(tmp_path / "a" / KEYS_NAME).read() == open(tmp_path / "b" / KEYS_NAME).read()
