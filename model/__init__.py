"""ViT + MAE models. No I/O, no logging, no distributed code.

The configs and the registry import without torch; the modules load it when first
used (``from model import MaskedAutoencoderViT``)."""

from typing import Any

from model.registry import create_model, list_models, model_config
from model.spec import MAEConfig

__all__ = [
    "MAEConfig",
    "MaskedAutoencoderViT",
    "MaskTokenBaselineMAE",
    "create_model",
    "list_models",
    "model_config",
]


def __getattr__(name: str) -> Any:
    if name in ("MaskedAutoencoderViT", "MaskTokenBaselineMAE"):
        from model import mae

        return getattr(mae, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
