"""Load a pretrained (or randomly initialized) MAE from whatever a user has.

Accepted: a run's ``checkpoint.dir`` (its latest complete checkpoint) or one
``step*`` directory of it — any ZeRO stage —; the output folder of ``mae export``;
``mae.safetensors`` (full MAE); ``encoder.safetensors`` (encoder only, decoder left
at its initialization); an official MAE ``.pth`` (``{'model': state_dict}``, full or
encoder-only; its size is recognized among the registered ones); or
``random:<model>`` for a seeded random init (the baseline a probe is compared
against). ``read_weights`` gives the bare state dict of the same sources (and of a
fine-tuned ``classifier.safetensors``) for fine-tuning. Everything is read as plain
tensors (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from model.mae import MAEConfig, MaskedAutoencoderViT
from model.registry import create_model, list_models, model_config
from model.weights import load_mae_state_dict
from train.errors import WeightsError
from train.weights.files import read_state_dict, require_weights_file

RANDOM_PREFIX = "random:"
TORCH_SUFFIXES = (".pth", ".pt")
WEIGHT_FILES = ("classifier.safetensors", "mae.safetensors")  # what an export folder holds, in preference


def load_pretrained(spec: str | Path, seed: int = 0, img_size: int | None = None) -> tuple[MaskedAutoencoderViT, dict]:
    """``(model in eval mode, info)``; ``info['kind']`` is 'full', 'encoder' or 'random'."""
    text = str(spec)
    if text.startswith(RANDOM_PREFIX):
        name = text[len(RANDOM_PREFIX):]
        torch.manual_seed(seed)
        overrides = {"img_size": img_size} if img_size else {}
        try:
            model = create_model(name, **overrides)
        except ValueError as e:
            raise WeightsError(f"{text}: {e}") from None
        return model.eval(), {"kind": "random", "model": name, "seed": seed}
    path = Path(spec)
    if path.is_dir() and (path / "mae.safetensors").is_file():
        path = _export_file(path, "mae.safetensors")
    if (path / "classifier.safetensors").is_file() or path.name == "classifier.safetensors":
        raise WeightsError(f"{path} is a classifier from `mae finetune`; this takes an MAE: a pretraining run, its "
                           "`mae export` folder, mae.safetensors or encoder.safetensors")
    if path.is_dir():
        from train.weights.consolidate import load_checkpoint

        model, info = load_checkpoint(path)
        return model.eval(), {**info, "kind": "full"}
    if path.suffix in TORCH_SUFFIXES:
        sd = read_state_dict(path)
        name = registered_size_of(sd, path)
        model = create_model(name, img_size=_img_size_of(sd, path))
        kind = load_mae_state_dict(model, sd)
        return model.eval(), {"kind": kind, "model": name, "path": str(path)}
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: expected a checkpoint directory, an `mae export` folder, a "
                                  f".safetensors or official .pth file, or random:<model>")
    described = metadata_config(_safetensors_metadata(path), path)
    if described is None:
        raise WeightsError(f"{path} has no maescale metadata (model or arch); write it with `mae export`")
    cfg, name = described
    sd = read_state_dict(path)
    check_architecture(cfg, sd, path)  # before building: metadata saying 4096 px or 100,000 blocks builds for hours
    model = MaskedAutoencoderViT(cfg)
    kind = load_mae_state_dict(model, sd)
    return model.eval(), {"kind": kind, "model": name, "path": str(path)}


def metadata_config(meta: dict, source: object) -> tuple[MAEConfig, str] | None:
    """``(config, model name)`` that a safetensors file's maescale metadata (untrusted)
    gives: ``mae.safetensors`` names a registered model (its input size and
    ``norm_pix_loss`` defaulting to the model's own), ``encoder.safetensors`` spells
    out the ViT. None when the file has neither."""
    try:
        if "model" in meta:  # mae.safetensors from `mae export`
            name = str(meta["model"])
            own = model_config(name)
            norm_pix = meta.get("norm_pix_loss", own.norm_pix_loss)
            if not isinstance(norm_pix, bool):  # bool("false") is True
                raise TypeError(f"norm_pix_loss must be true or false, got {str(norm_pix)[:40]!r}")
            return model_config(name, img_size=int(meta.get("img_size", own.img_size)), norm_pix_loss=norm_pix), name
        if meta.get("arch") == "vit":  # encoder.safetensors
            cfg = MAEConfig(**{k: int(meta[k]) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")})
            return cfg, f"vit(embed_dim={cfg.embed_dim}, depth={cfg.depth}, patch={cfg.patch_size})"
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{source}: its architecture metadata is incomplete or invalid ({type(e).__name__}: {e})") from None
    return None


def check_architecture(cfg: MAEConfig, sd: dict[str, torch.Tensor], source: object) -> None:
    """The encoder's width, patch, depth and grid the tensors have are the ones
    ``cfg`` (from untrusted metadata) says."""
    found = architecture_of(sd, source)
    said = {"embed_dim": cfg.embed_dim, "patch_size": cfg.patch_size, "depth": cfg.depth,
            "patches": cfg.num_patches if "pos_embed" in sd else None}
    wrong = [f"{k} {said[k]} (the tensors: {found[k]})" for k in said if said[k] != found[k]]
    if wrong:
        raise WeightsError(f"{source}: its metadata does not describe its tensors: {', '.join(wrong)}")


def architecture_of(sd: dict[str, torch.Tensor], source: object) -> dict[str, int | None]:
    """Encoder width, patch size, depth and patches (None without a pos_embed), read
    from the tensors' shapes."""
    try:
        width, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
    except (KeyError, IndexError):
        raise WeightsError(f"{source}: no cls_token / patch_embed.proj.weight: not a ViT encoder") from None
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    pos = sd.get("pos_embed")
    patches = pos.shape[1] - 1 if pos is not None and pos.dim() == 3 else None
    return {"embed_dim": width, "patch_size": patch, "depth": depth, "patches": patches}


def read_weights(spec: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict behind a weights source, as it is (MAE, encoder or classifier):
    a run's checkpoint dir or step dir (consolidated, any stage), an `mae export` or
    fine-tuning export folder, a .safetensors file or an official .pth."""
    path = Path(spec)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                path = _export_file(path, name)
                break
    if path.is_dir():
        from train.weights.consolidate import consolidate, resolve_tag

        root, tag = resolve_tag(path)
        sd = consolidate(root, tag)
        return sd, {"path": str(root / tag)}
    if path.suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise WeightsError(f"{path}: expected a checkpoint directory, an export folder, a .safetensors or "
                           ".pth file")
    meta = _safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    return read_state_dict(path), {"path": str(path), **meta}


def _export_file(folder: Path, name: str) -> Path:
    """``folder / name``, unless ``folder`` also holds checkpoints: which one the user
    means is not ours to guess (an old export would silently win over newer steps)."""
    from train.checkpoint import holds_checkpoints

    if holds_checkpoints(folder):
        raise WeightsError(f"{folder} holds both checkpoints and an export ({name}): give {folder / name}, or one "
                           f"checkpoint's step folder without it")
    return folder / name


def registered_size_of(sd: dict[str, torch.Tensor], source: object) -> str:
    """The registered model whose encoder has this state dict's width, depth and patch
    (official checkpoints carry no architecture metadata; heads are the paper's)."""
    found = architecture_of(sd, source)
    width, depth, patch = found["embed_dim"], found["depth"], found["patch_size"]
    for name in list_models():
        cfg = model_config(name)
        if (cfg.embed_dim, cfg.depth, cfg.patch_size) == (width, depth, patch):
            return name
    raise WeightsError(f"{source}: no registered model has width {width}, depth {depth}, patch {patch} (mae models)")


def _img_size_of(sd: dict[str, torch.Tensor], source: object) -> int:
    patches = architecture_of(sd, source)["patches"]
    grid = 14 if patches is None else math.isqrt(max(patches, 0))
    if patches is not None and (patches < 1 or grid * grid != patches):
        raise WeightsError(f"{source}: pos_embed has {patches} patch positions, not a square grid")
    return grid * sd["patch_embed.proj.weight"].shape[-1]


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    require_weights_file(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # not a safetensors file
        raise WeightsError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    return {k: _json_or_text(v) for k, v in meta.items()}


def _json_or_text(value: str) -> object:
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: nested past what the parser holds
        return value
