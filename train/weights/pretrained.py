"""Load a pretrained (or randomly initialized) MAE from whatever a user has.

Accepted: a run's ``checkpoint.dir`` (its latest complete checkpoint) or one
``step*`` directory of it — any ZeRO stage —; the output folder of ``mae export``;
``mae.safetensors`` (full MAE); ``encoder.safetensors`` (encoder only, decoder left
at its initialization); or ``random:<model>`` for a seeded random init (the
baseline a probe is compared against). Everything is read as plain tensors
(safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.mae import MAEConfig, MaskedAutoencoderViT
from model.registry import create_model, model_config
from model.weights import load_mae_state_dict
from train.errors import WeightsError
from train.weights.files import read_state_dict

RANDOM_PREFIX = "random:"


def load_pretrained(spec: str | Path, seed: int = 0, img_size: int | None = None) -> tuple[MaskedAutoencoderViT, dict]:
    """``(model in eval mode, info)``; ``info['kind']`` is 'full', 'encoder' or 'random'."""
    text = str(spec)
    if text.startswith(RANDOM_PREFIX):
        name = text[len(RANDOM_PREFIX):]
        torch.manual_seed(seed)
        overrides = {"img_size": img_size} if img_size else {}
        return create_model(name, **overrides).eval(), {"kind": "random", "model": name, "seed": seed}
    path = Path(spec)
    if path.is_dir() and (path / "mae.safetensors").is_file():
        path = path / "mae.safetensors"
    if path.is_dir():
        from train.weights.consolidate import load_checkpoint

        model, info = load_checkpoint(path)
        return model.eval(), {**info, "kind": "full"}
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: expected a checkpoint directory, an `mae export` folder, a "
                                  f".safetensors file or random:<model>")
    meta = _safetensors_metadata(path)
    if "model" in meta:  # mae.safetensors from `mae export`
        cfg = model_config(meta["model"], img_size=int(meta.get("img_size", model_config(meta["model"]).img_size)),
                           norm_pix_loss=bool(meta.get("norm_pix_loss", True)))
        name = meta["model"]
    elif meta.get("arch") == "vit":  # encoder.safetensors
        cfg = MAEConfig(**{k: int(meta[k]) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")})
        name = f"vit(embed_dim={cfg.embed_dim}, depth={cfg.depth}, patch={cfg.patch_size})"
    else:
        raise WeightsError(f"{path} has no maescale metadata (model or arch); write it with `mae export`")
    model = MaskedAutoencoderViT(cfg)
    kind = load_mae_state_dict(model, read_state_dict(path))
    return model.eval(), {"kind": kind, "model": name, "path": str(path)}


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # not a safetensors file
        raise WeightsError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    return {k: _json_or_text(v) for k, v in meta.items()}


def _json_or_text(value: str) -> object:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
