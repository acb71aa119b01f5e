"""State-dict conventions: the official MAE (and timm ViT) key layout.

Pure functions over state dicts; reading and writing files lives in
``train.weights.files``. Official checkpoints come as ``{'model': state_dict}``, full
(encoder + decoder, e.g. ``mae_visualize_vit_large.pth``) or encoder-only (e.g.
``mae_pretrain_vit_base.pth``); both load with strict key checking.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from model.classifier import ViTClassifier
from model.errors import CheckpointMismatchError  # noqa: F401  (raised here, imported from here)
from model.mae import MaskedAutoencoderViT
from model.vit import resize_pos_embed

ENCODER_KEY_ROOTS = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")
_LISTED_KEYS = 12


def is_encoder_key(key: str) -> bool:
    return key.split(".", 1)[0] in ENCODER_KEY_ROOTS


def encoder_state_dict(model: MaskedAutoencoderViT) -> dict[str, torch.Tensor]:
    """The encoder alone, in the timm ViT key layout (what fine-tuning code loads)."""
    return {k: v for k, v in model.state_dict().items() if is_encoder_key(k)}


def unwrap_state_dict(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Accept ``{'model': sd}``, ``{'state_dict': sd}`` or a bare state dict; drop a
    DDP ``module.`` prefix."""
    sd = checkpoint
    for wrapper in ("model", "state_dict", "module"):
        inner = sd.get(wrapper) if isinstance(sd, Mapping) else None
        if isinstance(inner, Mapping):
            sd = inner
            break
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointMismatchError("checkpoint holds no state dict of tensors (expected {'model': state_dict})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def _listing(title: str, keys: set[str]) -> str:
    shown = sorted(keys)[:_LISTED_KEYS]
    more = f" ... and {len(keys) - len(shown)} more" if len(keys) > len(shown) else ""
    return f"{title} ({len(keys)}): {', '.join(shown)}{more}"


def load_mae_state_dict(model: MaskedAutoencoderViT, checkpoint: Mapping[str, object]) -> str:
    """Load a full or encoder-only MAE checkpoint with strict key checking.

    A checkpoint with no decoder key is taken as encoder-only: exactly the encoder's
    keys must be present and the decoder keeps its initialization. Position
    embeddings of another grid size are resized bicubically. Returns ``'full'`` or
    ``'encoder'``; raises ``CheckpointMismatchError`` naming missing, unexpected and
    mis-shaped keys.
    """
    sd = unwrap_state_dict(checkpoint)
    own = model.state_dict()
    encoder_only = not any(not is_encoder_key(k) for k in sd)
    expected = {k for k in own if is_encoder_key(k)} if encoder_only else set(own)
    missing, unexpected = expected - set(sd), set(sd) - expected
    sd = {k: _fit_pos_embed(k, v, own[k]) for k, v in sd.items() if k in own}
    mis_shaped = {f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if v.shape != own[k].shape}
    if missing or unexpected or mis_shaped:
        kind = "encoder-only" if encoder_only else "full"
        problems = [_listing(t, s) for t, s in (("missing", missing), ("unexpected", unexpected),
                                                 ("shape mismatch", mis_shaped)) if s]
        raise CheckpointMismatchError(f"{kind} MAE checkpoint does not fit the model: " + "; ".join(problems))
    model.load_state_dict(sd, strict=not encoder_only)
    return "encoder" if encoder_only else "full"


def _is_decoder_key(key: str) -> bool:
    return key == "mask_token" or key.startswith("decoder_")


def _fit_pos_embed(key: str, value: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    if key in ("pos_embed", "decoder_pos_embed") and value.dim() == 3 and value.shape[-1] == own.shape[-1] \
            and value.shape[1] != own.shape[1]:
        grid = value.shape[1] - 1  # after the cls token
        if grid < 1 or math.isqrt(grid) ** 2 != grid:
            raise CheckpointMismatchError(f"{key} has {grid} grid positions, not a square grid: it cannot be "
                                          "resized to the model's")
        new_grid = round((own.shape[1] - 1) ** 0.5)
        return resize_pos_embed(value, new_grid)
    return value


def load_classifier_state_dict(model: ViTClassifier, checkpoint: Mapping[str, object]) -> str:
    """Start a classifier from an MAE (full or encoder-only: its encoder is taken,
    the decoder ignored) or load a classifier checkpoint (``head.*`` present).

    As the official fine-tuning code: with global pooling the pretrained ``norm`` is
    not used (``fc_norm`` and the head keep their init); position embeddings of
    another grid are resized bicubically (224 -> 448). Returns ``'encoder'`` or
    ``'classifier'``; raises ``CheckpointMismatchError`` naming missing and
    mis-shaped keys.
    """
    sd = unwrap_state_dict(checkpoint)
    own = model.state_dict()
    if any(k.startswith("head.") for k in sd):  # a classifier: every key, strictly
        kind, expected, take = "classifier", set(own), set(sd)
    else:  # the decoder, and the final norm a pooled classifier does not use, are left; nothing else is
        kind = "encoder"
        expected = {k for k in own if is_encoder_key(k)}
        take = {k for k in sd if k in expected}
        left = {k for k in sd if k not in expected and not _is_decoder_key(k) and not k.startswith("norm.")}
    missing, unexpected = expected - set(sd), (take - set(own)) if kind == "classifier" else left
    fitted = {k: _fit_pos_embed(k, sd[k], own[k]) for k in take if k in own}
    mis_shaped = {f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in fitted.items() if v.shape != own[k].shape}
    if missing or unexpected or mis_shaped:
        problems = [_listing(t, s) for t, s in (("missing", missing), ("unexpected", unexpected),
                                                 ("shape mismatch", mis_shaped)) if s]
        raise CheckpointMismatchError(f"{kind} checkpoint does not fit the classifier: " + "; ".join(problems))
    model.load_state_dict(fitted, strict=kind == "classifier")
    return kind
