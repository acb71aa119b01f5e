"""Our state dicts in the key layouts other libraries load: timm and transformers.

- timm's ``VisionTransformer`` uses our names already (``cls_token``, ``pos_embed``,
  ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
  ``norm`` or ``fc_norm``, ``head``): ``timm_state_dict`` only selects the keys.
- transformers' ``ViTMAEModel`` / ``ViTForImageClassification``: the layout of
  their published checkpoints (``embeddings.*``, ``encoder.layer.N.attention.
  attention.query`` ...), which transformers 4.x loads as is and 5.x renames on
  load. The fused qkv projection is split into query, key and value (rows q|k|v,
  as ``model.vit.Attention`` reshapes them).

Pure functions over tensors; writing files and ``config.json`` lives in
``train.weights.ecosystem``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from model.errors import LayoutError
from model.weights import is_encoder_key

_HF_BLOCK = {  # ours (after "blocks.N.") -> transformers' (after "encoder.layer.N.")
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_HF_TOP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def timm_state_dict(sd: Mapping[str, torch.Tensor], encoder_only: bool = False) -> dict[str, torch.Tensor]:
    """timm ``VisionTransformer`` keys: an MAE's encoder (``encoder_only``; load with
    ``num_classes=0, global_pool='token'``) or a classifier as is."""
    if encoder_only:
        return {k: v for k, v in sd.items() if is_encoder_key(k)}
    return dict(sd)


def transformers_encoder_state_dict(sd: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """An encoder (cls/pos/patch embedding, blocks, final ``norm``) in transformers'
    ViT / ViTMAE layout, every key under ``prefix`` (``"vit."`` inside a classifier)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not is_encoder_key(key):
            continue
        if key in _HF_TOP:
            out[prefix + _HF_TOP[key]] = value
            continue
        m = _BLOCK_KEY.match(key)
        if m is None:
            raise LayoutError(f"no transformers name for {key!r}")
        layer, module, kind = m.groups()
        base = f"{prefix}encoder.layer.{layer}."
        if module == "attn.qkv":
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{base}attention.attention.{name}.{kind}"] = part.clone()
        elif module in _HF_BLOCK:
            out[f"{base}{_HF_BLOCK[module]}.{kind}"] = value
        else:
            raise LayoutError(f"no transformers name for {key!r}")
    return out


def transformers_classifier_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A cls-token classifier (``norm`` + linear ``head``) as ``ViTForImageClassification``.

    transformers' ViT classifies from the cls token after the final layernorm; a
    classifier with global average pooling (``fc_norm``) or the probe's BatchNorm
    head computes something that model cannot, so it is refused, not approximated.
    """
    if any(k.startswith("fc_norm.") for k in sd):
        raise LayoutError("this classifier pools the patch tokens (global_pool, fc_norm); transformers' "
                          "ViTForImageClassification reads the cls token only: export it for timm "
                          "(global_pool='avg'), or fine-tune with model.global_pool=false")
    if "head.weight" not in sd:
        raise LayoutError("this classifier's head is not one Linear (the linear probe's BatchNorm head?); "
                          "ViTForImageClassification has a plain linear classifier")
    out = transformers_encoder_state_dict(sd, prefix="vit.")
    out["classifier.weight"], out["classifier.bias"] = sd["head.weight"], sd["head.bias"]
    return out
