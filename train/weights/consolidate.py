"""A ZeRO checkpoint of any stage -> the fp32 MAE (`mae export` writes it as safetensors).

Writes ``OUT/mae.safetensors`` (the full MAE) and ``OUT/encoder.safetensors`` (the
encoder alone), both in the official/timm key layout, and checks they load
strictly into ``model/``. The checkpoint is verified first — every file against
the size and sha256 in its ``COMPLETE`` record — and every file is read as plain
data (``train.checkpoint_io``), DeepSpeed's own stage-3 consolidation included, so
a corrupt checkpoint or one holding a pickle payload is refused, naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from model.mae import MaskedAutoencoderViT
from model.registry import model_config
from model.weights import encoder_state_dict, load_mae_state_dict
from train.checkpoint import COMPLETE, TAG_RE, complete_tags, latest_complete, read_meta, verify
from train.checkpoint_io import load_plain, plain_data_only
from train.errors import CheckpointIntegrityError, UnsafeCheckpointError, WeightsError
from train.weights.files import checked_tensors, encoder_metadata, write_together
from train.weights.pretrained import check_architecture

log = logging.getLogger(__name__)


def resolve_tag(path: Path) -> tuple[Path, str]:
    """A run directory (uses its newest complete checkpoint) or one tag directory."""
    if TAG_RE.match(path.name) and (path / COMPLETE).exists():
        return path.parent, path.name
    if TAG_RE.match(path.name):  # one checkpoint asked for by name: say what it lacks
        done = ", ".join(complete_tags(path.parent)[-3:]) or "none"
        what = "is an unfinished save (no COMPLETE)" if path.is_dir() else "does not exist"
        raise WeightsError(f"checkpoint {path} {what}; complete ones beside it: {done}")
    tag = latest_complete(path)
    if tag is None:
        raise WeightsError(f"no complete checkpoint in {path} (looked for step*/COMPLETE)")
    return path, tag


def _verified(tag_dir: Path) -> list[str]:
    """The checkpoint's recorded files, each checked against its size and sha256."""
    try:
        return sorted(verify(tag_dir))
    except CheckpointIntegrityError as e:
        older = [t for t in complete_tags(tag_dir.parent) if t < tag_dir.name]
        fix = (f"export an older one ({tag_dir.parent / older[-1]} is the newest of {len(older)}) or restore this "
               "one from a copy" if older else "it is the run's oldest complete checkpoint: restore it from a copy")
        raise WeightsError(f"refusing checkpoint {tag_dir}: {e}; {fix}") from e


def _safe_load(file: Path) -> dict:
    try:
        return load_plain(file)
    except (UnsafeCheckpointError, CheckpointIntegrityError) as e:
        raise WeightsError(str(e)) from e


def consolidate(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 state dict of the MAE in a verified checkpoint."""
    tag_dir = root / tag
    recorded = _verified(tag_dir)
    stray = sorted(p.name for p in tag_dir.glob("*.pt") if p.name not in recorded)
    if stray:  # DeepSpeed's ZeRO-3 reader takes every *_states.pt it finds, recorded or not
        raise WeightsError(f"{tag_dir} holds files its COMPLETE record does not list: {', '.join(stray[:4])}; "
                           "remove them (a leftover of another run?)")
    states = {name: _safe_load(tag_dir / name) for name in recorded if name.endswith(".pt")}
    # stages 0-2: mp_rank_00_model_states.pt; stage 3: one zero_pp_rank_R_mp_rank_00_model_states.pt per rank
    model_states = states.get("mp_rank_00_model_states.pt") or states.get("zero_pp_rank_0_mp_rank_00_model_states.pt")
    if not isinstance(model_states, dict):
        raise WeightsError(f"{tag_dir} has no *mp_rank_00_model_states.pt: not a DeepSpeed checkpoint")
    try:
        stage = int(model_states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    except (AttributeError, TypeError, ValueError):
        raise WeightsError(f"{tag_dir}: its ds_config holds no ZeRO stage (damaged or altered)") from None
    if stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with plain_data_only():
                sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        except (ValueError, KeyError, IndexError, TypeError, AssertionError, RuntimeError) as e:
            raise WeightsError(f"{tag_dir}: its ZeRO-3 shards do not consolidate (damaged or altered): "
                               f"{type(e).__name__}: {str(e)[:200]}") from None
    else:  # stages 0-2 keep whole fp32 weights in the model states (bf16 is autocast only)
        sd = model_states.get("module")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise WeightsError(f"{tag_dir}: its model states hold no module weights (damaged or altered)")
    return checked_tensors({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, tag_dir)


ROTATION_RETRIES = 3


def load_checkpoint(ckpt: Path) -> tuple[MaskedAutoencoderViT, dict]:
    """The MAE of a run's checkpoint (any ZeRO stage), verified and loaded strictly.
    A live run's rotation (``checkpoint.keep_last``) may remove the newest checkpoint
    while it is read: given the run's folder, the newest one is then taken again."""
    for _ in range(ROTATION_RETRIES):
        root, tag = resolve_tag(ckpt)
        try:
            return _load_tag(root, tag)
        except (WeightsError, OSError):
            if root / tag == ckpt:  # that one checkpoint was asked for
                if (ckpt / COMPLETE).is_file():
                    raise
                raise WeightsError(f"{ckpt} was removed while it was read (a live run's checkpoint.keep_last rotates "
                                   f"old ones away): export the run's folder {root} to take its newest one") from None
            if latest_complete(root) in (tag, None):  # still the newest: the failure is its own
                raise
            log.info("%s was rotated away while it was read; taking the newest checkpoint again", root / tag)
    raise WeightsError(f"{ckpt}: its newest checkpoint was rotated away {ROTATION_RETRIES} times while it was read; "
                       "raise the live run's checkpoint.keep_last, or export when it is not saving")


def _load_tag(root: Path, tag: str) -> tuple[MaskedAutoencoderViT, dict]:
    try:
        meta = read_meta(root / tag)
    except CheckpointIntegrityError as e:
        raise WeightsError(f"refusing checkpoint {root / tag}: {e}") from None
    config = meta["config"]
    if "eval" in config or "mixup" in config:
        raise WeightsError(f"{root / tag} is a fine-tuning checkpoint, not an MAE: its classifier is exported to "
                           f"{root / 'last'} (and {root / 'best'})")
    sd = consolidate(root, tag)
    try:
        img_size, norm_pix = int(config["data"]["augment"]["img_size"]), config["model"]["norm_pix_loss"]
        if not isinstance(norm_pix, bool):  # bool("false") is True
            raise TypeError(f"norm_pix_loss must be true or false, got {str(norm_pix)[:40]!r}")
        cfg = model_config(meta["model"], img_size=img_size, norm_pix_loss=norm_pix)
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{root / tag / 'meta.json'}: its model settings are incomplete or invalid "
                           f"({type(e).__name__}: {e})") from None
    check_architecture(cfg, sd, root / tag)  # the recorded config must describe these tensors
    model = MaskedAutoencoderViT(cfg)
    load_mae_state_dict(model, sd)  # strict: every key, every shape
    return model, {"root": str(root), "tag": tag, "step": meta["step"], "model": meta["model"], "config": config}


def export(ckpt: Path, out: Path) -> tuple[MaskedAutoencoderViT, dict]:
    """Both files or neither: a failed write (a full disk) leaves the folder as it was."""
    if complete_tags(out):
        raise WeightsError(f"{out} holds checkpoints: an export there would be read in their place (mae reconstruct, "
                           "probe, convert); export to another folder")
    if (out / COMPLETE).exists():
        raise WeightsError(f"{out} is a checkpoint: an export there would be read in its place (mae reconstruct, "
                           "probe, convert); export to another folder")
    if out.exists() and not out.is_dir():
        raise WeightsError(f"{out} is a file: mae export writes a folder (mae.safetensors, encoder.safetensors)")
    model, info = load_checkpoint(ckpt)
    cfg = model.cfg
    full = {"model": info["model"], "step": info["step"], "img_size": cfg.img_size, "norm_pix_loss": cfg.norm_pix_loss}
    out.mkdir(parents=True, exist_ok=True)
    write_together(out, {"mae.safetensors": (model.state_dict(), full),
                         "encoder.safetensors": (encoder_state_dict(model), encoder_metadata(cfg))})
    return model, info
