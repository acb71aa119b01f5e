"""ViT image classifier: a pretrained MAE encoder fine-tuned or probed for classes.

As the official fine-tuning code (a timm ``VisionTransformer``): the encoder's patch
embedding, cls token, position embedding (learned from here on, starting from the
checkpoint's fixed sin-cos one) and blocks, with stochastic depth rising linearly
from 0 to ``drop_path`` over the blocks; then either the mean of the patch tokens
followed by ``fc_norm`` (``global_pool=True``, the fine-tuning recipe; the
pretrained ``norm`` is dropped) or the cls token after ``norm`` (the linear
probe's features); then the head: a Linear initialized N(0, 2e-5), or for the
linear probe BatchNorm without affine parameters before a Linear (std 0.01).

Parameter names are timm's ``VisionTransformer``'s, so this model's state dict is
a timm checkpoint. Layer-wise lr decay follows the official layer assignment:
cls/pos/patch embedding are layer 0, block i is layer i + 1, the rest (final norm,
head) is layer depth + 1; a parameter's lr scale is decay^(depth + 1 - layer).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from model.mae import MAEConfig
from model.vit import (LAYER_NORM_EPS, Block, PatchEmbed, init_linear_and_norm, run_blocks, sincos_pos_embed_2d,
                       with_cls_token)

HEADS = ("linear", "bn_linear")
HEAD_INIT_STD = {"linear": 2e-5, "bn_linear": 0.01}  # the official fine-tuning / linear probe
PROBE_BN_EPS = 1e-6


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of one classifier: the encoder's shape plus pooling and head."""

    num_classes: int
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.0  # stochastic depth of the last block (linear from 0)
    global_pool: bool = True  # mean of patch tokens + fc_norm; False: cls token after norm
    head: str = "linear"  # "linear", or "bn_linear" (the linear probe)

    def __post_init__(self) -> None:
        for name in ("num_classes", "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ClassifierConfig.{name} must be positive, got {getattr(self, name)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"ClassifierConfig.img_size ({self.img_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"ClassifierConfig.drop_path must be in [0, 1), got {self.drop_path}")
        if self.head not in HEADS:
            raise ValueError(f"ClassifierConfig.head must be one of {', '.join(HEADS)}, got {self.head!r}")

    @classmethod
    def from_encoder(cls, encoder: MAEConfig, num_classes: int, **overrides: object) -> ClassifierConfig:
        """The classifier over an MAE's encoder (``img_size`` may differ: 448 px)."""
        shape = {k: getattr(encoder, k) for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth",
                                                  "num_heads", "mlp_ratio")}
        return replace(cls(num_classes=num_classes, **shape), **overrides)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


class ViTClassifier(nn.Module):
    """ViT encoder + pooling + head: (B, C, H, W) -> logits (B, num_classes)."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(cfg.embed_dim, cfg.grid_size)[None])  # (1, 1+L, D)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()  # numbers, on any default device
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, rate) for rate in rates)
        if cfg.global_pool:
            self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=LAYER_NORM_EPS)
        else:
            self.norm = nn.LayerNorm(cfg.embed_dim, eps=LAYER_NORM_EPS)
        linear = nn.Linear(cfg.embed_dim, cfg.num_classes)
        if cfg.head == "bn_linear":
            self.head = nn.Sequential(nn.BatchNorm1d(cfg.embed_dim, affine=False, eps=PROBE_BN_EPS), linear)
        else:
            self.head = linear
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The MAE init for the encoder (what a random-init baseline starts from);
        the head as the official fine-tuning / probe code."""
        w = self.patch_embed.proj.weight
        if w.is_meta:  # built for its shapes alone (memory_plan, convert): no values to draw
            return
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_linear_and_norm)
        linear = self.head_linear()
        nn.init.trunc_normal_(linear.weight, std=HEAD_INIT_STD[self.cfg.head])
        nn.init.zeros_(linear.bias)

    def head_linear(self) -> nn.Linear:
        return self.head[1] if isinstance(self.head, nn.Sequential) else self.head

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides 1-D ones (biases, norms)."""
        return {"cls_token", "pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def freeze_except_last(self, trainable_blocks: int | None) -> None:
        """Partial fine-tuning: only the last ``trainable_blocks`` blocks, the final
        norm and the head learn (0: the head alone, as a linear probe; None: all)."""
        if trainable_blocks is None:
            self.requires_grad_(True)
            return
        if not 0 <= trainable_blocks <= self.cfg.depth:
            raise ValueError(f"trainable_blocks must be in [0, {self.cfg.depth}], got {trainable_blocks}")
        self.requires_grad_(False)
        self.head.requires_grad_(True)
        if trainable_blocks > 0:
            for blk in self.blocks[self.cfg.depth - trainable_blocks:]:
                blk.requires_grad_(True)
            (self.fc_norm if self.cfg.global_pool else self.norm).requires_grad_(True)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> pooled, normalized features (B, D): what the head reads."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # (B, L, D)
        x = run_blocks(self.blocks, with_cls_token(x, self.cls_token, self.pos_embed), self.grad_checkpointing)
        if self.cfg.global_pool:
            return self.fc_norm(x[:, 1:].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(imgs))  # (B, num_classes)


def layer_id(name: str, depth: int) -> int:
    """The official layer of a parameter: embeddings 0, block i -> i + 1, rest depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups_lrd(model: ViTClassifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with layer-wise lr decay: one group per (layer, decayed or not),
    trainable parameters only; each carries ``lr_scale`` = decay^(depth + 1 - layer)
    (the trainer sets lr x lr_scale) and ``layer_id``. No weight decay on 1-D
    parameters (biases, norms) and the cls/pos tokens."""
    depth = model.cfg.depth
    skip = model.no_weight_decay()
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_id(name, depth)
        decayed = p.ndim > 1 and name not in skip
        group = groups.setdefault((layer, decayed), {
            "params": [], "weight_decay": weight_decay if decayed else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer), "layer_id": layer})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]
