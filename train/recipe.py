"""The paper's optimization recipe: batch and lr arithmetic, AdamW parameter groups
and the lr schedule."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from train.config import RunConfig
from train.errors import ConfigError, ResumeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Derived:
    """Values computed from the config and the run's world/data; logged, never
    written back into the config."""

    world_size: int
    global_batch: int
    lr: float
    steps_per_epoch: float  # micro-batches per epoch / accum_steps
    total_steps: int
    warmup_steps: int


def micro_batches_per_epoch(cfg: RunConfig, samples: int, world_size: int) -> int:
    """Micro-batches an epoch of ``samples`` (one rank's) gives, as the loader counts
    them: its partial last batch too, unless ``data.drop_last``. A batch the data
    cannot fill once is refused: its steps would be partial batches under the lr of
    full ones."""
    micro, accum = cfg.data.batch_size, cfg.optim.accum_steps
    if samples == 0:
        raise ConfigError(f"an epoch gives each of the {world_size} ranks no samples: the data holds fewer samples "
                          "than there are ranks (data.plan.uneven=drop drops the rest), or its sources' quotas are 0")
    if samples < micro * accum:
        raise ConfigError(f"data.batch_size {micro} x optim.accum_steps {accum} is more than the {samples} samples "
                          f"an epoch gives each of the {world_size} ranks: lower data.batch_size")
    return samples // micro if cfg.data.drop_last else -(-samples // micro)


def derived(cfg: RunConfig, world_size: int, micro_batches_per_epoch: int) -> Derived:
    global_batch = cfg.data.batch_size * cfg.optim.accum_steps * world_size
    lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * global_batch / 256
    # an accumulation window may span two epochs: steps follow the micro-batches, so
    # schedule.epochs are the data's epochs (a floor per epoch made 4 epochs train 3)
    steps_per_epoch = micro_batches_per_epoch / cfg.optim.accum_steps

    def steps_in(epochs: float) -> int:  # whole steps, from whole micro-batches (no float drift at 3 x 10/3)
        return math.floor(epochs * micro_batches_per_epoch + 1e-9) // cfg.optim.accum_steps

    total = cfg.schedule.max_steps or steps_in(cfg.schedule.epochs)
    warmup = steps_in(cfg.schedule.warmup_epochs)
    if total < 1:
        raise ConfigError(f"schedule.epochs {cfg.schedule.epochs:g} is {cfg.schedule.epochs * steps_per_epoch:.2g} of "
                          f"an optimizer step ({steps_per_epoch:.4g} per epoch): nothing would train; raise it")
    if cfg.optim.min_lr > lr:
        raise ConfigError(f"optim.min_lr {cfg.optim.min_lr:g} is above the peak lr {lr:.3g}: the cosine decay would "
                          "climb; lower optim.min_lr")
    if warmup > total and not cfg.schedule.max_steps:  # a max_steps run is cut short on purpose
        log.warning("schedule.warmup_epochs %g is %d steps, longer than the run's %d: the lr never reaches its peak "
                    "%.3g", cfg.schedule.warmup_epochs, warmup, total, lr)
    return Derived(world_size, global_batch, lr, steps_per_epoch, total, min(warmup, total))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on every parameter but the 1-D ones (biases, norms) and the
    names the model lists in ``no_weight_decay`` (the classifier's cls token and
    position embedding; the pretraining MAE lists none: its cls and mask tokens
    are decayed, as in the official code; its position embedding is a fixed buffer)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, d: Derived, min_lr: float = 0.0) -> float:
    """Linear warmup, then half-cycle cosine to ``min_lr``, set every optimizer step."""
    if step < d.warmup_steps:
        return d.lr * step / d.warmup_steps
    span = max(1, d.total_steps - d.warmup_steps)
    progress = min(1.0, (step - d.warmup_steps) / span)
    return min_lr + (d.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def same_global_batch(cfg, d: Derived) -> Callable[[Path, dict], None]:
    """The check ``CheckpointManager.resume`` runs on a checkpoint before loading it:
    ``refuse_another_global_batch`` for this run."""
    return lambda where, meta: refuse_another_global_batch(meta, cfg, d, where)


def refuse_another_global_batch(meta: dict, cfg, d: Derived, where: Path) -> None:
    """A checkpoint's steps are steps of its global batch, and the schedule (total,
    warmup, the cosine's position) is counted in them: resumed under another global
    batch, its step N would stand for another number of images. 1 -> 2 ranks ended
    a 2-epoch run after one epoch with exit 0; 2 -> 1 trained 2.5 epochs with the lr
    back at its peak. Refused with the way to keep it (``where``: the checkpoint)."""
    saved = _at(meta, "derived", "global_batch")  # None: written before it was recorded
    if saved is None or saved == d.global_batch:
        return
    was = (f"micro {_at(meta, 'config', 'data', 'batch_size')} x accum {_at(meta, 'config', 'optim', 'accum_steps')} "
           f"x world {_at(meta, 'world_size')}")
    raise ResumeError(f"checkpoint {where} trained with a global batch of {saved} images a step ({was}); this run's "
                      f"is {d.global_batch} (micro {cfg.data.batch_size} x accum {cfg.optim.accum_steps} x world "
                      f"{d.world_size}), under which its step {meta.get('step')} and the lr schedule would stand for "
                      f"another number of images. Keep data.batch_size x optim.accum_steps x world = {saved} (e.g. "
                      "raise optim.accum_steps on fewer ranks), or start a new checkpoint.dir")


def _at(tree: object, *keys: str) -> object:
    """``tree[k1][k2]...`` of a checkpoint's meta.json (untrusted), None where absent."""
    for k in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(k)
    return tree
