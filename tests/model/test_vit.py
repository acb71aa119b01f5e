import math

import pytest
import torch

from model.vit import Attention, Block, resize_pos_embed, sincos_pos_embed_1d, sincos_pos_embed_2d


def test_sincos_1d_matches_hand_computation():
    emb = sincos_pos_embed_1d(8, torch.tensor([0.0, 3.0]))
    # frequencies 1/10000^(i/4), i = 0..3; layout [sin(4) | cos(4)]
    freqs = [1.0, 10000 ** -0.25, 10000 ** -0.5, 10000 ** -0.75]
    expected = [math.sin(3 * f) for f in freqs] + [math.cos(3 * f) for f in freqs]
    torch.testing.assert_close(emb[1], torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4, dtype=torch.float64))


def test_sincos_2d_structure_and_official_axis_layout():
    dim, grid = 16, 4
    emb = sincos_pos_embed_2d(dim, grid, cls_token=True)
    assert emb.shape == (1 + grid * grid, dim)
    assert torch.count_nonzero(emb[0]) == 0  # cls row zero
    patches = emb[1:].double()
    q = dim // 4
    for half in (0, 1):  # each half is [sin(q) | cos(q)] of one axis
        s = patches[:, half * 2 * q: half * 2 * q + q]
        c = patches[:, half * 2 * q + q: (half + 1) * 2 * q]
        torch.testing.assert_close(s**2 + c**2, torch.ones_like(s), atol=1e-6, rtol=0)
    # patch p = row*grid + col: first half encodes the column, second half the row
    row, col = 1, 2
    p = patches[row * grid + col]
    assert p[0].item() == pytest.approx(math.sin(col), abs=1e-6)
    assert p[q].item() == pytest.approx(math.cos(col), abs=1e-6)
    assert p[2 * q].item() == pytest.approx(math.sin(row), abs=1e-6)
    assert p[3 * q].item() == pytest.approx(math.cos(row), abs=1e-6)


def test_a_model_built_on_the_meta_device_has_no_values_and_the_real_layout():
    from model.registry import create_model

    with torch.device("meta"):
        meta = create_model("mae_vit_test_patch4")
        assert sincos_pos_embed_2d(16, 4).is_meta  # the default device's, though computed on the CPU
    real = create_model("mae_vit_test_patch4")
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    assert [(k, t.shape) for k, t in meta.state_dict().items()] == [(k, t.shape) for k, t in real.state_dict().items()]


def test_resize_pos_embed_keeps_cls_and_is_identity_on_same_grid():
    pe = sincos_pos_embed_2d(32, 14)[None]
    assert resize_pos_embed(pe, 14) is pe
    big = resize_pos_embed(pe, 28)
    assert big.shape == (1, 1 + 28 * 28, 32)
    torch.testing.assert_close(big[:, 0], pe[:, 0])
    # bicubic upsampling of a smooth field stays close to the exact embedding
    exact = sincos_pos_embed_2d(32, 28)[None]
    assert (big[:, 1:] - exact[:, 1:]).abs().mean() < 0.5


def test_attention_matches_explicit_softmax_attention():
    attn = Attention(dim=32, num_heads=4)
    x = torch.randn(2, 5, 32)
    qkv = attn.qkv(x).reshape(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_block_is_pre_norm_residual():
    blk = Block(dim=16, num_heads=2)
    x = torch.randn(3, 7, 16)
    h = x + blk.attn(blk.norm1(x))
    torch.testing.assert_close(blk(x), h + blk.mlp(blk.norm2(h)))
    assert blk.norm1.eps == 1e-6 and blk.attn.qkv.bias is not None


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        Attention(dim=30, num_heads=4)


def test_block_compiles_without_graph_breaks():
    blk = Block(dim=32, num_heads=4)
    explanation = torch._dynamo.explain(blk)(torch.randn(2, 9, 32))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
