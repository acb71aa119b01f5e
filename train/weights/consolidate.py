"""A ZeRO checkpoint of any stage -> the fp32 MAE (`mae export` writes it as safetensors).

Writes ``OUT/mae.safetensors`` (the full MAE) and ``OUT/encoder.safetensors`` (the
encoder alone), both in the official/timm key layout, and checks they load
strictly into ``model/``. Every checkpoint file is first read with
``torch.load(weights_only=True)`` (DeepSpeed's own plain-data classes allowlisted),
so a checkpoint holding anything else is refused before DeepSpeed's consolidation
(which unpickles freely) touches it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.mae import MaskedAutoencoderViT
from model.registry import create_model
from model.weights import load_mae_state_dict
from train.checkpoint import COMPLETE, TAG_RE, latest_complete
from train.errors import WeightsError
from train.weights.files import export_encoder, save_safetensors


def resolve_tag(path: Path) -> tuple[Path, str]:
    """A run directory (uses its latest complete checkpoint) or one tag directory."""
    if TAG_RE.match(path.name) and (path / COMPLETE).exists():
        return path.parent, path.name
    tag = latest_complete(path)
    if tag is None:
        raise WeightsError(f"no complete checkpoint in {path} (looked for step*/COMPLETE)")
    return path, tag


def _safe_load(file: Path) -> dict:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # anything that is not plain tensors/containers
        raise WeightsError(f"refusing {file}: it does not load with weights_only=True ({e})") from e


def consolidate(root: Path, tag: str) -> tuple[dict[str, torch.Tensor], dict]:
    """fp32 state dict of the MAE and the run's saved client state."""
    tag_dir = root / tag
    states = {f.name: _safe_load(f) for f in sorted(tag_dir.glob("*.pt"))}  # proves every file is plain data
    # stages 0-2: mp_rank_00_model_states.pt; stage 3: one zero_pp_rank_R_mp_rank_00_model_states.pt per rank
    model_states = states.get("mp_rank_00_model_states.pt") or states.get("zero_pp_rank_0_mp_rank_00_model_states.pt")
    if model_states is None:
        raise WeightsError(f"{tag_dir} has no *mp_rank_00_model_states.pt: not a DeepSpeed checkpoint")
    stage = int(model_states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:  # stages 0-2 keep whole fp32 weights in the model states (bf16 is autocast only)
        sd = model_states["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, model_states


def load_checkpoint(ckpt: Path) -> tuple[MaskedAutoencoderViT, dict]:
    """The MAE of a run's checkpoint (any ZeRO stage), loaded strictly."""
    root, tag = resolve_tag(ckpt)
    sd, states = consolidate(root, tag)
    meta = json.loads((root / tag / "meta.json").read_text())
    config = json.loads(states["config"])
    model = create_model(meta["model"], img_size=config["data"]["augment"]["img_size"],
                         norm_pix_loss=config["model"]["norm_pix_loss"])
    load_mae_state_dict(model, sd)  # strict: every key, every shape
    return model, {"root": str(root), "tag": tag, "step": meta["step"], "model": meta["model"], "config": config}


def export(ckpt: Path, out: Path) -> tuple[MaskedAutoencoderViT, dict]:
    model, info = load_checkpoint(ckpt)
    meta, config = info, info["config"]
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), out / "mae.safetensors",
                     {"model": meta["model"], "step": meta["step"], "img_size": config["data"]["augment"]["img_size"],
                      "norm_pix_loss": config["model"]["norm_pix_loss"]})
    export_encoder(model, out / "encoder.safetensors")
    return model, info
