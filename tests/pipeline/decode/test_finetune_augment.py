"""The fine-tuning augmentations inside the backends: RandAugment and random erasing
from the plan's per-sample RNG (the same pixels on cpu and dali, exact on resume),
and the evaluation crop (resize the shorter side to S / 0.875, centre crop S)."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.augment import AugmentConfig, Normalizer, erase_params, rand_augment_params
from pipeline.decode.crop import decode_crop_reference
from pipeline.erasing import random_erase
from pipeline.images import ImagePolicy
from pipeline.loader import LoaderConfig, build_loader
from pipeline.plan import PlanConfig
from pipeline.randaugment import rand_augment
from pipeline.shards.writer import ShardWriterConfig, write_shards

FINETUNE = AugmentConfig(img_size=48, scale=(0.08, 1.0), rand_augment_layers=2, erase_prob=0.25)


@pytest.fixture(scope="module")
def ds(photo_folder, tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("ft-shards")
    write_shards(str(photo_folder), str(dest), ShardWriterConfig(shard_bytes=300_000))
    return str(dest)


def _batches(url, backend="cpu", augment=FINETUNE, normalize=True, epoch=1, **kw):
    loader = build_loader(LoaderConfig(url=url, backend=backend, batch_size=8, num_workers=1, augment=augment,
                                       normalize=normalize, plan=PlanConfig(window_shards=2, seed=3), **kw), 0, 1)
    loader.set_epoch(epoch)
    return loader, list(loader)


@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_each_backend_applies_the_samples_own_rand_augment_and_erasing(ds, backend):
    """The backend's output is exactly: its plain crops, then RandAugment with the
    sample's parameters, normalization, then erasing with the sample's box."""
    plain = AugmentConfig(img_size=48, scale=(0.08, 1.0))
    _, raw = _batches(ds, backend, plain, normalize=False)
    _, got = _batches(ds, backend)
    norm = Normalizer()
    changed = 0
    for r, g in zip(raw, got):
        assert torch.equal(r.sample_ids, g.sample_ids)
        ids = g.sample_ids.tolist()
        expected = rand_augment(r.images, rand_augment_params(FINETUNE, 3, 1, ids), FINETUNE.fill)
        expected = random_erase(norm(expected), erase_params(FINETUNE, 3, 1, ids))
        assert torch.equal(g.images, expected)
        changed += (expected != norm(r.images)).flatten(1).any(1).sum().item()
    assert changed > 0.6 * sum(len(g.keys) for g in got)  # most samples were augmented


def test_cpu_and_dali_augment_alike(ds):
    _, cpu = _batches(ds, "cpu")
    _, dali = _batches(ds, "dali")
    for c, d in zip(cpu, dali):
        assert c.keys == d.keys
        # same ops and arguments on crops that differ by JPEG decoder and resize kernel
        assert (c.images - d.images).abs().mean() < 0.25
        boxes = erase_params(FINETUNE, 3, 1, c.sample_ids.tolist())
        for i, (top, left, h, w, _) in enumerate(boxes.tolist()):
            if h:  # the noise is a hash of the sample's seed: identical on both backends
                assert torch.equal(c.images[i, :, top:top + h, left:left + w], d.images[i, :, top:top + h, left:left + w])


def test_resume_mid_epoch_reproduces_the_augmented_pixels(ds):
    full, f_batches = _batches(ds)
    first = build_loader(full.config, 0, 1)
    first.set_epoch(1)
    it = iter(first)
    head = [next(it) for _ in range(2)]
    state = first.state_dict()
    it.close()
    resumed = build_loader(full.config, 0, 1)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert torch.equal(torch.cat([b.images for b in head + rest]), torch.cat([b.images for b in f_batches]))
    _, other_epoch = _batches(ds, epoch=2)
    assert not torch.equal(other_epoch[0].images, f_batches[0].images)


def test_eval_crop_is_resize_then_centre_crop(photo_folder):
    """crop_fraction 0.875 at 224: the pixels of "resize the shorter side to 256, crop
    the centre 224 x 224" (the official eval transform), here as PIL's reference decode
    (the fast path is held to the reference by test_cpu); the whole shorter side is
    another crop."""
    policy = ImagePolicy()
    eval_aug = AugmentConfig(img_size=224, deterministic=True, crop_fraction=0.875)
    whole_aug = AugmentConfig(img_size=224, deterministic=True)
    diffs, whole = [], []
    for path in sorted(photo_folder.rglob("*.jpg"))[:12]:
        ours, _ = decode_crop_reference(path.read_bytes(), policy, eval_aug, np.random.default_rng(0))
        src = Image.open(path).convert("RGB")
        w, h = src.size
        size = (256, round(h * 256 / w)) if w < h else (round(w * 256 / h), 256)
        top, left = (size[1] - 224) // 2, (size[0] - 224) // 2
        ref = np.asarray(src.resize(size, Image.BICUBIC)).astype(int)[top:top + 224, left:left + 224]
        diffs.append(np.abs(ours.astype(int) - ref).mean())
        other, _ = decode_crop_reference(path.read_bytes(), policy, whole_aug, np.random.default_rng(0))
        whole.append(np.abs(other.astype(int) - ref).mean())
    # resize-then-crop floors the crop's offset (here up to 1 source pixel off centre);
    # on these textured photos a pixel's shift is ~5 levels, the whole side ~25
    assert np.mean(diffs) < 7.0 and max(diffs) < 12.0, diffs
    assert np.mean(whole) > 3 * np.mean(diffs)


def test_erasing_needs_normalized_images():
    from infra.options import OptionError

    with pytest.raises(OptionError, match="normalize"):
        LoaderConfig(normalize=False, augment=AugmentConfig(erase_prob=0.25))
