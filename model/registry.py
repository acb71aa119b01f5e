"""Named MAE sizes: tiny registered factories of ``MAEConfig``.

The paper's sizes use the official decoder (8 blocks x 512 wide, 16 heads). The
tiny/small/test sizes exist for CPU tests and demos.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from model.spec import MAEConfig

if TYPE_CHECKING:
    from model.mae import MaskedAutoencoderViT

ConfigFactory = Callable[..., MAEConfig]
_REGISTRY: dict[str, ConfigFactory] = {}


def register(fn: ConfigFactory) -> ConfigFactory:
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model name {fn.__name__!r} is registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return list(_REGISTRY)  # registration order: paper sizes first


def model_config(name: str, **overrides: object) -> MAEConfig:
    """The config of a named size, with field overrides (e.g. ``img_size=448``)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}") from None
    return factory(**overrides)


def create_model(name: str, baseline: bool = False, **overrides: object) -> MaskedAutoencoderViT:
    """Build a named MAE; ``baseline=True`` builds the mask-token encoder baseline."""
    from model.mae import MaskedAutoencoderViT, MaskTokenBaselineMAE

    cls = MaskTokenBaselineMAE if baseline else MaskedAutoencoderViT
    return cls(model_config(name, **overrides))


def _paper_decoder(**overrides: object) -> dict[str, object]:
    return {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16, **overrides}


@register
def mae_vit_base_patch16(**overrides: object) -> MAEConfig:
    return MAEConfig(**{"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, **_paper_decoder(**overrides)})


@register
def mae_vit_large_patch16(**overrides: object) -> MAEConfig:
    return MAEConfig(**{"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16, **_paper_decoder(**overrides)})


@register
def mae_vit_huge_patch14(**overrides: object) -> MAEConfig:
    return MAEConfig(**{"patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16, **_paper_decoder(**overrides)})


@register
def mae_vit_small_patch16(**overrides: object) -> MAEConfig:
    """ViT-S/16 encoder (DeiT-S width) with a 4-block, 256-wide decoder."""
    return MAEConfig(**{"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6,
                        "decoder_embed_dim": 256, "decoder_depth": 4, "decoder_num_heads": 8, **overrides})


@register
def mae_vit_tiny_patch16(**overrides: object) -> MAEConfig:
    """ViT-Ti/16 encoder (DeiT-Ti width) with a 2-block, 128-wide decoder."""
    return MAEConfig(**{"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3,
                        "decoder_embed_dim": 128, "decoder_depth": 2, "decoder_num_heads": 4, **overrides})


@register
def mae_vit_test_patch4(**overrides: object) -> MAEConfig:
    """A few-thousand-parameter MAE on 32x32 images, for fast CPU tests."""
    return MAEConfig(**{"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4,
                        "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4, **overrides})


@register
def mae_vit_mini_patch4(**overrides: object) -> MAEConfig:
    """A 0.9M-parameter MAE on 32x32 images that learns visibly in minutes on 2 CPU cores (the demo)."""
    return MAEConfig(**{"img_size": 32, "patch_size": 4, "embed_dim": 128, "depth": 4, "num_heads": 4,
                        "decoder_embed_dim": 64, "decoder_depth": 1, "decoder_num_heads": 4, **overrides})
