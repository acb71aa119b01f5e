"""Reading and writing model weights: official ``.pth`` and safetensors.

Checkpoints are untrusted input: ``.pth`` files are read with
``torch.load(weights_only=True)``, so a pickle cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from infra.files import atomic_path
from model.classifier import ClassifierConfig
from model.mae import MaskedAutoencoderViT
from model.weights import encoder_state_dict, unwrap_state_dict
from train.errors import WeightsError

def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or torch (``.pth``/``.pt``) weights file as a state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # objects beyond tensors: possibly code
        raise WeightsError(
            f"refused to load {path}: it holds objects other than tensors and plain containers "
            "(a pickle that could run code); only plain weights are read"
        ) from e
    except Exception as e:  # corrupt file, wrong format
        raise WeightsError(f"cannot read weights from {path}: {type(e).__name__}: {e}") from e
    if not isinstance(raw, Mapping):
        raise WeightsError(f"{path} holds a {type(raw).__name__}, not a state dict")
    return unwrap_state_dict(raw)


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, object] | None = None
) -> Path:
    """Write tensors as safetensors atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = {"format": "pt", **{k: json.dumps(v) if not isinstance(v, str) else v for k, v in (metadata or {}).items()}}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def export_encoder(model: MaskedAutoencoderViT, path: str | os.PathLike[str]) -> Path:
    """The encoder alone in the timm ViT layout, with the architecture as metadata."""
    cfg = model.cfg
    meta = {"arch": "vit", "img_size": cfg.img_size, "patch_size": cfg.patch_size,
            "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads}
    return save_safetensors(encoder_state_dict(model), path, meta)


CLASSIFIER_ARCH = "vit_classifier"


def export_classifier(state_dict: Mapping[str, torch.Tensor], cfg: ClassifierConfig, path: str | os.PathLike[str],
                      extra: Mapping[str, object] | None = None) -> Path:
    """A fine-tuned classifier (timm ViT layout) with its architecture, and ``extra``
    (class names, scores) as metadata: what `mae finetune` writes to best/ and last/."""
    meta = {"arch": CLASSIFIER_ARCH, **{k: getattr(cfg, k) for k in (
        "num_classes", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "global_pool",
        "head")}, **(extra or {})}
    return save_safetensors(state_dict, path, meta)


def classifier_config_of(meta: Mapping[str, object], source: object) -> ClassifierConfig:
    """The ``ClassifierConfig`` recorded by ``export_classifier`` (drop path off: inference)."""
    if meta.get("arch") != CLASSIFIER_ARCH:
        raise WeightsError(f"{source} is not a classifier written by `mae finetune` (no arch={CLASSIFIER_ARCH})")
    try:
        return ClassifierConfig(**{k: meta[k] for k in ("num_classes", "img_size", "patch_size", "embed_dim", "depth",
                                                        "num_heads", "mlp_ratio", "global_pool", "head")})
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{source}: classifier metadata is incomplete or invalid ({e})") from e
