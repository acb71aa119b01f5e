"""What the DeepSpeed engine costs over a bare PyTorch loop (`mae bench train`).

Same model (same initial weights), same micro-batch, same data (one shard dataset
of bundled photos, read by the same `cpu` loader), one process, rounds alternated
(bare, engine, bare, engine ...). Reports images/sec, the engine's overhead and
each loop's data-wait fraction.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from infra.options import option, require, require_choice, require_positive
from infra.testing.photos import write_photo_folder
from model.registry import create_model
from pipeline.augment import AugmentConfig
from pipeline.loader import LoaderConfig, build_loader
from pipeline.shards.writer import ShardWriterConfig, write_shards
from train.config import load_config
from train.engine import build_engine, init_distributed
from train.recipe import param_groups


def _timed_steps(step_fn, loader, steps: int, warmup: int) -> dict[str, float]:
    it = iter(loader)
    wait = busy = 0.0
    images = 0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        t1 = time.perf_counter()
        step_fn(batch.images)
        t2 = time.perf_counter()
        if i >= warmup:
            wait, busy, images = wait + (t1 - t0), busy + (t2 - t1), images + len(batch.keys)
    return {"images_per_s": images / (wait + busy), "data_wait_fraction": wait / (wait + busy),
            "compute_images_per_s": images / busy}


@dataclass(frozen=True)
class TrainerBench:
    model: str = option("mae_vit_tiny_patch16", "registered model")
    img_size: int = option(224, "input side")
    batch: int = option(16, "micro-batch")
    steps: int = option(10, "timed steps per round and loop")
    warmup: int = option(2, "untimed steps first")
    rounds: int = option(3, "alternated rounds")
    stage: int = option(2, "ZeRO stage")
    workers: int = option(1, "DataLoader workers")
    images: int = option(400, "dataset size (bundled photos)")

    def __post_init__(self) -> None:
        require_positive(self, "img_size", "batch", "steps", "rounds", "images")
        require(self.warmup >= 0 and self.workers >= 0, "warmup", "warmup and workers must be >= 0")
        require_choice(self, "stage", (0, 1, 2, 3))


def bench_trainer(args: TrainerBench) -> dict[str, object]:
    """Bare loop vs engine, rounds alternated; medians and the engine's overhead."""
    cfg = load_config(None, [f"model.name={args.model}", f"data.batch_size={args.batch}",
                             f"data.augment.img_size={args.img_size}", f"deepspeed.stage={args.stage}",
                             "deepspeed.precision=fp32", "optim.lr=1e-4"])
    init_distributed(cfg.deepspeed)
    with tempfile.TemporaryDirectory(prefix="mae-bench-train-") as tmp:
        write_photo_folder(Path(tmp) / "src", args.images)
        write_shards(str(Path(tmp) / "src"), str(Path(tmp) / "shards"), ShardWriterConfig(shard_bytes=8 * 2**20))
        loader = build_loader(LoaderConfig(url=str(Path(tmp) / "shards"), batch_size=args.batch,
                                           num_workers=args.workers, augment=AugmentConfig(img_size=args.img_size)),
                              0, 1)
        torch.manual_seed(0)
        bare_model = create_model(args.model, img_size=args.img_size)
        ds_model = create_model(args.model, img_size=args.img_size)
        ds_model.load_state_dict(bare_model.state_dict())
        opt = torch.optim.AdamW(param_groups(bare_model, 0.05), lr=1e-4, betas=(0.9, 0.95))
        engine = build_engine(cfg, ds_model, 1e-4)

        def bare_step(images: torch.Tensor) -> None:
            loss, _, _ = bare_model(images)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def engine_step(images: torch.Tensor) -> None:
            loss, _, _ = engine(images)
            engine.backward(loss)
            engine.step()

        runs = {"bare_pytorch": [], "deepspeed_engine": []}
        for _ in range(args.rounds):
            runs["bare_pytorch"].append(_timed_steps(bare_step, loader, args.steps, args.warmup))
            runs["deepspeed_engine"].append(_timed_steps(engine_step, loader, args.steps, args.warmup))
    report = {"model": args.model, "batch": args.batch, "img_size": args.img_size, "stage": args.stage,
              "threads": torch.get_num_threads(), "runs": runs}
    for name, rs in runs.items():
        report[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
    b, e = report["bare_pytorch"], report["deepspeed_engine"]
    report["engine_overhead"] = 1 - e["compute_images_per_s"] / b["compute_images_per_s"]
    report["engine_overhead_end_to_end"] = 1 - e["images_per_s"] / b["images_per_s"]
    return report
