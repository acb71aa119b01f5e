"""ViT + MAE models. No I/O, no logging, no distributed code."""

from model.mae import MAEConfig, MaskedAutoencoderViT, MaskTokenBaselineMAE
from model.registry import create_model, list_models, model_config

__all__ = [
    "MAEConfig",
    "MaskedAutoencoderViT",
    "MaskTokenBaselineMAE",
    "create_model",
    "list_models",
    "model_config",
]
