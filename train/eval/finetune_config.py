"""The configuration of `mae finetune`: one dataclass per component, composed into
``FinetuneConfig`` and loaded like pretraining's (a preset or YAML, then ``a.b=c``
overrides; ``train.config.load_config(..., schema=FinetuneConfig)``).

The shared components (data, DeepSpeed, checkpoints, logging, metrics, faults) are
pretraining's own classes; optimizer and schedule are pretraining's with the
fine-tuning recipe's defaults and the few fields fine-tuning adds. Presets:
``finetune_vit_{b,l,h,h448}`` (the paper's end-to-end fine-tuning),
``linprobe_vit_{b,l,h}`` (the paper's linear probe), ``finetune_tiny_cpu``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from infra.options import option, require, require_choice, require_text
from model.classifier import HEADS
from model.registry import list_models, model_config
from pipeline.augment import AugmentConfig
from pipeline.loader import LoaderConfig
from train.config import (CheckpointConfig, DeepSpeedConfig, FaultConfig, LogConfig, MetricsConfig, OptimConfig,
                          ScheduleConfig, optimizer_settings, require_input_dtype, sized_model_config)
from train.eval.mixup import MixupConfig

OPTIMIZERS = ("adamw", "lars")


@dataclass
class ClassifierModelConfig:
    name: str = option("mae_vit_base_patch16", "registered MAE size whose encoder is fine-tuned (mae models)")
    weights: str | None = option(None, "pretrained weights: a run's checkpoint.dir, an `mae export` folder, "
                                       "encoder.safetensors, an official MAE .pth; None: random init (a baseline)")
    num_classes: int | None = option(None, "None: the training set's classes (its manifest)")
    drop_path: float = option(0.1, "stochastic depth of the last block, linear from 0 (B 0.1, L 0.2, H 0.3)")
    global_pool: bool = option(True, "mean of the patch tokens + fc_norm (the recipe); false: cls token after norm")
    head: str = option("linear", "linear / bn_linear (the linear probe: BatchNorm without affine, then Linear)")
    trainable_blocks: int | None = option(None, "partial fine-tuning: only the last k blocks, the final norm and "
                                                "the head learn (0: the head alone); None: everything")
    layer_decay: float = option(0.75, "layer-wise lr decay: lr x decay^(depth + 1 - layer) (B 0.65, L/H 0.75)")
    grad_checkpointing: bool = option(False, "recompute each block in backward: less memory, ~30% more compute")

    def __post_init__(self) -> None:
        require_choice(self, "name", list_models())
        require_choice(self, "head", HEADS)
        require(0 <= self.drop_path < 1, "drop_path", f"must be in [0, 1), got {self.drop_path}")
        require(0 < self.layer_decay <= 1, "layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        require(self.num_classes is None or self.num_classes >= 2, "num_classes", "must be >= 2")
        depth = model_config(self.name).depth
        require(self.trainable_blocks is None or 0 <= self.trainable_blocks <= depth, "trainable_blocks",
                f"must be in [0, {depth}] ({self.name} has {depth} blocks), got {self.trainable_blocks}")
        require_text(self, "weights")  # empty (an unset $VAR) would silently mean random init


@dataclass
class FinetuneOptimConfig(OptimConfig):
    name: str = option("adamw", "adamw (fine-tuning) / lars (the linear probe; needs deepspeed.stage=0)")
    blr: float = option(1e-3, "base lr; lr = blr * global_batch / 256 (B 5e-4, L/H 1e-3; probe 0.1)")
    min_lr: float = option(1e-6, "floor of the cosine decay")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas (fine-tuning: 0.9, 0.999)")
    momentum: float = option(0.9, "LARS momentum")

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice(self, "name", OPTIMIZERS)
        require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")


@dataclass
class FinetuneScheduleConfig(ScheduleConfig):
    epochs: float = option(100, "total epochs (B 100, L/H 50; probe 90)")
    warmup_epochs: float = option(5, "linear lr warmup, then half-cycle cosine to optim.min_lr (probe: 10)")


@dataclass
class EvalConfig:
    url: str | None = option(None, "labelled validation shards; None: no evaluation")
    batch_size: int = option(64, "samples per rank per evaluation step")
    crop_fraction: float = option(0.875, "centre crop of this fraction of the shorter side (224 of 256)")
    every_epochs: int = option(1, "evaluate after every this many epochs (and at the end)")

    def __post_init__(self) -> None:
        require_text(self, "url")  # empty (an unset $VAR) would silently mean no evaluation
        for name in ("batch_size", "every_epochs"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        require(0 < self.crop_fraction <= 1, "crop_fraction", f"must be in (0, 1], got {self.crop_fraction}")


@dataclass(frozen=True)
class FinetuneAugmentConfig(AugmentConfig):
    """The fine-tuning recipe's augmentation by default (the official main_finetune.py:
    RandomResizedCrop 0.08-1, timm's rand-m9-mstd0.5-inc1, random erasing 0.25), so a
    config that leaves ``data.augment`` out does not silently train without it."""

    scale: tuple[float, float] = option((0.08, 1.0), "RandomResizedCrop area range (fine-tuning: 0.08-1)")
    rand_augment_layers: int = option(2, "RandAugment ops per image (0: off; the recipe's rand-m9-mstd0.5-inc1: 2)")
    erase_prob: float = option(0.25, "random erasing probability (the recipe: 0.25): one box of 2-33% of the image "
                                     "filled with N(0, 1) noise after normalization")


@dataclass(frozen=True)
class FinetuneLoaderConfig(LoaderConfig):
    """The training split's loader, the fine-tuning recipe's augmentation by default."""

    augment: FinetuneAugmentConfig = option(factory=FinetuneAugmentConfig)


@dataclass
class FinetuneConfig:
    data: FinetuneLoaderConfig = option(factory=FinetuneLoaderConfig)  # the training split
    eval: EvalConfig = option(factory=EvalConfig)
    model: ClassifierModelConfig = option(factory=ClassifierModelConfig)
    optim: FinetuneOptimConfig = option(factory=FinetuneOptimConfig)
    schedule: FinetuneScheduleConfig = option(factory=FinetuneScheduleConfig)
    mixup: MixupConfig = option(factory=MixupConfig)
    deepspeed: DeepSpeedConfig = option(factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = option(factory=CheckpointConfig)
    faults: FaultConfig = option(factory=FaultConfig)
    log: LogConfig = option(factory=LogConfig)
    metrics: MetricsConfig = option(factory=MetricsConfig)
    seed: int = option(0, "head init, drop path, mixup and (random init) the encoder")

    def __post_init__(self) -> None:
        sized_model_config(self.model.name, self.data.augment.img_size)  # here, not as a traceback at build time
        require_input_dtype(self.data, self.deepspeed)
        # LARS scales each parameter's step by its own norm: ZeRO's flattened partitions would
        # merge parameters, so the probe runs unpartitioned (its head is tiny anyway).
        require(self.optim.name != "lars" or self.deepspeed.stage == 0, "optim.name",
                "lars needs deepspeed.stage=0 (ZeRO flattens parameters, LARS needs each one's norm)")

    @property
    def img_size(self) -> int:
        """The classifier's input: the loader's image size (checkpoints of another
        resolution have their position embeddings resized on loading)."""
        return self.data.augment.img_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed, key by key: the classifier's shape,
        the seeds, what shapes the optimizer state and the settings it keeps (layer
        decay's lr scales, weight decay, betas; not lr, schedule or world size)."""
        m = self.model
        return {"model": f"classifier:{m.name}", "img_size": self.img_size, "num_classes": m.num_classes,
                "head": m.head, "global_pool": m.global_pool, "trainable_blocks": m.trainable_blocks,
                "optim": self.optim.name, "seed": self.seed, "data_seed": self.data.plan.seed,
                "zero_stage": self.deepspeed.stage, "precision": self.deepspeed.precision,
                "offload": [self.deepspeed.offload_optimizer, self.deepspeed.offload_params],
                "layer_decay": m.layer_decay, **optimizer_settings(self.optim)}
