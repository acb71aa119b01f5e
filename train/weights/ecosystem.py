"""Our weights as timm and transformers load them (`mae convert SRC OUT --to ...`).

Sources: a pretrained MAE or encoder (a run's checkpoint dir, an `mae export`
folder, ``mae.safetensors``, ``encoder.safetensors``, an official ``.pth``) or a
fine-tuned classifier (``RUN/best`` or ``RUN/last`` of `mae finetune`, or its
``classifier.safetensors``). Each target is a folder of ``model.safetensors`` +
``config.json`` in that library's own format:

- ``timm``: timm's ``VisionTransformer`` keys; ``config.json`` holds the
  architecture, ``model_args`` and ``pretrained_cfg`` (input size, crop, mean/std,
  label names), as timm's Hub configs do. An encoder loads with ``num_classes=0``.
- ``transformers``: an encoder as ``ViTMAEModel``, a classifier as
  ``ViTForImageClassification`` (cls-token classifiers only: transformers' ViT has
  no global-average-pooling head), plus ``preprocessor_config.json``;
  ``from_pretrained(OUT)`` loads it offline.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from infra.files import atomic_write
from model.classifier import ClassifierConfig, ViTClassifier
from model.layouts import LayoutError, timm_state_dict, transformers_classifier_state_dict, \
    transformers_encoder_state_dict
from model.mae import MAEConfig, MaskedAutoencoderViT
from model.registry import model_config
from train.checkpoint import holds_checkpoints
from train.errors import WeightsError
from train.weights.files import classifier_config_of, save_safetensors
from model.weights import is_encoder_key
from train.weights.pretrained import (architecture_of, check_architecture, metadata_config, read_weights,
                                      registered_size_of)

TARGETS = ("timm", "transformers")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TIMM_NAMES = {(768, 12, 16): "vit_base_patch16_224", (1024, 24, 16): "vit_large_patch16_224",
              (1280, 32, 14): "vit_huge_patch14_224", (384, 12, 16): "vit_small_patch16_224",
              (192, 12, 16): "vit_tiny_patch16_224"}


def convert(source: str | Path, out: str | Path, target: str) -> dict:
    """Write ``source`` in ``target``'s layout under ``out``; returns what was written."""
    if target not in TARGETS:
        raise WeightsError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    out = Path(out)
    if holds_checkpoints(out):
        raise WeightsError(f"{out} holds checkpoints: converted weights there would be read in their place; "
                           "convert to another folder")
    sd, meta = read_weights(source)
    try:
        if any(k.startswith("head.") for k in sd):
            cfg = classifier_config_of(meta, source)
            check_architecture(cfg, sd, source)  # before building: metadata saying 8192 px built for a minute
            _require_shapes(sd, ViTClassifier, cfg, source, lambda key: True)
            classes = meta.get("classes") or [str(i) for i in range(cfg.num_classes)]
            if len(classes) != cfg.num_classes or len(set(classes)) != len(classes):
                raise WeightsError(f"{source}: its metadata names {len(classes)} classes ({len(set(classes))} "
                                   f"distinct) for a head of {cfg.num_classes}")
            written = _classifier(sd, cfg, classes, out, target)
        else:
            cfg = _encoder_config(sd, meta, source)
            check_architecture(cfg, sd, source)
            _require_shapes(sd, MaskedAutoencoderViT, cfg, source, is_encoder_key)
            written = _encoder(sd, cfg, out, target)
    except LayoutError as e:
        raise WeightsError(f"{source} cannot be written for {target}: {e}") from None
    return {"source": str(source), "target": target, "out": str(out), **written}


def _encoder_config(sd: dict[str, torch.Tensor], meta: dict, source: object) -> MAEConfig:
    described = metadata_config(meta, source)
    if described is not None:
        return described[0]
    name = registered_size_of(sd, source)  # an official .pth or a checkpoint dir
    patches = architecture_of(sd, source)["patches"]
    if patches is None:
        raise WeightsError(f"{source}: no pos_embed, so no input size to write in the config")
    return model_config(name, img_size=round(patches**0.5) * model_config(name).patch_size)


def _require_shapes(sd: dict[str, torch.Tensor], model_class: type, cfg: object, source: object,
                    keep: Callable[[str], bool]) -> None:
    """The tensors are exactly the ones (names and shapes) of ``model_class(cfg)``,
    among its keys that ``keep`` selects: metadata from elsewhere must not describe
    another architecture than the file holds, and a missing tensor must not be left
    for the target library to fill with its initialization."""
    with torch.device("meta"):  # shapes only: nothing is allocated or initialized
        expected = {k: tuple(v.shape) for k, v in model_class(cfg).state_dict().items() if keep(k)}
    found = {k: tuple(v.shape) for k, v in sd.items() if keep(k)}
    problems = [f"missing {k}" for k in sorted(set(expected) - set(found))]
    problems += [f"unexpected {k}" for k in sorted(set(found) - set(expected))]
    problems += [f"{k} is {list(found[k])}, the architecture needs {list(expected[k])}"
                 for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise WeightsError(f"{source}: its tensors do not fit the architecture its metadata gives: {shown}")


def _encoder(sd: dict[str, torch.Tensor], cfg: MAEConfig, out: Path, target: str) -> dict:
    if target == "timm":
        args = _timm_args(cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio,
                          num_classes=0, global_pool="token")
        return _write(out, timm_state_dict(sd, encoder_only=True), _timm_config(args, [], crop=0.875))
    config = {**_hf_common(cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio),
              "model_type": "vit_mae", "architectures": ["ViTMAEModel"], "mask_ratio": 0.75,
              "norm_pix_loss": cfg.norm_pix_loss, "decoder_hidden_size": cfg.decoder_embed_dim,
              "decoder_num_hidden_layers": cfg.decoder_depth, "decoder_num_attention_heads": cfg.decoder_num_heads,
              "decoder_intermediate_size": int(cfg.decoder_embed_dim * cfg.mlp_ratio)}
    return _write(out, transformers_encoder_state_dict(sd), config, _hf_preprocessor(cfg.img_size))


def _classifier(sd: dict[str, torch.Tensor], cfg: ClassifierConfig, classes: list[str], out: Path,
                target: str) -> dict:
    shape = (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
    crop = 0.875 if cfg.img_size <= 224 else 1.0  # as `mae finetune` evaluates
    if target == "timm":
        if cfg.head != "linear":
            raise LayoutError("the linear probe's BatchNorm head is not a timm ViT head")
        args = _timm_args(*shape, num_classes=cfg.num_classes, global_pool="avg" if cfg.global_pool else "token")
        return _write(out, timm_state_dict(sd), _timm_config(args, classes, crop))
    config = {**_hf_common(*shape), "model_type": "vit", "architectures": ["ViTForImageClassification"],
              "id2label": {str(i): name for i, name in enumerate(classes)},
              "label2id": {name: i for i, name in enumerate(classes)}}
    return _write(out, transformers_classifier_state_dict(sd), config, _hf_preprocessor(cfg.img_size, crop))


def _timm_args(img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float,
               num_classes: int, global_pool: str) -> dict:
    return {"img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim, "depth": depth,
            "num_heads": num_heads, "mlp_ratio": mlp_ratio, "num_classes": num_classes, "global_pool": global_pool,
            "qkv_bias": True, "class_token": True}


def _timm_config(args: dict, classes: list[str], crop: float) -> dict:
    """timm's Hub config: ``timm.create_model(architecture,
    checkpoint_path="model.safetensors", **model_args)`` loads it strictly (with
    ``pretrained=True`` timm drops a head of other than the architecture's classes)."""
    name = TIMM_NAMES.get((args["embed_dim"], args["depth"], args["patch_size"]), "vit_base_patch16_224")
    size = args["img_size"]
    return {"architecture": name, "num_classes": args["num_classes"], "num_features": args["embed_dim"],
            "global_pool": args["global_pool"], "model_args": args, "label_names": classes,
            "pretrained_cfg": {"input_size": [3, size, size], "fixed_input_size": True, "interpolation": "bicubic",
                               "crop_pct": crop, "crop_mode": "center", "mean": list(MEAN), "std": list(STD),
                               "num_classes": args["num_classes"], "first_conv": "patch_embed.proj",
                               "classifier": "head"}}


def _hf_common(img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float) -> dict:
    return {"hidden_size": embed_dim, "num_hidden_layers": depth, "num_attention_heads": num_heads,
            "intermediate_size": int(embed_dim * mlp_ratio), "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": 1e-6,
            "image_size": img_size, "patch_size": patch_size, "num_channels": 3, "qkv_bias": True}


def _hf_preprocessor(size: int, crop: float | None = None) -> dict:
    """transformers' image processing: the whole image squashed to ``size`` (an
    encoder's features), or with ``crop`` our evaluation's view (the shorter side to
    ``size / crop``, the centre ``size`` square), which ViT's own processor cannot do."""
    common = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": list(MEAN), "image_std": list(STD)}
    if crop is None:
        return {"image_processor_type": "ViTImageProcessor", "size": {"height": size, "width": size}, **common}
    return {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": size}, "crop_pct": crop,
            **common}


def _write(out: Path, sd: dict[str, torch.Tensor], config: dict, preprocessor: dict | None = None) -> dict:
    """The weights first, the configs after: a failed write leaves no config.json
    that describes other weights than the folder holds."""
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(sd, out / "model.safetensors")
    files = ["model.safetensors", "config.json"]
    try:
        atomic_write(out / "config.json", json.dumps(config, indent=1))
        if preprocessor is not None:
            atomic_write(out / "preprocessor_config.json", json.dumps(preprocessor, indent=1))
            files.append("preprocessor_config.json")
        else:  # a transformers conversion's, left in the folder, would describe these weights wrongly
            (out / "preprocessor_config.json").unlink(missing_ok=True)
    except OSError as e:
        raise WeightsError(f"cannot write the configs in {out}: {e.strerror or e}") from None
    return {"files": files, "tensors": len(sd), "architecture": config.get("architectures", [config.get(
        "architecture")])[0]}
