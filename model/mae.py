"""Masked Autoencoder with a ViT backbone (He et al., CVPR 2022).

The asymmetric design: the encoder sees only the visible ~25% of patches; a light
decoder sees every position (encoded visible tokens plus a shared mask token) and
regresses the pixels of the masked patches. ``MaskTokenBaselineMAE`` is the
"encoder w/ [M]" row of the paper's Table 2 — the same encoder run on all tokens —
kept here so the speedup the asymmetry buys can be measured, not assumed.

Parameter names and tensor layouts (patchify order, position-embedding axes) match
the official release, so its checkpoints load with strict key checking.
"""

from __future__ import annotations

import torch
from torch import nn
from model.vit import (LAYER_NORM_EPS, Block, PatchEmbed, init_linear_and_norm, run_blocks, sincos_pos_embed_2d,
                       with_cls_token)
from model.spec import MAEConfig, num_visible_patches  # noqa: F401  (re-exported)

NORM_PIX_EPS = 1e-6


class MaskedAutoencoderViT(nn.Module):
    """MAE: visible-only ViT encoder, lightweight decoder, norm-pix MSE on masked patches."""

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False

        # encoder
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # Fixed sin-cos embeddings: persistent buffers, so they sit in the state dict
        # under the official names but are never trained or decayed.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.embed_dim, cfg.grid_size)[None])  # (1, 1+L, D)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=LAYER_NORM_EPS)

        # decoder
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(cfg.decoder_embed_dim, cfg.grid_size)[None])
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=LAYER_NORM_EPS)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_dim)
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """Init as the official release: xavier-uniform Linear (and the patch conv
        viewed as a Linear), zero biases, unit LayerNorm, tokens ~ N(0, 0.02)."""
        w = self.patch_embed.proj.weight
        if w.is_meta:  # built for its shapes alone (memory_plan, convert): no values to draw
            return
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for token in self.learned_tokens():
            nn.init.normal_(token, std=0.02)
        self.apply(init_linear_and_norm)

    def learned_tokens(self) -> list[nn.Parameter]:
        return [self.cls_token, self.mask_token]

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides biases and norms: none.
        The official pretraining decays the cls and mask tokens (timm's
        ``add_weight_decay`` with no skip list spares only 1-D parameters)."""
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (memory for compute)."""
        self.grad_checkpointing = enable

    # ---------------------------------------------------------------- layout
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), patch pixels ordered (row, col, channel)."""
        p, h = self.cfg.patch_size, self.cfg.grid_size
        N, C = imgs.shape[:2]
        x = imgs.reshape(N, C, h, p, h, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(N, h * h, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W); the inverse of ``patchify``."""
        p, h, C = self.cfg.patch_size, self.cfg.grid_size, self.cfg.in_chans
        N = x.shape[0]
        x = x.reshape(N, h, h, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(N, C, h * p, h * p)

    # --------------------------------------------------------------- masking
    def mask_indices(
        self, batch: int, mask_ratio: float, noise: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by argsort of uniform noise.

        Returns ids_keep (N, len_keep), mask (N, L) with 1 = masked in original
        patch order, and ids_restore (N, L) that undoes the shuffle.
        """
        L = self.cfg.num_patches
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if noise is None:
            noise = torch.rand(batch, L, device=device)
        elif noise.shape != (batch, L):
            raise ValueError(f"noise must have shape {(batch, L)}, got {tuple(noise.shape)}")
        len_keep = num_visible_patches(L, mask_ratio)
        ids_shuffle = torch.argsort(noise, dim=1)  # small noise = keep
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        mask = torch.ones(batch, L, device=device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return ids_keep, mask, ids_restore

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random subset of tokens: (N, L, D) -> (N, len_keep, D), mask, ids_restore."""
        N, _, D = x.shape
        ids_keep, mask, ids_restore = self.mask_indices(N, mask_ratio, noise, x.device)
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        return x_masked, mask, ids_restore

    # --------------------------------------------------------------- forward
    def _check_images(self, imgs: torch.Tensor) -> None:
        expected = (self.cfg.in_chans, self.cfg.img_size, self.cfg.img_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, expected))}), got {tuple(imgs.shape)}")

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(blocks, x, self.grad_checkpointing)

    def _with_cls(self, x: torch.Tensor) -> torch.Tensor:
        return with_cls_token(x, self.cls_token, self.pos_embed)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C, H, W) -> latent (N, 1 + len_keep, D), mask (N, L), ids_restore (N, L)."""
        self._check_images(imgs)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # (N, L, D)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        x = self._run_blocks(self.blocks, self._with_cls(x))
        return self.norm(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encode every patch in order, no masking: (N, C, H, W) -> (N, 1 + L, D).

        What a linear probe or fine-tuning reads.
        """
        self._check_images(imgs)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x = self._run_blocks(self.blocks, self._with_cls(x))
        return self.norm(x)

    def _decoder_tokens(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Append mask tokens and unshuffle: (N, 1 + keep, Dd) -> (N, 1 + L, Dd)."""
        N, T, Dd = x.shape
        mask_tokens = self.mask_token.expand(N, ids_restore.shape[1] + 1 - T, -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (N, L, Dd), shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))
        return torch.cat([x[:, :1], x_], dim=1)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, T, D) -> predicted patch pixels (N, L, p*p*C)."""
        x = self._decoder_tokens(self.decoder_embed(latent), ids_restore)
        x = self._run_blocks(self.decoder_blocks, x + self.decoder_pos_embed)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]  # drop cls

    def patch_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """Regression targets (N, L, p*p*C) in fp32; per-patch normalized with norm-pix."""
        target = self.patchify(imgs.float())
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the official release
            target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over masked patches only (visible ones carry no loss)."""
        target = self.patch_targets(imgs)
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (N, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (N, C, H, W) -> (loss scalar, pred (N, L, p*p*C), mask (N, L))."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


class MaskTokenBaselineMAE(MaskedAutoencoderViT):
    """The paper's "encoder w/ [M]" baseline (Table 2).

    Identical to MAE except that the encoder processes all L tokens, masked
    positions replaced by a learned encoder-side mask token. Same decoder and loss;
    same parameter names plus ``encoder_mask_token``. It exists to measure the
    speedup of the visible-only encoder on real hardware.
    """

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__(cfg)
        self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        nn.init.normal_(self.encoder_mask_token, std=0.02)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C, H, W) -> latent (N, 1 + L, D) in patch order, mask (N, L), ids_restore (N, L)."""
        self._check_images(imgs)
        x = self.patch_embed(imgs)  # (N, L, D)
        _, mask, ids_restore = self.mask_indices(x.shape[0], mask_ratio, noise, x.device)
        x = torch.where(mask.unsqueeze(-1).bool(), self.encoder_mask_token.to(x.dtype), x)
        x = self._run_blocks(self.blocks, self._with_cls(x + self.pos_embed[:, 1:]))
        return self.norm(x), mask, ids_restore

    def _decoder_tokens(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        return x  # already every position, in patch order

