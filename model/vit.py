"""Vision Transformer building blocks for MAE.

Parameter names follow the official MAE release (which used timm's ViT), so its
checkpoints load with strict key checking:
``patch_embed.proj``, ``blocks.N.norm1|attn.qkv|attn.proj|norm2|mlp.fc1|mlp.fc2``.

Attention uses ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
on GPU, a fused CPU kernel otherwise). Nothing here branches on data, so a block
compiles with ``torch.compile`` as a single graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LAYER_NORM_EPS = 1e-6


class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided convolution.

    (B, C, H, W) -> (B, L, D) with L = (H / p) * (W / p).
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, L, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (bias on, as in MAE)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, N, hd)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hd)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) on a residual branch, per sample.

    Training: each sample's branch is zeroed with probability ``p`` and the kept
    ones are scaled by 1 / (1 - p), so the expectation is unchanged. Eval: the
    identity. Draws from the global torch RNG (checkpointed with the run).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    ``drop_path`` > 0 (fine-tuning) adds stochastic depth to both branches; it has
    no parameters, so the state-dict keys are the same either way.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpointing: bool = False) -> torch.Tensor:
    """Apply ``blocks`` in order; with ``grad_checkpointing`` (and grad enabled) each
    block's activations are recomputed in backward instead of kept."""
    for blk in blocks:
        x = checkpoint(blk, x, use_reentrant=False) if grad_checkpointing and torch.is_grad_enabled() else blk(x)
    return x


def with_cls_token(x: torch.Tensor, cls_token: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
    """Prepend the cls token (plus its position embedding, row 0): (N, T, D) -> (N, 1 + T, D)."""
    cls = (cls_token + pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1)


def init_linear_and_norm(m: nn.Module) -> None:
    """The official release's init, applied module by module: xavier-uniform Linear
    weights, zero biases, unit LayerNorm."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def sincos_pos_embed_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Fixed 1-D sin-cos embedding: (M,) positions -> (M, dim) as [sin | cos].

    Frequencies are 1 / 10000^(i / (dim/2)) for i in [0, dim/2).
    """
    if dim % 2 != 0:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    exponents = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    inv_freq = 1.0 / (10000.0**exponents)  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, laid out as the official MAE release.

    Patch p = row * grid_size + col gets ``[emb_1d(col) | emb_1d(row)]``: the first
    half of the channels encodes the column (width) coordinate, the second half the
    row. With ``cls_token`` a zero row is prepended. Returns (1 + L, dim) float32 on
    the default device; computed on the CPU (on the meta device, e.g. to count a
    model's parameters, each op would run through torch's slow decompositions).
    """
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding dim must be divisible by 4, got {dim}")
    rows = torch.arange(grid_size, device="cpu").repeat_interleave(grid_size)  # (L,) row of patch p
    cols = torch.arange(grid_size, device="cpu").repeat(grid_size)  # (L,) column of patch p
    emb = torch.cat([sincos_pos_embed_1d(dim // 2, cols), sincos_pos_embed_1d(dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype, device="cpu"), emb], dim=0)
    return emb.float().to(torch.get_default_device())


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubically resize a (1, prefix + g*g, D) position embedding to another grid.

    Used when loading a checkpoint trained at one resolution into a model built for
    another (fine-tuning at 448 from a 224 pretrain). Prefix tokens (cls) are kept.
    """
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(grid_tokens.shape[1])
    if old_grid * old_grid != grid_tokens.shape[1]:
        raise ValueError(f"position embedding has {grid_tokens.shape[1]} grid tokens, not a square grid")
    if old_grid == new_grid:
        return pos_embed
    dim = grid_tokens.shape[-1]
    grid = grid_tokens.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
