"""What an MAE is, without torch: its architecture (``MAEConfig``) and how many
patches its encoder sees. Configs and the registry read these, so a
command's options (model names) load without torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MAEConfig:
    """Architecture of one MAE: encoder ViT plus lightweight decoder."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        positive = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                    "decoder_embed_dim", "decoder_depth", "decoder_num_heads")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"MAEConfig.{name} must be positive, got {getattr(self, name)}")
        if self.img_size % self.patch_size != 0:
            raise ValueError(f"MAEConfig.img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})")
        for dim, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            if getattr(self, dim) % getattr(self, heads) != 0:
                raise ValueError(f"MAEConfig.{dim} ({getattr(self, dim)}) must be divisible by {heads} ({getattr(self, heads)})")
            if getattr(self, dim) % 4 != 0:
                raise ValueError(f"MAEConfig.{dim} must be divisible by 4 for the 2-D sin-cos embedding")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans


def num_visible_patches(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder keeps per sample: int(L * (1 - r)), as the official code."""
    return int(num_patches * (1 - mask_ratio))
