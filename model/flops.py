"""Analytic FLOP counts of one MAE training step (matmuls only, 2 FLOPs per MAC).

Counts what dominates a ViT: projections, attention score/value products, MLPs,
patch embedding, decoder embedding and prediction head. LayerNorm, softmax, GELU
and the loss are a fraction of a percent and left out. A training step is counted
as 3x the forward (backward = 2x forward), the usual convention for MFU.
"""

from __future__ import annotations

from model.spec import MAEConfig, num_visible_patches


def transformer_block_flops(tokens: int, dim: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one pre-norm block on one sample of ``tokens`` tokens."""
    hidden = int(dim * mlp_ratio)
    qkv = 2 * tokens * dim * 3 * dim
    scores_and_values = 2 * (2 * tokens * tokens * dim)
    proj = 2 * tokens * dim * dim
    mlp = 2 * (2 * tokens * dim * hidden)
    return float(qkv + scores_and_values + proj + mlp)


def mae_forward_flops(cfg: MAEConfig, mask_ratio: float = 0.75, baseline: bool = False) -> dict[str, float]:
    """Forward FLOPs per sample, split into encoder / decoder / total.

    ``baseline=True`` counts the mask-token encoder, which runs on all L tokens.
    """
    L = cfg.num_patches
    enc_tokens = 1 + (L if baseline else num_visible_patches(L, mask_ratio))
    dec_tokens = 1 + L
    patch_embed = 2.0 * L * cfg.patch_dim * cfg.embed_dim  # every patch is embedded, then masked
    encoder = patch_embed + cfg.depth * transformer_block_flops(enc_tokens, cfg.embed_dim, cfg.mlp_ratio)
    decoder = (
        2.0 * enc_tokens * cfg.embed_dim * cfg.decoder_embed_dim
        + cfg.decoder_depth * transformer_block_flops(dec_tokens, cfg.decoder_embed_dim, cfg.mlp_ratio)
        + 2.0 * dec_tokens * cfg.decoder_embed_dim * cfg.patch_dim
    )
    return {"encoder": encoder, "decoder": decoder, "total": encoder + decoder}


def train_step_flops(cfg: MAEConfig, batch: int, mask_ratio: float = 0.75, baseline: bool = False) -> float:
    """FLOPs of forward + backward for a batch (3x forward)."""
    return 3.0 * batch * mae_forward_flops(cfg, mask_ratio, baseline)["total"]


def encoder_speedup_flop_ratio(cfg: MAEConfig, mask_ratio: float = 0.75) -> float:
    """Analytic speedup of MAE over the mask-token baseline: baseline / MAE FLOPs."""
    mae = mae_forward_flops(cfg, mask_ratio)["total"]
    return mae_forward_flops(cfg, mask_ratio, baseline=True)["total"] / mae
