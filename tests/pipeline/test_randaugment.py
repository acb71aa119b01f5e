"""RandAugment and random erasing as batched torch ops: each op against PIL's own
definition on a real photo, parameters from the plan's per-sample RNG (deterministic,
independent of batches), the recipe's distribution, erasing boxes and noise."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from infra.testing.photos import bundled_photos
from pipeline.augment import AugmentConfig, erase_params, rand_augment_params
from pipeline.erasing import hashed_normal, random_erase
from pipeline.randaugment import _OP_FUNCS, OPS, SKIP, draw_rand_augment, rand_augment

FILL = (124, 116, 104)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(bundled_photos()["astronaut"][100:164, 150:214]))


def _ours(img: Image.Image, op: str, arg: float) -> np.ndarray:
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]
    return _OP_FUNCS[op](x, torch.tensor([arg]), FILL)[0].permute(1, 2, 0).numpy().astype(int)


def _pil(img: Image.Image, op: str, a: float) -> Image.Image:
    affine = {"shear_x": (1, a, 0, 0, 1, 0), "shear_y": (1, 0, 0, a, 1, 0),
              "translate_x": (1, 0, a * img.size[0], 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, a * img.size[1])}
    if op in affine:
        return img.transform(img.size, Image.AFFINE, affine[op], resample=Image.BICUBIC, fillcolor=FILL)
    if op == "rotate":
        return img.rotate(a, resample=Image.BICUBIC, fillcolor=FILL)
    if op == "solarize_add":
        return img.point([min(255, i + int(a)) if i < 128 else i for i in range(256)] * 3)
    enhance = {"brightness": ImageEnhance.Brightness, "color": ImageEnhance.Color,
               "contrast": ImageEnhance.Contrast, "sharpness": ImageEnhance.Sharpness}
    if op in enhance:
        return enhance[op](img).enhance(a)
    return {"invert": lambda: ImageOps.invert(img), "posterize": lambda: ImageOps.posterize(img, int(a)),
            "solarize": lambda: ImageOps.solarize(img, a), "auto_contrast": lambda: ImageOps.autocontrast(img),
            "equalize": lambda: ImageOps.equalize(img)}[op]()


@pytest.mark.parametrize("op,arg", [("invert", 0), ("posterize", 1), ("posterize", 3), ("solarize", 30),
                                    ("solarize_add", 99), ("brightness", 0.3), ("brightness", 1.8), ("color", 0.2),
                                    ("color", 1.8), ("contrast", 0.2), ("contrast", 1.7), ("sharpness", 0.2),
                                    ("sharpness", 1.9), ("auto_contrast", 0), ("equalize", 0)])
def test_colour_ops_equal_pil_exactly(photo, op, arg):
    assert np.array_equal(_ours(photo, op, arg), np.asarray(_pil(photo, op, arg)))


@pytest.mark.parametrize("op,arg", [("rotate", 27), ("rotate", -15), ("shear_x", 0.27), ("shear_y", -0.27),
                                    ("translate_x", 0.4), ("translate_y", -0.4)])
def test_geometric_ops_match_pil_up_to_resampling(photo, op, arg):
    """Same direction and geometry as PIL; bicubic kernels and the fill boundary differ
    a little (a wrong sign or centre would differ by tens of levels on average)."""
    diff = np.abs(_ours(photo, op, arg) - np.asarray(_pil(photo, op, arg)).astype(int))
    flipped = np.abs(_ours(photo, op, -arg) - np.asarray(_pil(photo, op, arg)).astype(int))
    assert diff.mean() < 2.0 and (diff > 8).mean() < 0.06, (diff.mean(), (diff > 8).mean())
    assert flipped.mean() > 8 * diff.mean()


def test_params_follow_the_recipe_distribution():
    rng = np.random.default_rng(0)
    draws = np.stack([draw_rand_augment(rng, 2, 9.0, 0.5) for _ in range(6000)]).reshape(-1, 2)
    applied = draws[:, 0] != SKIP
    assert abs(applied.mean() - 0.5) < 0.02  # each op applied with probability 0.5
    counts = np.bincount(draws[applied, 0].astype(int), minlength=len(OPS))
    assert counts.min() > 0.7 * counts.mean()  # uniform over the 15 ops
    rot = draws[applied & (draws[:, 0] == OPS.index("rotate")), 1]
    assert abs(np.abs(rot).mean() - 27.0) < 0.5 and 0.4 < (rot < 0).mean() < 0.6  # 30 * 9/10, random sign
    assert np.abs(rot).max() <= 30.0
    bits = draws[applied & (draws[:, 0] == OPS.index("posterize")), 1]
    assert set(bits.tolist()) <= {0.0, 1.0, 2.0} and (bits == 1).mean() > 0.9  # 4 - int(m/10 * 4), m ~ N(9, .5)


def test_params_are_per_sample_and_independent_of_the_batch():
    aug = AugmentConfig(rand_augment_layers=2, erase_prob=0.25)
    both = rand_augment_params(aug, 7, 3, [10, 11, 12])
    assert torch.equal(both[1:], rand_augment_params(aug, 7, 3, [11, 12]))
    assert not torch.equal(both, rand_augment_params(aug, 7, 4, [10, 11, 12]))  # another epoch
    boxes = erase_params(aug, 7, 3, list(range(4000)))
    erased = boxes[:, 2] > 0
    assert abs(erased.float().mean().item() - 0.25) < 0.03
    area = (boxes[erased, 2] * boxes[erased, 3]).double() / 224**2
    assert 0.015 < area.min() and area.max() < 0.34 and abs(area.mean().item() - (0.02 + 1 / 3) / 2) < 0.02
    assert torch.equal(boxes[5:9], erase_params(aug, 7, 3, [5, 6, 7, 8]))


def test_rand_augment_applies_each_samples_ops(photo):
    x = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1)[None].repeat(3, 1, 1, 1)
    params = torch.tensor([[[OPS.index("invert"), 0], [SKIP, 0]],
                           [[SKIP, 0], [SKIP, 0]],
                           [[OPS.index("solarize"), 128], [OPS.index("invert"), 0]]], dtype=torch.float32)
    out = rand_augment(x, params, FILL)
    assert torch.equal(out[0], 255 - x[0]) and torch.equal(out[1], x[1])
    assert torch.equal(out[2], 255 - torch.where(x[2] >= 128, 255 - x[2], x[2]))
    assert torch.equal(x[1], torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1))  # input untouched


def test_erasing_fills_only_the_box_with_seeded_standard_noise():
    images = torch.zeros(3, 3, 40, 40)
    boxes = torch.tensor([[5, 7, 10, 20, 1234], [0, 0, 0, 0, 0], [0, 1, 39, 12, 99]])
    out = random_erase(images.clone(), boxes)
    assert (out[0, :, 5:15, 7:27] != 0).all() and out[0].ne(0).sum() == 3 * 10 * 20
    assert out[1].eq(0).all()
    again = random_erase(torch.zeros(1, 3, 40, 40), boxes[:1])
    assert torch.equal(again[0], out[0])  # the same seed gives the same noise, whatever the batch
    noise = hashed_normal(5, 200_000, torch.device("cpu"))
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01
    assert abs((noise.abs() < 1).float().mean().item() - math.erf(1 / math.sqrt(2))) < 0.005
    assert not torch.equal(noise[:1000], hashed_normal(6, 1000, torch.device("cpu")))
