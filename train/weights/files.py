"""Reading and writing model weights: official ``.pth`` and safetensors.

Checkpoints are untrusted input: ``.pth`` files are read with
``torch.load(weights_only=True)``, so a pickle cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from infra.files import remove_dead_temps, require_regular, temp_beside
from model.classifier import ClassifierConfig
from model.mae import MAEConfig, MaskedAutoencoderViT
from model.weights import CheckpointMismatchError, encoder_state_dict, unwrap_state_dict
from train.errors import WeightsError

def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or torch (``.pth``/``.pt``) weights file as a state dict."""
    path = require_weights_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return checked_tensors(load_file(str(path)), path)
        with warnings.catch_warnings():  # torch warns about a plain pickle's protocol before refusing it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # objects beyond tensors: possibly code
        raise WeightsError(
            f"refused to load {path}: it holds objects other than tensors and plain containers "
            "(a pickle that could run code); only plain weights are read"
        ) from e
    except WeightsError:
        raise
    except Exception as e:  # corrupt file, wrong format
        raise WeightsError(f"cannot read weights from {path}: {type(e).__name__}: {e}") from e
    if not isinstance(raw, Mapping):
        raise WeightsError(f"{path} holds a {type(raw).__name__}, not a state dict")
    try:
        return checked_tensors(unwrap_state_dict(raw), path)
    except CheckpointMismatchError as e:
        raise WeightsError(f"{path}: {e}") from None


def require_weights_file(path: str | os.PathLike[str]) -> Path:
    """``path``, a regular file (a pipe would block the read for good, a device never end)."""
    try:
        require_regular(path)
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {path}") from None
    except OSError as e:
        raise WeightsError(f"cannot read weights from {path}: {e.strerror or e}") from None
    return Path(path)


def checked_tensors(sd: dict[str, torch.Tensor], source: object) -> dict[str, torch.Tensor]:
    """``sd`` if every tensor is floating point and finite: weights from elsewhere with
    NaNs, infinities or integer tensors would train, plot or convert into garbage
    without a word."""
    for name, tensor in sd.items():
        if name.endswith("num_batches_tracked"):  # BatchNorm's counter (the linear probe's head)
            continue
        if not tensor.is_floating_point():
            raise WeightsError(f"{source}: tensor {name!r} is {tensor.dtype}, not floating point weights")
        if not torch.isfinite(tensor).all():
            raise WeightsError(f"{source}: tensor {name!r} holds NaN or infinite values")
    return sd


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, object] | None = None
) -> Path:
    """Write tensors as safetensors atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_together(path.parent, {path.name: (state_dict, metadata)})
    return path


def write_together(folder: Path, files: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, object] | None]]
                   ) -> None:
    """Write each ``name: (tensors, metadata)`` as safetensors in ``folder``: every
    file is written and flushed to disk beside its name first, then all are renamed
    in place back to back. A failed write (a full disk) leaves every file as it was;
    a crash leaves a mix of two exports only if it lands between two renames (it
    was the whole flush of a multi-GB file before). Files get the mode the umask
    gives (safetensors makes them private); an earlier export's temporary files,
    left by a killed process, are removed."""
    from safetensors.torch import save_file

    for name in files:  # checked first: a rename that fails after another succeeded would leave a mix
        if (folder / name).is_dir():
            raise WeightsError(f"cannot write {folder / name}: a folder is in the way")
    remove_dead_temps(folder)
    temps: dict[str, Path] = {}
    try:
        for name, (state_dict, metadata) in files.items():
            temps[name] = tmp = temp_beside(folder / name)
            tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
            meta = {"format": "pt", **{k: json.dumps(v) if not isinstance(v, str) else v
                                       for k, v in (metadata or {}).items()}}
            try:
                save_file(tensors, str(tmp), metadata=meta)
                os.chmod(tmp, 0o666 & ~_umask())
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            except Exception as e:  # safetensors' own error type, e.g. for a full disk
                raise WeightsError(f"cannot write {folder / name}: {e}") from None
        for name, tmp in temps.items():
            os.replace(tmp, folder / name)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export_encoder(model: MaskedAutoencoderViT, path: str | os.PathLike[str]) -> Path:
    """The encoder alone in the timm ViT layout, with the architecture as metadata."""
    return save_safetensors(encoder_state_dict(model), path, encoder_metadata(model.cfg))


def encoder_metadata(cfg: MAEConfig) -> dict[str, object]:
    """The architecture an ``encoder.safetensors`` records."""
    return {"arch": "vit", "img_size": cfg.img_size, "patch_size": cfg.patch_size, "embed_dim": cfg.embed_dim,
            "depth": cfg.depth, "num_heads": cfg.num_heads}


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
        hint = (f"; its classifiers are in {Path(source) / 'best'} and {Path(source) / 'last'}"
                if (Path(source) / "best" / "classifier.safetensors").is_file() else "")
        raise WeightsError(f"{source} is not a classifier written by `mae finetune` (no arch={CLASSIFIER_ARCH}){hint}")
    try:
        return ClassifierConfig(**{k: meta[k] for k in ("num_classes", "img_size", "patch_size", "embed_dim", "depth",
                                                        "num_heads", "mlp_ratio", "global_pool", "head")})
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{source}: classifier metadata is incomplete or invalid ({e})") from e
