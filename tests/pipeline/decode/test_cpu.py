import io
import json
import logging

import numpy as np
import pytest
import torch
from tests.helpers.shards import flip_a_byte, jpeg_bytes, numbered_shards, write_raw_shards
from PIL import Image

from pipeline.augment import AugmentConfig, random_resized_crop_box, sample_rng
from pipeline.decode.crop import decode_crop, decode_crop_reference
from pipeline.images import ImagePolicy
from pipeline.errors import CorruptDataError, ResumeStateError, ShardFetchError
from pipeline.loader import Loader, LoaderConfig, build_loader
from pipeline.plan import PlanConfig

SIZES = [10, 7, 12, 9]  # 38 samples


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("numbered")
    numbered_shards(root, SIZES, image_size=(96, 72))
    return str(root)


def _cfg(url, **kw) -> LoaderConfig:
    aug = kw.pop("augment", AugmentConfig(img_size=32))
    plan = kw.pop("plan", PlanConfig(window_shards=2))
    return LoaderConfig(url=url, batch_size=kw.pop("batch_size", 4), num_workers=kw.pop("num_workers", 0),
                        augment=aug, plan=plan, **kw)


def _drain(loader) -> tuple[list[int], torch.Tensor]:
    ids, images = [], []
    for b in loader:
        ids += b.sample_ids.tolist()
        images.append(b.images)
        assert b.labels.tolist() == b.sample_ids.tolist()  # label = global index in these shards
    return ids, torch.cat(images)


def test_batch_contract_and_every_sample_once(ds):
    loader = build_loader(_cfg(ds, batch_size=5), 0, 1)
    assert isinstance(loader, Loader)
    assert len(loader) == 8  # ceil(38 / 5)
    batch = next(iter(loader))
    assert batch.images.shape == (5, 3, 32, 32) and batch.images.dtype == torch.float32
    assert batch.labels.dtype == torch.int64 and len(batch.keys) == 5
    assert batch.keys[0].startswith("shard-0000") and "/" in batch.keys[0]
    ids, images = _drain(build_loader(_cfg(ds, batch_size=5), 0, 1))
    assert sorted(ids) == list(range(38))
    # normalized with ImageNet statistics: roughly centred, unit-ish spread
    assert -1.5 < images.mean().item() < 1.5 and 0.3 < images.std().item() < 2.0


@pytest.mark.parametrize("workers", [1, 3])
def test_worker_count_does_not_change_order_or_pixels(ds, workers):
    ref_ids, ref_images = _drain(build_loader(_cfg(ds), 0, 1))
    ids, images = _drain(build_loader(_cfg(ds, num_workers=workers), 0, 1))
    assert ids == ref_ids
    assert torch.equal(images, ref_images)


def test_workers_are_forked_even_where_the_default_start_method_is_spawn(ds):
    """A library (LitData does on import of its optimizer) may set 'spawn' process-wide."""
    import multiprocessing

    ref_ids, ref_images = _drain(build_loader(_cfg(ds), 0, 1))
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        ids, images = _drain(build_loader(_cfg(ds, num_workers=2), 0, 1))
    finally:
        multiprocessing.set_start_method(before, force=True)
    assert ids == ref_ids and torch.equal(images, ref_images)


_FREEZE_PROBE = """
import gc, json, os, sys, weakref, torch
import pipeline.mixture as mixture
from pipeline.loader import LoaderConfig, build_loader

seen = {"manifest": [], "fork": []}
read = mixture.DataSources.__init__
def probed(self, *a, **k):
    seen["manifest"].append(gc.get_freeze_count())
    read(self, *a, **k)
mixture.DataSources.__init__ = probed
os.register_at_fork(before=lambda: seen["fork"].append(gc.get_freeze_count()))

class Held:  # a big object in a reference cycle, alive when the loader is built
    def __init__(self):
        self.me, self.data = self, bytearray(50 * 2**20)
held = Held()
gone = weakref.ref(held)
alive = len(gc.get_objects())
if sys.argv[2] == "program-froze":
    gc.freeze()
program = gc.get_freeze_count()
loader = build_loader(LoaderConfig(url=sys.argv[1], batch_size=4, num_workers=2), 0, 1)
after_build = gc.get_freeze_count()
batches = iter(loader)
next(batches)
after_first = gc.get_freeze_count()
n = 4 + sum(len(b.sample_ids) for b in batches)
del held
gc.collect()
print(json.dumps({"program": program, "alive": alive, "seen": seen, "after_build": after_build,
                  "after_first": after_first, "n": n, "collected": gone() is None}))
"""


@pytest.mark.parametrize("program", ["plain", "program-froze"])
def test_the_loader_freezes_the_start_up_objects_only_while_it_starts(ds, program):
    """In a fresh process: the objects alive when a loader starts (torch's alone are
    ~200,000) are out of the collector's reach while it reads the manifest and
    while its workers fork (this epoch's, and the next one's, started early), so the first full collection does not walk them then;
    they are given back afterwards, so a big object in a cycle that dies later is
    still collected. A program that froze objects itself keeps them frozen."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FREEZE_PROBE, ds, program], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["alive"] > 100_000 and r["n"] == sum(SIZES)
    assert r["collected"] == (program == "plain")  # what the program froze itself stays frozen, and uncollected
    # one manifest read; two workers, and two more for the next epoch, started early: all forked frozen
    assert len(r["seen"]["manifest"]) == 1 and len(r["seen"]["fork"]) == 4
    if program == "plain":
        assert r["program"] == 0
        assert all(count >= r["alive"] for count in r["seen"]["manifest"] + r["seen"]["fork"])
        assert r["after_build"] == 0 and r["after_first"] == 0
    else:
        assert r["program"] >= r["alive"]
        counts = r["seen"]["manifest"] + r["seen"]["fork"] + [r["after_build"], r["after_first"]]
        assert all(0.9 * r["program"] < count <= r["program"] for count in counts)  # frozen objects may be freed


_HEAP_PROBE = """
import ctypes, resource, sys
from pipeline.decode.base import fix_malloc_thresholds
if sys.argv[1] == "loader":
    assert fix_malloc_thresholds()
else:  # the mmap threshold pinned alone, as loaders did before
    ctypes.CDLL("libc.so.6").mallopt(-3, 4 * 2**20)
def shard():  # a shard's worth of received chunks, held, then freed
    held = [b"x" * 262144 for _ in range(64)]
    del held
shard()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    shard()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def test_the_loaders_heap_keeps_a_freed_shard_of_chunks_for_the_next():
    """Pinning glibc's mmap threshold pins its trim threshold at 128 KiB: each freed
    shard of ~256 KiB chunks went back to the kernel and faulted in again (4,000
    faults per 16 MiB). The loaders' settings keep it."""
    import subprocess
    import sys

    faults = {}
    for settings in ("loader", "mmap-only"):
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, settings], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        faults[settings] = float(out.stdout.strip().splitlines()[-1])
    assert faults["loader"] < 10 and faults["mmap-only"] > 1000, faults


def test_a_sigterm_while_the_workers_start_is_deferred_not_fatal(ds, monkeypatch):
    """A preemption's TERM reaches every process of a job, a worker that is just
    starting too (each epoch forks new ones): it must wait for the worker's handler,
    not kill the worker — before, torch's own handler did, and the trainer failed
    with 'DataLoader worker ... killed by signal' instead of saving."""
    import os
    import signal

    from pipeline.decode import cpu

    real = cpu._defer_stop_signals

    def terminated_while_starting(worker_id: int) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # after torch's worker handlers are set, before ours
        real(worker_id)

    monkeypatch.setattr(cpu, "_defer_stop_signals", terminated_while_starting)
    want, pixels = _drain(build_loader(_cfg(ds), 0, 1))
    got, got_pixels = _drain(build_loader(_cfg(ds, num_workers=2), 0, 1))
    assert got == want and torch.equal(got_pixels, pixels)


def test_a_workers_batch_is_one_channels_last_uint8_buffer(ds):
    batch = next(iter(build_loader(_cfg(ds, num_workers=1, normalize=False), 0, 1)))
    images = batch.images
    assert images.dtype == torch.uint8 and images.shape[1] == 3
    assert images.is_contiguous(memory_format=torch.channels_last)  # one copy per crop, no transposing stack
    reference = next(iter(build_loader(_cfg(ds, normalize=False), 0, 1))).images
    assert torch.equal(images, reference)


def test_ranks_partition_the_epoch(ds):
    parts = [_drain(build_loader(_cfg(ds, plan=PlanConfig(uneven="drop")), r, 3))[0] for r in range(3)]
    assert len({len(p) for p in parts}) == 1
    flat = sum(parts, [])
    assert len(flat) == len(set(flat)) == 38 // 3 * 3


def test_epochs_reshuffle_and_set_epoch_is_deterministic(ds):
    loader = build_loader(_cfg(ds), 0, 1)
    e0, _ = _drain(loader)
    e1, _ = _drain(loader)  # the loader moved to epoch 1 by itself
    assert sorted(e0) == sorted(e1) and e0 != e1
    other = build_loader(_cfg(ds), 0, 1)
    other.set_epoch(1)
    assert _drain(other)[0] == e1


def test_exact_mid_epoch_resume(ds):
    ref_ids, ref_images = _drain(build_loader(_cfg(ds, num_workers=2), 0, 1))
    loader = build_loader(_cfg(ds, num_workers=2), 0, 1)
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    state = loader.state_dict()
    del it
    resumed = build_loader(_cfg(ds, num_workers=1), 0, 1)  # worker count may change
    resumed.load_state_dict(state)
    assert len(resumed) == 10 - 3
    ids, images = _drain(resumed)
    done = sum(len(b.keys) for b in first)
    assert ids == ref_ids[done:]
    assert torch.equal(images, ref_images[done:])


def test_elastic_resume_covers_the_rest_exactly_once(ds):
    consumed = []
    states = []
    for r in range(2):
        loader = build_loader(_cfg(ds), r, 2)
        it = iter(loader)
        for _ in range(2):
            consumed += next(it).sample_ids.tolist()
        states.append(loader.state_dict())
    assert states[0] == states[1]
    rest = []
    for r in range(3):
        loader = build_loader(_cfg(ds), r, 3)
        loader.load_state_dict(states[0])
        rest += _drain(loader)[0]
    assert not set(consumed) & set(rest)
    assert set(consumed) | set(rest) == set(range(38))
    assert len(rest) - len(set(rest)) < 3  # pad only


def test_resume_state_for_another_dataset_or_order_is_refused(ds, tmp_path):
    loader = build_loader(_cfg(ds), 0, 1)
    state = loader.state_dict()
    numbered_shards(tmp_path / "other", [5, 5])
    with pytest.raises(ResumeStateError, match="another dataset"):
        build_loader(_cfg(str(tmp_path / "other")), 0, 1).load_state_dict(state)
    with pytest.raises(ResumeStateError, match="plan.seed"):
        build_loader(_cfg(ds, plan=PlanConfig(window_shards=2, seed=9)), 0, 1).load_state_dict(state)


def _png16() -> bytes:
    arr = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


CORRUPT = {
    "truncated": lambda: jpeg_bytes((96, 72), seed=99)[:300],
    "empty": lambda: b"",
    "not_an_image": lambda: b"<html>403 Forbidden</html>" * 10,
    "cmyk": lambda: jpeg_bytes((96, 72), mode="CMYK"),
    "grayscale": lambda: jpeg_bytes((96, 72), mode="L"),
    "16bit": _png16,
    "decompression_bomb": lambda: jpeg_bytes((400, 300)),
}


@pytest.fixture
def corrupt_ds(tmp_path) -> str:
    """One shard: good images with each corrupt kind in between (labels = order)."""
    samples = []
    for n, (reason, make) in enumerate(CORRUPT.items()):
        samples.append((f"{2 * n:03d}_good", {"jpg": jpeg_bytes((96, 72), seed=n), "cls": str(2 * n).encode()}))
        ext = "png" if reason == "16bit" else "jpg"
        samples.append((f"{2 * n + 1:03d}_{reason}", {ext: make(), "cls": str(2 * n + 1).encode()}))
    write_raw_shards(tmp_path / "corrupt", [samples])
    return str(tmp_path / "corrupt")


def test_each_corrupt_kind_is_skipped_counted_and_named(corrupt_ds, caplog):
    policy = ImagePolicy(mode_policy="skip", max_pixels=100_000)
    loader = build_loader(_cfg(corrupt_ds, batch_size=3, max_corrupt_fraction=0.6, num_workers=2, images=policy,
                               plan=PlanConfig(shuffle=False)), 0, 1)
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        ids = [i for b in loader for i in b.sample_ids.tolist()]
    assert ids == list(range(0, 14, 2))  # every good sample, in plan order
    assert loader.stats.skipped == {reason: 1 for reason in CORRUPT}
    for reason in CORRUPT:
        assert any("shard-000000.tar/" in r.message and f"_{reason}: {reason}" in r.message for r in caplog.records)


@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_a_batch_of_only_corrupt_samples_keeps_the_ranks_in_step(tmp_path, backend):
    """Rank 0's second batch is all corrupt. It was dropped, so rank 0 ended each epoch
    a batch early: on two ranks stepping together, rank 0 read epochs 0,0,1,1,2 while
    rank 1 read 0,1,2,3,4. Now it is yielded empty, and both ranks yield as many
    batches an epoch."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    samples = [(f"{n:06d}", {"jpg": b"garbage" * 10 if 4 <= n < 8 else jpeg_bytes((48, 40), seed=n),
                             "cls": str(n % 2).encode()}) for n in range(32)]
    write_raw_shards(tmp_path / "ds", [samples[i:i + 8] for i in range(0, 32, 8)], classes=["a", "b"])
    cfg = LoaderConfig(url=str(tmp_path / "ds"), batch_size=4, num_workers=0, backend=backend,
                       max_corrupt_fraction=0.5, plan=PlanConfig(shuffle=False), augment=AugmentConfig(img_size=32))
    per_rank = []
    for rank in (0, 1):
        loader = build_loader(cfg, rank, 2)
        per_rank.append([[len(b.keys) for b in loader] for _ in range(3)])
        assert loader.epoch == 3 and loader.stats.skipped["not_an_image"] == (12 if rank == 0 else 0)
    assert per_rank[0] == [[4, 0, 4, 4]] * 3
    assert per_rank[1] == [[4, 4, 4, 4]] * 3


def test_convert_policy_keeps_mode_outliers(corrupt_ds):
    loader = build_loader(_cfg(corrupt_ds, batch_size=3, max_corrupt_fraction=0.6, plan=PlanConfig(shuffle=False),
                               images=ImagePolicy(max_pixels=100_000)), 0, 1)
    ids = [i for b in loader for i in b.sample_ids.tolist()]
    kept = {1 + 2 * list(CORRUPT).index(r) for r in ("cmyk", "grayscale", "16bit")}
    assert ids == sorted(set(range(0, 14, 2)) | kept)
    assert loader.stats.converted == {"cmyk": 1, "grayscale": 1, "16bit": 1}
    assert set(loader.stats.skipped) == {"truncated", "empty", "not_an_image", "decompression_bomb"}


def test_too_many_corrupt_samples_stop_with_a_clear_error(corrupt_ds):
    loader = build_loader(_cfg(corrupt_ds, batch_size=3, max_corrupt_fraction=0.1, plan=PlanConfig(shuffle=False)), 0, 1)
    with pytest.raises(CorruptDataError, match=r"corrupt samples on rank 0 this epoch exceed max_corrupt_fraction=0.1"):
        list(loader)


def test_fast_path_matches_the_reference_decoder(photo_folder):
    aug = AugmentConfig(img_size=224)
    policy = ImagePolicy()
    diffs = []
    for n, path in enumerate(sorted(photo_folder.rglob("*.jpg"))[:12]):
        data = path.read_bytes()
        fast, _ = decode_crop(data, policy, aug, sample_rng(0, 0, n))
        ref, _ = decode_crop_reference(data, policy, aug, sample_rng(0, 0, n))
        assert fast.shape == ref.shape == (224, 224, 3) and fast.dtype == np.uint8
        diffs.append(np.abs(fast.astype(int) - ref.astype(int)).mean())
    # different JPEG IDCT and resampling kernels: small, bounded differences
    assert np.mean(diffs) < 4.0 and max(diffs) < 8.0


def test_crop_statistics_follow_the_recipe():
    rng = np.random.default_rng(0)
    areas, aspects = [], []
    for _ in range(4000):
        x, y, w, h = random_resized_crop_box(500, 375, rng, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= x and x + w <= 500 and 0 <= y and y + h <= 375
        areas.append(w * h / (500 * 375))
        aspects.append(w / h)
    assert min(areas) >= 0.19 and max(areas) <= 1.0
    assert min(aspects) >= 0.74 and max(aspects) <= 1.34
    assert 0.45 < np.mean(areas) < 0.65


def test_the_clamped_sampler_draws_once_and_clamps_as_the_official_linear_probe():
    """On a 500x250 image with areas 0.6-1 of it, most draws do not fit: torchvision
    draws again and then falls back to the centred whole-height crop; the official
    probe's sampler keeps the one draw, each side clamped to the image, at a random
    place (an area then below the range is its signature)."""
    scale, ratio = (0.6, 1.0), (3 / 4, 4 / 3)
    retry = [random_resized_crop_box(500, 250, np.random.default_rng(i), scale, ratio) for i in range(2000)]
    clamped = [random_resized_crop_box(500, 250, np.random.default_rng(i), scale, ratio, "clamped")
               for i in range(2000)]
    assert all(0 <= x and x + w <= 500 and 0 <= y and y + h <= 250 and w >= 1 and h >= 1 for x, y, w, h in clamped)
    centred_fallback = (500 - 333) // 2, 0, 333, 250  # torchvision: the widest crop the ratio allows, centred
    assert retry.count(centred_fallback) > 200 and centred_fallback not in clamped
    assert sum(h == 250 for _, _, _, h in clamped) > 1000  # the height clamped, the width as drawn
    smallest = {name: min(w * h for _, _, w, h in boxes) / (500 * 250) for name, boxes in (("retry", retry),
                                                                                         ("clamped", clamped))}
    assert smallest["clamped"] < 0.55 and smallest["retry"] >= 0.59  # the range, up to rounding of the sides
    assert len({x for x, _, _, _ in clamped}) > 100  # placed at random, not centred
    # one draw of area, one of aspect, two of place: the first two as torchvision's first try
    x, y, w, h = random_resized_crop_box(500, 250, np.random.default_rng(7), scale, ratio, "clamped")
    rng = np.random.default_rng(7)
    area, aspect = 500 * 250 * rng.uniform(*scale), np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    assert (w, h) == (min(500, round(np.sqrt(area * aspect))), min(250, round(np.sqrt(area / aspect))))


def test_the_clamped_sampler_is_refused_where_a_backend_draws_its_own_crops():
    from pipeline.loader import DaliOptions

    clamped = AugmentConfig(crop_sampler="clamped")
    assert LoaderConfig(backend="dali", augment=clamped).augment.crop_sampler == "clamped"  # data.dali.crop=plan
    for backend, dali in (("ffcv", DaliOptions()), ("dali", DaliOptions(crop="random"))):
        with pytest.raises(ValueError, match="augment.crop_sampler 'clamped' needs the cpu backend or dali with "
                                             "data.dali.crop=plan"):
            LoaderConfig(backend=backend, augment=clamped, dali=dali)


def test_flip_rate_is_about_half(ds):
    from pipeline.augment import crop_and_flip

    flips = [crop_and_flip(96, 72, AugmentConfig(), sample_rng(0, 0, i))[1] for i in range(2000)]
    assert 0.46 < np.mean(flips) < 0.54


def test_unknown_backend_lists_valid_ones(ds):
    with pytest.raises(ValueError, match="backend must be one of cpu, dali, ffcv, synthetic; got 'nvjpeg'"):
        _cfg(ds, backend="nvjpeg")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_data_error_in_a_worker_reaches_the_caller_as_it_was_raised(tmp_path, workers):
    """A corrupt shard read in a DataLoader worker: the same error type and one-line
    message as without workers, not torch's re-raise with the worker's traceback."""
    manifest = numbered_shards(tmp_path / "ds", [4, 4, 4])
    flip_a_byte(tmp_path / "ds" / manifest.shards[1].name)
    with pytest.raises(ShardFetchError) as caught:
        _drain(build_loader(_cfg(str(tmp_path / "ds"), num_workers=workers, plan=PlanConfig(shuffle=False)), 0, 1))
    message = str(caught.value)
    assert message.startswith(f"shard {manifest.shards[1].name} at ") and "checksum mismatch" in message
    assert "\n" not in message and "Traceback" not in message and "Caught" not in message
