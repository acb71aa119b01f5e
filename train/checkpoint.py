"""Crash-safe DeepSpeed checkpoints: save, keep the last K, resume the latest good one.

Layout under ``checkpoint.dir``::

    step000001000/         DeepSpeed's files (model, ZeRO partitions) + ours:
        rng_rank00000.pt   this rank's torch RNG state (tensors only)
        meta.json          model, config fingerprint, world size, step, epoch
        COMPLETE           written last, after every rank finished writing
    latest                 the tag of the newest COMPLETE checkpoint

``latest`` moves (atomic rename) only after ``COMPLETE`` exists, so a crash in the
middle of a save leaves it pointing at the previous good checkpoint. Resuming
reads ``meta.json`` first and refuses a checkpoint of another model or of a
config that changes the optimizer state, with a message that says which.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from infra.files import atomic_write
from train.config import CheckpointConfig
from train.errors import ResumeError

log = logging.getLogger(__name__)
TAG_RE = re.compile(r"^step(\d{9})$")
COMPLETE = "COMPLETE"


@dataclass(frozen=True)
class Resumed:
    tag: str
    step: int
    client_state: dict[str, Any]


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def complete_tags(root: Path) -> list[str]:
    """Tags with a COMPLETE marker, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).exists())


def latest_complete(root: Path) -> str | None:
    """The ``latest`` tag if it is complete, else the newest complete tag."""
    latest = root / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        if (root / tag / COMPLETE).exists():
            return tag
        log.warning("checkpoint 'latest' names %s, which is incomplete; using the newest complete one", tag)
    tags = complete_tags(root)
    return tags[-1] if tags else None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, model_name: str, fingerprint: str, rank: int, world_size: int) -> None:
        self.root = Path(cfg.dir)
        self.keep_last = cfg.keep_last
        self.rank, self.world_size = rank, world_size
        self.model_name = model_name
        self.fingerprint = fingerprint

    def save(self, engine, step: int, client_state: dict[str, Any]) -> float:
        """Save on every rank; returns the seconds it took."""
        t0 = time.perf_counter()
        tag = tag_for(step)
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        torch.save({"torch": torch.get_rng_state()}, self.root / tag / f"rng_rank{self.rank:05d}.pt")
        _barrier()  # every rank's partition and RNG file is on disk
        if self.rank == 0:
            meta = {"model": self.model_name, "fingerprint": self.fingerprint, "world_size": self.world_size,
                    "step": step, "epoch": client_state.get("epoch")}
            atomic_write(self.root / tag / "meta.json", json.dumps(meta))
            atomic_write(self.root / tag / COMPLETE, "")
            atomic_write(self.root / "latest", tag)
            self._prune()
        _barrier()
        seconds = time.perf_counter() - t0
        log.info("saved checkpoint %s in %.1fs", self.root / tag, seconds)
        return seconds

    def _prune(self) -> None:
        tags = complete_tags(self.root)
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            shutil.rmtree(self.root / old, ignore_errors=True)
        for p in self.root.iterdir():  # leftovers of crashed saves older than the newest good one
            if TAG_RE.match(p.name) and not (p / COMPLETE).exists() and tags and p.name < tags[-1]:
                shutil.rmtree(p, ignore_errors=True)

    def resume(self, engine) -> Resumed | None:
        tag = latest_complete(self.root)
        if tag is None:
            return None
        meta = json.loads((self.root / tag / "meta.json").read_text())
        if meta["model"] != self.model_name:
            raise ResumeError(f"checkpoint {self.root / tag} is of model {meta['model']}, this run is "
                              f"{self.model_name}; use another checkpoint.dir or the same model")
        if meta["fingerprint"] != self.fingerprint:
            raise ResumeError(f"checkpoint {self.root / tag} was written with a config that changes the model or "
                              "optimizer state (model, img_size, norm_pix_loss, ZeRO stage, precision or offload "
                              "differ); resume with the same settings or start a new checkpoint.dir")
        path, client_state = engine.load_checkpoint(str(self.root), tag=tag, load_module_strict=True,
                                                    load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ResumeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        rng_file = self.root / tag / f"rng_rank{self.rank:05d}.pt"
        if meta["world_size"] == self.world_size and rng_file.exists():
            torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch"])
        log.info("resumed from %s (step %d)", self.root / tag, meta["step"])
        return Resumed(tag, int(meta["step"]), client_state or {})
