"""Mixup/cutmix on the device: soft targets sum to 1 and equal the mixed pixel
fractions; seeded by the batch (resumable); label smoothing; and LARS's step."""

import math

import pytest
import torch

from train.eval.lars import LARS
from train.eval.mixup import MixupConfig, mix_batch, smooth_one_hot, soft_cross_entropy


def _constant_images(n: int, size: int = 16) -> torch.Tensor:
    """Sample i is the constant i + 1: every pixel says which sample it came from."""
    return (torch.arange(n, dtype=torch.float32) + 1).view(n, 1, 1, 1).expand(n, 3, size, size).clone()


@pytest.mark.parametrize("first_id", range(0, 400, 8))
def test_targets_sum_to_one_and_match_the_mixed_pixel_fraction(first_id):
    n = 8
    images, labels = _constant_images(n), torch.arange(n)  # class i = sample i
    ids = torch.arange(first_id, first_id + n)
    cfg = MixupConfig(label_smoothing=0.0)
    mixed, targets, mix = mix_batch(cfg, images, labels, n, seed=3, epoch=1, sample_ids=ids)
    assert torch.allclose(targets.sum(1), torch.ones(n))
    partner = torch.arange(n).flip(0)
    if mix.box is None:  # mixup: every pixel is lam * own + (1 - lam) * partner's
        expected = mix.lam * (torch.arange(n) + 1) + (1 - mix.lam) * (partner + 1)
        assert torch.allclose(mixed[:, 0, 0, 0], expected.float())
        own = torch.full((n,), mix.lam)
    else:  # cutmix: the pasted box's share of the pixels is the partner's weight
        own = (mixed == images).float().mean(dim=(1, 2, 3))
        top, bottom, left, right = mix.box
        assert own[0].item() == pytest.approx(1 - (bottom - top) * (right - left) / 256)
        assert mix.lam == pytest.approx(own[0].item())
    for i in range(n):
        if partner[i] != i:
            assert targets[i, i].item() == pytest.approx(own[i].item(), abs=1e-6)
            assert targets[i, partner[i]].item() == pytest.approx(1 - own[i].item(), abs=1e-6)


def test_both_kinds_occur_and_lambda_follows_its_beta():
    cfg = MixupConfig()
    kinds, lams = [], []
    for start in range(0, 8000, 8):
        _, _, mix = mix_batch(cfg, _constant_images(8, 8), torch.arange(8), 8, 0, 0, torch.arange(start, start + 8))
        kinds.append(mix.box is not None)
        if mix.box is None:
            lams.append(mix.lam)
    assert 0.45 < sum(kinds) / len(kinds) < 0.55  # switch probability 0.5
    lams = torch.tensor(lams)
    assert abs(lams.mean().item() - 0.5) < 0.03 and abs(lams.var().item() - 1 / (4 * (2 * 0.8 + 1))) < 0.01


def test_mixing_is_keyed_by_the_batch_so_a_resume_repeats_it():
    cfg = MixupConfig()
    images, labels, ids = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(40, 46)
    a = mix_batch(cfg, images, labels, 3, 7, 2, ids)
    torch.manual_seed(123)  # the global RNG plays no part
    b = mix_batch(cfg, images, labels, 3, 7, 2, ids)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    c = mix_batch(cfg, images, labels, 3, 7, 3, ids)  # another epoch
    assert c[2] != a[2]


def test_label_smoothing_and_no_mixing():
    t = smooth_one_hot(torch.tensor([2, 0]), 5, 0.1)
    assert torch.allclose(t[0], torch.tensor([0.02, 0.02, 0.92, 0.02, 0.02]))
    off = MixupConfig(prob=0.0, label_smoothing=0.0)
    images = torch.randn(4, 3, 8, 8)
    mixed, targets, mix = mix_batch(off, images, torch.tensor([1, 0, 1, 2]), 3, 0, 0, torch.arange(4))
    assert mixed is images and mix.lam == 1.0 and torch.equal(targets, torch.eye(3)[[1, 0, 1, 2]])
    logits = torch.randn(4, 3)
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0, 1, 2])).item(), abs=1e-6)


def test_lars_scales_matrix_steps_by_the_trust_ratio():
    w = torch.nn.Parameter(torch.full((2, 2), 3.0))
    b = torch.nn.Parameter(torch.zeros(2))
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.1}], lr=0.5, momentum=0.9)
    w.grad, b.grad = torch.full((2, 2), 4.0), torch.tensor([1.0, -1.0])
    opt.step()
    update = 4.0 + 0.1 * 3.0  # gradient plus weight decay, each entry
    trust = 0.001 * 6.0 / (2 * update)  # ||w|| = 6, ||update|| = 2 * 4.3
    assert torch.allclose(w, torch.full((2, 2), 3.0 - 0.5 * update * trust))
    assert torch.allclose(b, torch.tensor([-0.5, 0.5]))  # 1-D: plain momentum SGD, no decay
    b.grad = torch.tensor([1.0, -1.0])
    opt.step()
    assert torch.allclose(b, torch.tensor([-0.5 - 0.5 * 1.9, 0.5 + 0.5 * 1.9]))
    assert math.isclose(opt.state[b]["mu"][0].item(), 1.9, rel_tol=1e-6)
